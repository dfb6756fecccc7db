"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT file key is ``base_model.model.<module>.lora_{A,B}.weight``, where ``<module>`` is the
adapted linear's name in the transformers model. modalign's LoRA covers the linears of the
language model's decoder layers, so ``<module>`` is one of these layouts:

    causal LM (Llama, Mistral, Qwen2):  model.layers.N.<linear>
    LLaVA, transformers 5.x:            model.language_model.layers.N.<linear>
    LLaVA, transformers 4.x:            language_model.model.layers.N.<linear>
    InternLM2 / XComposer2:             model.layers.N.{attention.wqkv, attention.wo,
                                        feed_forward.w1, feed_forward.w3, feed_forward.w2}

``export_peft`` writes the first layout for a text-only model, the second for a model with a
vision tower, and the official InternLM2 names for an InternLM2 decoder (``wqkv``'s rows grouped
per KV head, as in the release). ``import_peft`` reads any of them, and modalign's earlier
exports (``self_attn.qkv_proj`` for InternLM2, rows in modalign's [q; k; v] order); the layout
is decided by the keys, checked against ``adapter_config.json``'s ``target_modules``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from modalign.checkpoints import hf, internlm2
from modalign.checkpoints.io import CheckpointError, atomic_dir, check_replaceable, read_bin, save_tensors
from modalign.config import LoRAConfig
from modalign.models.modality import ALinear, enable_lora

_PREFIX = "base_model.model."
_AB = (".lora_A.weight", ".lora_B.weight")
# the decoder layers' container in the wrapped transformers model, per layout
_LAYERS = {
    "causal-lm": "model.layers.",
    "llava": "model.language_model.layers.",
    "llava-4.x": "language_model.model.layers.",
}
# InternLM2's official linear names -> modalign's (from the checkpoint reader's renames)
_INTERNLM2 = {
    a.strip("."): b.strip(".")
    for a, b in internlm2._RENAMES
    if a.startswith((".attention.", ".feed_forward."))
}
_INTERNLM2_BACK = {v: k for k, v in _INTERNLM2.items()}
# adapter_config.json settings modalign's LoRA cannot hold: (key, value that is harmless)
_UNSUPPORTED = (
    ("use_dora", False),
    ("use_rslora", False),
    ("fan_in_fan_out", False),
    ("lora_bias", False),
    ("bias", "none"),
    ("layers_to_transform", None),
    ("layer_replication", None),
    ("rank_pattern", {}),
    ("alpha_pattern", {}),
    ("target_parameters", None),
    ("trainable_token_indices", None),
    ("modules_to_save", None),
)


def _lora_modules(model):
    for name, m in model.llm.named_modules():
        if isinstance(m, ALinear) and m.lora_A is not None:
            yield name, m


def _is_internlm2(model) -> bool:
    return model.config.llm.model_type == "internlm2"


# ------------------------------------------------------------------------------ export


def export_peft(model, path: str | Path, reads: tuple = ()) -> None:
    """Write the model's LoRA weights (unmerged) as a PEFT adapter; a model with trained parts a
    PEFT LoRA adapter cannot hold (Partial LoRA, LLaMA-Adapter's prompts, bias tuning) is refused."""
    cfg, llm = model.config.llm.lora, model.config.llm
    mods = list(_lora_modules(model))
    if cfg is None or not mods:
        raise CheckpointError("this model has no LoRA adapter to export")
    official = _is_internlm2(model)
    # parts beyond the LoRA that the adapter would load without; an InternLM-XComposer2 release's own
    # Partial LoRA is part of the base the adapter goes onto, so it is not counted there
    parts = (("Partial LoRA", llm.plora and not official), ("LLaMA-Adapter / bias tuning", llm.adapter))
    beyond = [name for name, part in parts if part]
    if beyond:
        raise CheckpointError(f"this model also has {' and '.join(beyond)}, which a PEFT LoRA adapter cannot "
                              "hold; save it whole (--to native)")  # fmt: skip
    check_replaceable(path, reads)
    if llm.mam:
        raise CheckpointError(
            "this decoder has per-modality (MAM) projections, which a PEFT adapter cannot name"
        )
    if not official and (llm.model_type not in hf.LLM_TYPES or llm.fused_qkv):
        raise CheckpointError(
            f"no PEFT layout for a {llm.model_type!r} decoder"
            f"{' with a fused qkv projection' if llm.fused_qkv else ''}; "
            f"supported: {', '.join(hf.LLM_TYPES)}, internlm2"
        )
    layers = _LAYERS["llava" if model.has_vision and not official else "causal-lm"]
    tensors = {}
    for name, m in mods:
        if m.lora_merged:
            raise CheckpointError(f"LoRA of {name} is merged; unmerge before exporting the adapter")
        _, idx, linear = name.split(".", 2)
        b = m.lora_B.weight
        if official:
            if linear not in _INTERNLM2_BACK:
                raise CheckpointError(f"{name} has no name in InternLM2's official layout")
            if linear == "self_attn.qkv_proj":
                b = internlm2.group_qkv(b, llm)
            linear = _INTERNLM2_BACK[linear]
        key = f"{_PREFIX}{layers}{idx}.{linear}"
        tensors[key + _AB[0]] = m.lora_A.weight
        tensors[key + _AB[1]] = b
    if official:
        targets: list[str] | str = sorted(
            {k[len(_PREFIX) :].split(".", 3)[3][: -len(_AB[0])] for k in tensors}
        )
    elif model.has_vision:
        # a regex, so that the vision tower's equally named projections are not targeted
        targets = rf".*language_model.*\.({'|'.join(sorted(cfg.targets))})"
    else:
        targets = sorted(cfg.targets)
    doc = {
        "peft_type": "LORA",
        "task_type": None if model.has_vision else "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": targets,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    with atomic_dir(path) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(doc, indent=2) + "\n")
        save_tensors(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})


# ------------------------------------------------------------------------------ import


def _read_config(path: Path) -> dict:
    f = path / "adapter_config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no adapter_config.json")
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON: {e}") from None
    if doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{f}: peft_type {doc.get('peft_type')!r} is not supported (LORA only)")
    if doc.get("modules_to_save"):
        raise CheckpointError(
            f"{f}: modules_to_save {doc['modules_to_save']} is not supported (modalign reads the LoRA "
            "of the decoder layers' linears only)"
        )
    for key, harmless in _UNSUPPORTED:
        if doc.get(key, harmless) not in (harmless, None, {}, []):
            raise CheckpointError(f"{f}: {key}: {doc[key]!r} is not supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if doc.get(key) is None:
            raise CheckpointError(f"{f}: {key} is missing")
    return doc


def _adapter_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _targeted(doc: dict, module: str) -> bool:
    """Whether PEFT's ``target_modules`` (and ``exclude_modules``) select ``module``."""

    def match(spec, name: str) -> bool:
        if not spec:
            return False
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)

    return match(doc["target_modules"], module) and not match(doc.get("exclude_modules"), module)


def _split_key(key: str, file: Path) -> tuple[str, str, str, str]:
    """A file key -> (layout, layer index, linear as written, "A" or "B")."""
    ab = next((s for s in _AB if key.endswith(s)), None)
    if not key.startswith(_PREFIX) or ab is None:
        what = "a full weight (modules_to_save or saved embedding layers)"
        if ".lora_embedding_" in key:
            what = "LoRA on an embedding"
        elif ".lora_magnitude_vector" in key:
            what = "a DoRA magnitude"
        elif ".lora_" in key:
            what = "a LoRA tensor modalign does not hold"
        raise CheckpointError(
            f"{file}: tensor {key!r} is {what}; modalign reads lora_A / lora_B weights only"
        )
    module = key[len(_PREFIX) : -len(ab)]
    for layout, layers in _LAYERS.items():
        if module.startswith(layers):
            idx, _, linear = module[len(layers) :].partition(".")
            if idx.isdigit() and linear:
                return layout, idx, linear, "A" if ab == _AB[0] else "B"
    raise CheckpointError(
        f"{file}: tensor {key!r} adapts {module!r}, outside the language model's decoder layers "
        "(modalign's LoRA covers those only)"
    )


def import_peft(model, path: str | Path) -> int:
    """Add a PEFT LoRA adapter to ``model``; returns how many linears received LoRA.

    The LoRA matrices are held in float32 on a float16 / bfloat16 base (in the base's dtype on a
    float32 or float64 one), as PEFT holds them (``autocast_adapter_dtype=True``, its default):
    an fp32 file's values are kept bit for bit, a bf16 / fp16 file's exactly widened. Outside
    autocast the LoRA then runs in fp32 and its sum with the base output is rounded once to the
    base's dtype (``low_rank_add``); ``export_peft`` writes the fp32 values back unchanged."""
    path = Path(path)
    doc = _read_config(path)
    file = _adapter_file(path)
    raw = read_bin(file) if file.suffix == ".bin" else read_tensors_file(file)
    if not raw:
        raise CheckpointError(f"{file}: holds no tensors")
    llm = model.config.llm
    if llm.lora is not None or any(True for _ in _lora_modules(model)):
        raise CheckpointError(f"{path}: the model already has a LoRA adapter")
    if llm.mam:
        raise CheckpointError(f"{path}: the model's per-modality (MAM) projections have no PEFT names")
    layouts: dict[str, str] = {}  # layout -> its first key
    written: dict[str, str] = {}  # modalign linear -> its name in the file
    tensors: dict[str, torch.Tensor] = {}
    # LoRA tensors first: an error names the adapted module rather than a weight saved beside it
    for key, t in sorted(raw.items(), key=lambda kv: not kv[0].endswith(_AB)):
        layout, idx, linear, ab = _split_key(key, file)
        layouts.setdefault(layout, key)
        if not _targeted(doc, key[len(_PREFIX) : -len(_AB[0])]):
            raise CheckpointError(
                f"{file}: tensor {key!r} is not among adapter_config.json's target_modules "
                f"{doc['target_modules']!r}"
            )
        as_written = linear
        if linear in _INTERNLM2:  # InternLM2's official names
            if not _is_internlm2(model):
                raise CheckpointError(
                    f"{file}: tensor {key!r} is in InternLM2's layout; the model is a {llm.model_type!r} decoder"
                )
            linear = _INTERNLM2[linear]
            if linear == "self_attn.qkv_proj" and ab == "B":
                t = internlm2._regroup_qkv(t, llm)
        name = f"layers.{idx}.{linear}"
        if written.setdefault(name, as_written) != as_written or f"{name}.lora_{ab}.weight" in tensors:
            raise CheckpointError(f"{file}: tensor {key!r} adapts a linear another tensor already adapts")
        tensors[f"{name}.lora_{ab}.weight"] = t
    if len(layouts) > 1:
        raise CheckpointError(f"{file}: tensors of different layouts: {', '.join(sorted(layouts.values()))}")
    (layout,) = layouts
    if layout != "causal-lm" and not model.has_vision:
        raise CheckpointError(f"{file}: a LLaVA adapter ({layouts[layout]!r}); the model has no vision tower")
    official = any(w in _INTERNLM2 for w in written.values())
    # every decoder linear the adapter's target_modules select must have its tensors, and
    # enable_lora adapts every decoder linear of a targeted name: those must be in the file too
    leaves = sorted({n.rsplit(".", 1)[-1] for n in written})
    linears = {}
    for name, m in model.llm.named_modules():
        if not (isinstance(m, ALinear) and name.startswith("layers.") and name.count(".") == 3):
            continue
        _, idx, linear = name.split(".", 2)
        peft_name = f"{_LAYERS[layout]}{idx}.{_INTERNLM2_BACK.get(linear, linear) if official else linear}"
        if name.rsplit(".", 1)[-1] in leaves or _targeted(doc, peft_name):
            linears[name] = m
    want = {f"{n}.lora_{ab}.weight": m for n, m in linears.items() for ab in "AB"}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{file}: adapter does not fit the model; missing {missing[:6]}, unexpected {extra[:6]}"
        )
    r, alpha = int(doc["r"]), float(doc["lora_alpha"])
    for name, t in tensors.items():
        m = want[name]
        shape = (r, m.in_features) if name.endswith("lora_A.weight") else (m.out_features, r)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{file}: {name}: adapter {tuple(t.shape)} vs model {shape} (r = {r})")
    enable_lora(model, LoRAConfig(rank=r, alpha=alpha, dropout=float(doc.get("lora_dropout") or 0.0),
                                  targets=leaves))  # fmt: skip
    mods = dict(_lora_modules(model))
    for m in mods.values():  # held in fp32 on a half-precision base, as PEFT holds an adapter
        dtype = torch.promote_types(m.weight.dtype, torch.float32)
        m.lora_A.to(dtype=dtype)
        m.lora_B.to(dtype=dtype)
    with torch.no_grad():
        for name, t in tensors.items():
            lin, ab = name.removesuffix(".weight").rsplit(".lora_", 1)
            getattr(mods[lin], f"lora_{ab}").weight.copy_(t)
    return len(mods)


def merge_lora(model) -> int:
    """Fold the LoRA into the weights (W + alpha/r * B A) and drop it; returns how many linears."""
    mods = list(_lora_modules(model))
    for _, m in mods:
        m.merge_lora()
        m.lora_A = None
        del m.lora_B, m.lora_dropout, m.lora_scaling, m.lora_merged
    model.config.llm.lora = None
    return len(mods)


def read_tensors_file(file: Path):
    from safetensors.torch import load_file

    return load_file(str(file))


__all__ = ["export_peft", "import_peft", "merge_lora"]

"""Declarative freezing and optimiser parameter groups, by glob patterns over parameter names.

Patterns are ``fnmatch`` globs where ``*`` (and ``**``) match across dots:
``connector.*``, ``vision.*``, ``llm.**.plora_*``, ``llm.layers.*.self_attn.*.multiway.1.*``.
A pattern without a wildcard matches that name or everything below it (``vision`` = ``vision.*``).
A pattern starting with ``!`` excludes what it matches, whatever order the patterns come in:
``["llm.*", "!llm.layers.*.mlp.*"]`` trains the LLM but its MLPs.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

log = logging.getLogger("modalign")

# parameters that never get weight decay (besides every 0-/1-d tensor: norms and biases)
NO_DECAY_MARKERS = ("embed_tokens", "position_embedding", "class_embedding", "query_embeds", "latents",
                    "vit_eos", "adapter_gate", "adapter_prompt", "_GN", "locality_bias")  # fmt: skip


def matches(name: str, pattern: str) -> bool:
    if not any(c in pattern for c in "*?["):
        return name == pattern or name.startswith(pattern + ".")
    return fnmatch.fnmatchcase(name, pattern)


def match_any(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches a pattern of ``patterns`` and none of its ``!`` exclusions."""
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    return any(matches(name, p) for p in include) and not any(matches(name, p) for p in exclude)


def param_group_name(name: str) -> str:
    """A readable module group for the trainable/frozen table."""
    parts = name.split(".")
    top = parts[0]
    if top != "llm" or len(parts) < 2:
        return top
    if parts[1] != "layers":
        return f"llm.{parts[1]}"
    for marker, label in (("plora_", "plora"), ("lora_", "lora"), ("adapter_", "adapter")):
        if any(p.startswith(marker) for p in parts):
            return f"llm.layers ({label})"
    if "multiway" in parts:
        i = parts.index("multiway")
        return f"llm.layers (mam {'image' if parts[i + 1] == '1' else 'text'})"
    return "llm.layers"


@dataclass
class FreezeRow:
    group: str
    trainable: int
    frozen: int


def apply_trainable(model: nn.Module, patterns: list[str], *, strict: bool = True) -> list[FreezeRow]:
    """Make exactly the parameters matching ``patterns`` trainable; freeze the rest.

    Returns (and logs) a table of trainable/frozen parameter counts per module group. With
    ``strict``, a pattern that matches no parameter is an error (a typo would silently
    freeze what the user meant to train)."""
    names = [n for n, _ in model.named_parameters()]
    if strict:
        dead = [p for p in patterns if not any(matches(n, p.removeprefix("!")) for n in names)]
        if dead:
            raise ValueError(f"trainable pattern(s) match no parameter: {', '.join(dead)}")
    rows: OrderedDict[str, FreezeRow] = OrderedDict()
    for name, p in model.named_parameters():
        train = match_any(name, patterns)
        p.requires_grad_(train)
        g = param_group_name(name)
        row = rows.setdefault(g, FreezeRow(g, 0, 0))
        if train:
            row.trainable += p.numel()
        else:
            row.frozen += p.numel()
    table = list(rows.values())
    log.info("parameters:\n%s", format_table(table))
    return table


def format_table(rows: list[FreezeRow]) -> str:
    w = max([len(r.group) for r in rows] + [5])
    lines = [f"{'group':<{w}}  {'trainable':>12}  {'frozen':>12}"]
    for r in rows:
        lines.append(f"{r.group:<{w}}  {r.trainable:>12,}  {r.frozen:>12,}")
    tt, tf = sum(r.trainable for r in rows), sum(r.frozen for r in rows)
    lines.append(f"{'total':<{w}}  {tt:>12,}  {tf:>12,}")
    return "\n".join(lines)


def no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, lr_groups: dict[str, float] | None = None
) -> list[dict]:
    """AdamW parameter groups over trainable parameters: the first matching pattern in
    ``lr_groups`` sets a parameter's LR (else ``lr``); norms, biases and embeddings get no
    weight decay. Each group carries a ``name`` for logging."""
    lr_groups = lr_groups or {}
    groups: OrderedDict[tuple[str, bool], dict] = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((pat for pat in lr_groups if matches(name, pat)), "default")
        nd = no_decay(name, p)
        g = groups.setdefault(
            (key, nd),
            {
                "name": f"{key}{' (no decay)' if nd else ''}",
                "params": [],
                "param_names": [],
                "lr": lr_groups.get(key, lr),
                "weight_decay": 0.0 if nd else weight_decay,
            },
        )
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())

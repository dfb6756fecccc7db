"""Model configuration: nested dataclasses, presets by name, (de)serialisation to config.json.

A model is ``MLLMConfig(vision, connector, llm)``. ``vision``/``connector`` are ``None`` for a
text-only model. Every design (LLaVA projector, abstractor, MAM, Partial LoRA ...) is a choice
of fields here, never a subclass.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration is malformed; the message names the offending key."""


@dataclass
class VisionConfig:
    """A ViT covering CLIP (class token, pre-LN, quick-GELU) and SigLIP (no class token,
    tanh-GELU, post-LN) by flags."""

    model_type: str = "clip"  # family name used when exporting (clip | siglip | mplug_owl2)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    class_token: bool = True
    pre_layernorm: bool = True
    post_layernorm: bool = True
    patch_bias: bool = False
    hidden_act: str = "quick_gelu"  # quick_gelu | gelu | gelu_pytorch_tanh
    layer_norm_eps: float = 1e-5
    # Which hidden state feeds the connector: index into (embeddings, layer_1 ... layer_L);
    # -2 is the second-to-last layer (LLaVA). A list concatenates several along channels.
    feature_layer: int | list[int] = -2
    # "patch": drop the class token (if any); "full": keep every token; "drop_first": drop the first
    # token whatever it is (transformers LLaVA's "default" strategy, also on towers without one)
    feature_select: str = "patch"
    feature_post_norm: bool = False  # apply post_layernorm to the selected features (mPLUG-Owl2)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resize_mode: str = "pad"  # "pad" (LLaVA-1.5 pad-to-square, mean colour) | "crop" | "squash"
    # "ixc": InternLM-XComposer2-4KHD/2.5 high-resolution layout — a global view plus
    # image_size tiles, 2x2 patch merge (4x width), learned row-end / separator tokens
    hd_layout: str | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + int(self.class_token)

    @property
    def feature_dim(self) -> int:
        n = 1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        return n * self.hidden_size * (4 if self.hd_layout == "ixc" else 1)

    @property
    def num_features(self) -> int:
        """Tokens per image that reach the connector."""
        n = self.grid**2 + int(self.class_token)
        if self.feature_select == "full":
            return n
        return n - 1 if self.feature_select == "drop_first" or self.class_token else n


@dataclass
class ConnectorConfig:
    """Maps [N, L_in, D_vis] -> [N, L_out, D_llm]. ``type`` picks from the registry in
    ``modalign.models.connectors``; other fields apply to the types that use them."""

    type: str = "mlp2x_gelu"  # linear | mlpNx_gelu | abstractor | resampler | qformer
    hidden_act: str = "gelu"
    bias: bool = True
    # query-based connectors (abstractor, resampler, qformer)
    num_queries: int = 64
    num_layers: int = 6
    num_heads: int = 16
    hidden_size: int = 1024
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    pos_embed: bool = False  # abstractor: mPLUG-Owl2 sin-cos position tables on queries/keys
    # abstractor: a learned attention bias over the patches that starts each query over its own place
    # (the queries laid on a square grid over the patch grid): ``locality`` * exp(-d^2 / 2) at d patch
    # widths from the query's centre. 0 (the papers): no bias, the queries route by content alone
    locality: float = 0.0
    eos_token: bool = True  # abstractor: append the learned ``vit_eos`` token
    cross_attention_every: int = 2  # qformer: a cross-attention block every N layers
    # qformer: the text branch (word + position embeddings, a text FFN in every layer): InstructBLIP's
    # instruction-aware Q-Former (the prompt's ids enter the Q-Former), or BLIP-2's stage-1 heads
    text_vocab_size: int | None = None
    text_max_positions: int = 512
    # qformer: BLIP-2's stage-1 heads, any of itc (vision/text projections to ``embed_dim`` and a
    # learned temperature), itm (image-text matching, 2 logits) and itg (BERT's LM head, tied to the
    # word embeddings); with any of them the text branch only serves the heads (the connector's
    # output reads the queries alone). Needs text_vocab_size.
    text_heads: list[str] = field(default_factory=list)
    embed_dim: int = 256  # qformer itc: the shared image-text space (BLIP-2's image_text_hidden_size)
    # qformer text branch: the ids the stage-1 objective frames a text with (BERT's: [CLS] 101,
    # [SEP] 102, [PAD] 0, BLIP-2's added [DEC] 30522 that starts a text to generate)
    text_cls_id: int = 101
    text_sep_id: int = 102
    text_pad_id: int = 0
    text_dec_id: int = 30522
    # resampler: the width of one attention head (None: hidden_size // num_heads; OpenFlamingo: 64)
    head_dim: int | None = None
    # resampler: a last Linear to the LLM's width; False keeps the latents at hidden_size (OpenFlamingo,
    # whose gated cross-attention reads them at the vision width: CrossAttentionConfig.media_dim)
    output_proj: bool = True


@dataclass
class PLoRAConfig:
    """Partial LoRA: low-rank update applied only at image rows (InternLM-XComposer2)."""

    rank: int = 256
    alpha: float = 256.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]
    )  # fmt: skip


@dataclass
class LoRAConfig:
    """Plain LoRA on chosen linear layers, every modality."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class AdapterConfig:
    """LLaMA-Adapter (V1, V2): learnable prompts on the top ``num_layers`` layers, read by every
    token through their own softmax and scaled by a per-head gate that starts at 0.

    V2's image path (``MLLMConfig.fusion: adapter``): the first ``visual_layers`` layers get visual
    prompts, their own learned prompts plus the image's projected features (the connector's output,
    token by token when it has ``prompt_len`` tokens, else its mean), read only by tokens at or
    after an image, under their own zero-init gates (early fusion). ``bias_tuning``: every decoder
    linear computes s * (W x + b + b_t), b_t = 0 and s = 1 at first. All three start as identity."""

    num_layers: int = 8
    prompt_len: int = 10
    visual_layers: int = 0
    bias_tuning: bool = False


@dataclass
class CrossAttentionConfig:
    """Flamingo's gated cross-attention dense blocks (``models/xattn.py``): before every ``every``-th
    decoder layer (layers every-1, 2*every-1, ...: OpenFlamingo's ``cross_attn_every_n_layers``)
    text rows attend to the visual latents of the image before them; the attention output and a
    feed-forward layer are each scaled by tanh of a gate that starts at 0 (identity at init)."""

    every: int = 4
    num_heads: int = 8
    head_dim: int = 64
    intermediate_size: int | None = None  # the feed-forward width; None: 4 x hidden_size
    media_dim: int | None = None  # width of the visual latents (the connector's output); None: hidden_size
    # True: a token sees the latents of the latest image at or before it only (Flamingo); False:
    # of every image at or before it. Tokens before the first image see none.
    only_immediate: bool = True
    layer_norm_eps: float = 1e-5


@dataclass
class LLMConfig:
    """The language model: the Llama family (Llama 2/3, Mistral, Qwen2, InternLM2) and, by the
    ``norm`` / ``position`` / ``mlp`` switches, OPT; ``model_type: t5`` is the T5 encoder-decoder
    (``models/t5.py``)."""

    model_type: str = "llama"  # family name used when exporting (llama | mistral | qwen2 | internlm2)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": linear|dynamic|llama3, ...}
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # one ``qkv_proj`` (InternLM2 ``wqkv``) instead of q/k/v
    # architecture variants beyond the Llama family (OPT: layer, learned, plain)
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    position: str = "rope"  # rope | learned (absolute positions, table rows offset by position_offset)
    position_offset: int = 0
    mlp: str = "gated"  # gated: down(act(gate x) * up x) | plain: down(act(up x))
    layer_norm_eps: float = 1e-5  # norm: layer
    # encoder-decoder (model_type "t5"): decoder depth, relative position buckets, decoder start id
    num_decoder_layers: int | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    decoder_start_token_id: int | None = None
    scale_head: bool = False  # T5 v1.0: the decoder output times d_model^-0.5 before the (tied) head
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None: all full
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # modality-aware parts (switched on by config, applied in modalign.models.modality)
    mam: bool = False
    plora: PLoRAConfig | None = None
    lora: LoRAConfig | None = None
    adapter: AdapterConfig | None = None
    cross_attention: CrossAttentionConfig | None = None  # Flamingo blocks (MLLMConfig.fusion)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_encoder_decoder(self) -> bool:
        return self.model_type == "t5"


@dataclass
class MLLMConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig | None = None
    connector: ConnectorConfig | None = None
    # id of the image placeholder token in ``input_ids``
    image_token_id: int | None = None
    # "per_token": one placeholder per visual token (transformers LLaVA);
    # "per_image": one placeholder per image, expanded by the splice (mPLUG-Owl2's -200)
    placeholder: str = "per_token"
    # how visual tokens reach the decoder: "splice" puts them into the sequence at the placeholders
    # (``placeholder``); "cross_attention" (Flamingo) keeps the image token as an ordinary token
    # marking where the image stands and feeds the connector's output to the decoder's gated
    # cross-attention blocks (``llm.cross_attention``); "adapter" (LLaMA-Adapter V2) likewise keeps
    # the image token and adds the connector's output to the visual prompts of the first
    # ``llm.adapter.visual_layers`` layers; ``placeholder`` does not apply to either
    fusion: str = "splice"
    # the format the checkpoint came from (informational; e.g. "hf-llava", "mplug_owl2")
    source_format: str | None = None

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLLMConfig:
        return _build(cls, d, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"modalign": self.to_dict()}, indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str) -> MLLMConfig:
        from modalign.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()


def _build(cls: type, d: Any, path: str) -> Any:
    """Build dataclass ``cls`` from dict ``d``, naming the bad key on error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    required = [n for n, f in fields.items() if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and n not in d]  # fmt: skip
    if required:
        raise ConfigError(f"{path}: missing required key(s) {', '.join(required)}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, path): _coerce(val_tp, v, f"{path}[{k!r}]") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value

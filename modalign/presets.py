"""Named model configurations (``MLLMConfig.from_name``): the papers' full-scale shapes and tiny
ones for tests and the quickstart. Each is a function so callers get a fresh object."""

from __future__ import annotations

from collections.abc import Callable

from modalign.config import ConnectorConfig, LLMConfig, MLLMConfig, PLoRAConfig, VisionConfig

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)  # fmt: skip
# the full-scale models start from released text-only LLMs: one placeholder id per image that is
# no token of any vocabulary (the original LLaVA code's IMAGE_TOKEN_INDEX), expanded by the splice
IMAGE = -200
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                    patch_size=14)  # fmt: skip


def llava_15_7b() -> MLLMConfig:
    return MLLMConfig(
        llm=LLMConfig(**LLAMA2_7B, pad_token_id=0),
        vision=VisionConfig(**CLIP_L14_336, feature_layer=-2, feature_select="patch"),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=IMAGE,
        placeholder="per_image",
    )


def mplug_owl_7b() -> MLLMConfig:
    return MLLMConfig(
        llm=LLMConfig(**(LLAMA2_7B | dict(max_position_embeddings=2048, rms_norm_eps=1e-6))),
        vision=VisionConfig(
            **(CLIP_L14_336 | dict(image_size=224)),
            feature_layer=-1,
            feature_select="full",
            feature_post_norm=True,
            resize_mode="squash",
            layer_norm_eps=1e-6,
        ),  # fmt: skip
        connector=ConnectorConfig(
            type="abstractor",
            num_queries=64,
            num_layers=6,
            num_heads=16,
            hidden_size=1024,
            intermediate_size=2816,
        ),  # fmt: skip
        image_token_id=IMAGE,
        placeholder="per_image",
    )


def mplug_owl2_7b() -> MLLMConfig:
    cfg = mplug_owl_7b()
    cfg.llm = LLMConfig(**LLAMA2_7B, mam=True)
    cfg.vision.image_size = 448
    cfg.connector.pos_embed = True
    return cfg


def xcomposer2_vl_7b() -> MLLMConfig:
    return MLLMConfig(
        llm=LLMConfig(
            model_type="internlm2",
            vocab_size=92544,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            rope_theta=1e6,
            max_position_embeddings=32768,
            fused_qkv=True,
            plora=PLoRAConfig(rank=256, alpha=256),
        ),  # fmt: skip
        vision=VisionConfig(
            **(CLIP_L14_336 | dict(image_size=490)), feature_layer=-1, feature_select="patch"
        ),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=IMAGE,
        placeholder="per_image",
    )


def blip2_style_7b() -> MLLMConfig:
    return MLLMConfig(
        llm=LLMConfig(**LLAMA2_7B),
        vision=VisionConfig(**(CLIP_L14_336 | dict(image_size=224)), feature_layer=-2, feature_select="full"),
        connector=ConnectorConfig(
            type="resampler",
            num_queries=32,
            num_layers=6,
            num_heads=16,
            hidden_size=1024,
            intermediate_size=4096,
        ),  # fmt: skip
        image_token_id=IMAGE,
        placeholder="per_image",
    )


def tiny_shapes() -> MLLMConfig:
    """The quickstart's miniature LLaVA-shaped model for ShapesWorld (96-px images, 32-px
    patches: one visual token per grid cell, 9 per image; a 4-layer 128-wide decoder over a
    1024-token BPE)."""
    return MLLMConfig(
        llm=LLMConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=352,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),  # fmt: skip
        vision=VisionConfig(
            hidden_size=96,
            intermediate_size=256,
            num_layers=4,
            num_heads=4,
            image_size=96,
            patch_size=32,
            feature_layer=-2,
            feature_select="patch",
            resize_mode="squash",
        ),  # fmt: skip
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=3,
        placeholder="per_token",
    )


def tiny_llava() -> MLLMConfig:
    """A small LLaVA shape for tests and CPU demos: 64-px images, 8-px patches (64 visual
    tokens), one placeholder per image."""
    cfg = tiny_shapes()
    cfg.llm.vocab_size, cfg.llm.intermediate_size = 512, 344
    cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.resize_mode = 64, 8, "pad"
    cfg.placeholder = "per_image"
    return cfg


def blip2_opt_27b() -> MLLMConfig:
    """BLIP-2 as trained from scratch (ViT-g/14 + Q-Former with its stage-1 heads + OPT-2.7B): the
    ``blip2`` recipe's shape; the tower and LLM come from their releases."""
    from modalign.checkpoints.opt import llm_config_from_opt

    return MLLMConfig(
        llm=llm_config_from_opt(
            dict(
                vocab_size=50272,
                hidden_size=2560,
                ffn_dim=10240,
                num_hidden_layers=32,
                num_attention_heads=32,
                eos_token_id=50118,
            )
        ),  # fmt: skip
        vision=VisionConfig(
            model_type="blip2",
            hidden_size=1408,
            intermediate_size=6144,
            num_layers=39,
            num_heads=16,
            image_size=224,
            patch_size=14,
            pre_layernorm=False,
            post_layernorm=True,
            patch_bias=True,
            layer_norm_eps=1e-6,
            feature_layer=-1,
            feature_select="full",
            feature_post_norm=True,
            resize_mode="squash",
        ),  # fmt: skip
        connector=ConnectorConfig(
            type="qformer",
            num_queries=32,
            num_layers=12,
            num_heads=12,
            hidden_size=768,
            intermediate_size=3072,
            layer_norm_eps=1e-12,
            cross_attention_every=2,
            text_vocab_size=30523,
            text_heads=["itc", "itm", "itg"],
        ),  # fmt: skip
        image_token_id=50265,
        placeholder="per_token",
    )


def tiny_blip2() -> MLLMConfig:
    """The miniature with a BLIP-2 Q-Former (8 queries, 2 layers, cross-attention in each, the
    stage-1 heads) over the tiny tower; its text branch reads the miniature's BPE, framing a text
    with <s> as [CLS], </s> as [SEP] and <|im_start|> as [DEC]."""
    cfg = tiny_shapes()
    cfg.connector = ConnectorConfig(type="qformer", num_queries=8, num_layers=2, num_heads=4, hidden_size=96,
                                    intermediate_size=256, layer_norm_eps=1e-12, cross_attention_every=1,
                                    text_vocab_size=1024, text_max_positions=64, text_heads=["itc", "itm", "itg"],
                                    embed_dim=64, text_cls_id=1, text_sep_id=2, text_pad_id=0, text_dec_id=4)  # fmt: skip
    return cfg


PRESETS: dict[str, Callable[[], MLLMConfig]] = {
    "blip2-opt-2.7b": blip2_opt_27b,
    "tiny-blip2": tiny_blip2,
    "tiny-shapes": tiny_shapes,
    "llava-1.5-7b": llava_15_7b,
    "mplug-owl-7b": mplug_owl_7b,
    "mplug-owl2-7b": mplug_owl2_7b,
    "xcomposer2-vl-7b": xcomposer2_vl_7b,
    "blip2-style-7b": blip2_style_7b,
    "tiny-llava": tiny_llava,
}

"""The one model class for every design: vision -> connector -> splice -> decoder.

    pixel_values [N,3,S,S] --VisionTower--> [N, L_in, D_vis] --connector--> [N, L_out, D]
    input_ids [B,T] --embed--> [B,T,D] --splice(visual tokens at placeholders)--> decoder
                                         modality_ids [B,T]: 0 text, 1 image

With ``fusion: cross_attention`` (Flamingo) nothing is spliced: the image token stays in the
sequence and the visual tokens reach the decoder's gated cross-attention blocks (``models/xattn.py``);
with ``fusion: adapter`` (LLaMA-Adapter V2) they are added to the visual prompts of the decoder's
first ``llm.adapter.visual_layers`` layers the same way.

A text-only LLM is an ``MLLM`` whose config has no vision part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import MLLMConfig
from modalign.models.connectors import build_connector
from modalign.models.decoder import LLM, KVCache
from modalign.models.t5 import T5LM, shift_right
from modalign.models.vision import VisionTower
from modalign.models.xattn import Media

IGNORE_INDEX = -100


class PlaceholderMismatch(ValueError):
    """The number of image placeholders does not match the number of visual tokens."""


@dataclass
class MLLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # after the splice (per-image placeholders grow it)
    num_tokens: int | None = None  # supervised tokens behind ``loss``
    seq_ids: torch.Tensor | None = None  # packed rows: each position's sample, after the splice


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor
    modality_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    media: Media | None = None  # fusion cross_attention / adapter: what the decoder reads the images from


def splice(
    embed: nn.Embedding,
    input_ids: torch.Tensor,
    image_tokens: torch.Tensor | None,
    image_token_id: int | None,
    placeholder: str = "per_token",
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Spliced:
    """Put visual tokens [N_img, L, D] (or a list of [L_i, D]) into the text embeddings at the
    placeholders.

    ``per_token``: ``input_ids`` already holds one placeholder per visual token (N_img * L).
    ``per_image``: one placeholder per image, each replaced by that image's L rows; the
    sequence grows and rows are right-padded to the longest. Images are consumed in order,
    batch row by row, left to right. A count mismatch raises ``PlaceholderMismatch``.
    """
    is_ph = (
        input_ids == image_token_id
        if image_token_id is not None
        else torch.zeros_like(input_ids, dtype=torch.bool)
    )
    n_ph = int(is_ph.sum())
    if image_tokens is None:
        if n_ph:
            raise PlaceholderMismatch(
                f"input_ids hold {n_ph} image placeholder(s) (id {image_token_id}) but no images were given"
            )
        emb = embed(input_ids)
        return Spliced(emb, torch.zeros_like(input_ids), attention_mask, labels)
    n_img = len(image_tokens)
    lengths = [int(x.shape[0]) for x in image_tokens]
    if placeholder == "per_token":
        total = sum(lengths)
        if n_ph != total:
            per = (
                f"x {lengths[0]} visual tokens" if len(set(lengths)) == 1 else f"with {lengths} visual tokens"
            )
            raise PlaceholderMismatch(
                f"input_ids hold {n_ph} image placeholder tokens but {n_img} image(s) {per} = {total}; "
                f"each image needs one placeholder per visual token"
            )
        flat = image_tokens.flatten(0, 1) if torch.is_tensor(image_tokens) else torch.cat(list(image_tokens))
        emb = embed(input_ids.masked_fill(is_ph, 0))
        emb = emb.masked_scatter(is_ph.unsqueeze(-1), flat.to(emb.dtype))
        if labels is not None:
            labels = labels.masked_fill(is_ph, IGNORE_INDEX)
        return Spliced(emb, is_ph.long(), attention_mask, labels)
    if placeholder != "per_image":
        raise ValueError(f"unknown placeholder mode {placeholder!r}; use per_token or per_image")
    if n_ph != n_img:
        raise PlaceholderMismatch(
            f"input_ids hold {n_ph} image placeholder(s) (id {image_token_id}) but {n_img} image(s) "
            f"were given; each image needs exactly one placeholder"
        )
    return _splice_per_image(embed, input_ids, is_ph, image_tokens, attention_mask, labels)


def _splice_per_image(embed, input_ids, is_ph, image_tokens, attention_mask, labels) -> Spliced:
    b, t = input_ids.shape
    text = embed(input_ids.masked_fill(is_ph, 0))
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows, k = [], 0
    for r in range(b):
        emb_parts, mod_parts, mask_parts, lab_parts = [], [], [], []
        cut = 0
        for p in is_ph[r].nonzero().flatten().tolist():
            n_tok = image_tokens[k].shape[0]
            emb_parts += [text[r, cut:p], image_tokens[k].to(text.dtype)]
            mod_parts += [torch.zeros(p - cut, dtype=torch.long), torch.ones(n_tok, dtype=torch.long)]
            mask_parts += [mask[r, cut:p], mask[r, p].expand(n_tok)]
            if labels is not None:
                lab_parts += [
                    labels[r, cut:p],
                    torch.full((n_tok,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device),
                ]
            cut, k = p + 1, k + 1
        emb_parts.append(text[r, cut:])
        mod_parts.append(torch.zeros(t - cut, dtype=torch.long))
        mask_parts.append(mask[r, cut:])
        if labels is not None:
            lab_parts.append(labels[r, cut:])
        rows.append((emb_parts, mod_parts, mask_parts, lab_parts))
    lengths = [sum(e.shape[0] for e in row[0]) for row in rows]
    n = max(lengths)
    dev = input_ids.device
    out_emb = text.new_zeros(b, n, text.shape[-1])
    out_mod = torch.zeros(b, n, dtype=torch.long, device=dev)
    out_mask = torch.zeros(b, n, dtype=mask.dtype, device=dev)
    out_lab = None if labels is None else torch.full((b, n), IGNORE_INDEX, dtype=labels.dtype, device=dev)
    for r, (e, m, a, lab) in enumerate(rows):
        ln = lengths[r]
        out_emb[r, :ln] = torch.cat(e)
        out_mod[r, :ln] = torch.cat(m).to(dev)
        out_mask[r, :ln] = torch.cat(a)
        if out_lab is not None:
            out_lab[r, :ln] = torch.cat(lab).to(dev)
    keep_mask = attention_mask is not None or min(lengths) != n
    return Spliced(out_emb, out_mod, out_mask if keep_mask else None, out_lab)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labels != -100 (computed in fp32), and how many
    tokens it averages."""
    keep = labels[:, 1:].to(logits.device) != IGNORE_INDEX
    n = int(keep.sum())
    loss = F.cross_entropy(
        logits[:, :-1][keep].float(), labels[:, 1:].to(logits.device)[keep], reduction="sum"
    )
    return loss / max(n, 1), n


def mask_sample_starts(labels: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows: labels with each sample's first token ignored, so that no loss term predicts
    a sample's first token from the previous sample's last one."""
    first = torch.ones_like(seq_ids, dtype=torch.bool)
    first[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return labels.masked_fill(first.to(labels.device), IGNORE_INDEX)


def _media_dim(c: MLLMConfig) -> int:
    """The connector's output width: the decoder's, or what the cross-attention blocks read."""
    x = c.llm.cross_attention
    return (x.media_dim or c.llm.hidden_size) if c.fusion == "cross_attention" and x else c.llm.hidden_size


def _check_fusion(c: MLLMConfig) -> None:
    if c.fusion not in ("splice", "cross_attention", "adapter"):
        raise ValueError(f"unknown fusion {c.fusion!r}; use splice, cross_attention or adapter")
    a = c.llm.adapter
    if c.vision is not None and a is not None and a.visual_layers and c.fusion != "adapter":
        raise ValueError(f"llm.adapter.visual_layers (visual prompts) need fusion adapter, got {c.fusion}")
    if c.fusion == "splice" or c.vision is None:
        return
    why = None
    if c.fusion == "cross_attention" and c.llm.cross_attention is None:
        why = "needs llm.cross_attention (the gated blocks that read the images)"
    elif c.fusion == "adapter" and c.llm.cross_attention is not None:
        why = "reads the images with visual prompts; llm.cross_attention blocks need fusion cross_attention"
    elif c.llm.is_encoder_decoder or c.vision.hd_layout:
        why = "supports decoder-only LLMs and one image tensor each (no hd_layout)"
    elif c.image_token_id is None or not 0 <= c.image_token_id < c.llm.vocab_size:
        why = f"needs an image_token_id in the vocabulary (the token stays a token), got {c.image_token_id}"
    if why:
        raise ValueError(f"fusion {c.fusion} {why}")


def _has_images(pixel_values) -> bool:
    return pixel_values is not None and len(pixel_values) > 0


class MLLM(nn.Module):
    """Vision encoder + connector + Llama-family decoder, configured by ``MLLMConfig``."""

    def __init__(self, config: MLLMConfig):
        super().__init__()
        self.config = config
        if config.vision is not None and config.connector is None:
            raise ValueError("a model with a vision tower needs a connector config")
        _check_fusion(config)
        for name in self.part_names():
            setattr(self, name, self.new_part(name))

    def part_names(self) -> tuple[str, ...]:
        """The model's parts, in construction order: (vision, connector,) llm."""
        return ("vision", "connector", "llm") if self.config.vision is not None else ("llm",)

    def new_part(self, name: str) -> nn.Module:
        """A freshly initialised part as the config describes it (vision, connector or llm)."""
        c = self.config
        if name == "vision":
            return VisionTower(c.vision)
        if name == "connector":
            return build_connector(c.connector, c.vision.feature_dim, _media_dim(c), c.vision.num_features)
        if name == "llm":
            return T5LM(c.llm) if c.llm.is_encoder_decoder else LLM(c.llm)
        raise ValueError(f"unknown part {name!r}; known: vision, connector, llm")

    # ------------------------------------------------------------------ images

    @property
    def has_vision(self) -> bool:
        return self.config.vision is not None

    def num_image_tokens(self, image_hw: tuple[int, int] | None = None) -> int:
        """Visual tokens one image contributes to the LLM sequence (for the HD layout this
        depends on the image's height and width in pixels)."""
        if not self.has_vision:
            return 0
        if self.config.fusion in ("cross_attention", "adapter"):  # the image token; the latents go aside
            return 1
        if self.config.vision.hd_layout:
            t = self.config.vision.image_size
            h, w = image_hw or (t, t)
            return self.vision.hd_num_tokens(h // t, w // t)
        return self.connector.num_output_tokens(self.config.vision.num_features)

    def encode_images(self, pixel_values=None, image_features=None, **connector_inputs):
        """[N, 3, S, S] -> visual tokens [N, L_out, D_llm]. HD layouts take a list of
        [3, H_i, W_i] (or one [N, 3, H, W] tensor) and return a list of [L_i, D_llm].
        ``image_features``: the vision tower's output [N, L_in, D_vis] computed beforehand (e.g.
        a trainer's cache of a frozen tower), used instead of running the tower on pixels.
        ``connector_inputs``: e.g. InstructBLIP's ``qformer_input_ids`` (one row per image)."""
        if not self.has_vision:
            raise ValueError("this model has no vision tower; it cannot take pixel_values")
        extra = {k: v for k, v in connector_inputs.items() if v is not None}
        if image_features is not None:
            return self.connector(image_features, **extra)
        if self.config.vision.hd_layout:
            return [self.connector(self.vision.encode_hd(im)[None])[0] for im in pixel_values]
        return self.connector(self.vision(pixel_values), **extra)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        placeholder: str | None = None,
        image_features: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        **connector_inputs,
    ) -> Spliced:
        """Token embeddings with the visual tokens spliced in, plus modality ids. The visual
        tokens come from ``image_tokens`` (connector outputs), ``image_features`` (vision tower
        outputs) or ``pixel_values``. ``placeholder`` overrides the config's mode (the engine
        pre-expands per-image placeholders). With ``fusion: cross_attention`` or ``adapter`` nothing
        is spliced: the embeddings are the ids' and the visual tokens come back as ``media``
        (``seq_ids``: packed rows, whose samples see their own images only)."""
        if image_tokens is None and (image_features is not None or _has_images(pixel_values)):
            image_tokens = self.encode_images(pixel_values, image_features, **connector_inputs)
        if self.config.fusion in ("cross_attention", "adapter"):
            return self._embed_media(input_ids, image_tokens, attention_mask, labels, seq_ids)
        return splice(
            self.llm.embed_tokens,
            input_ids,
            image_tokens,
            self.config.image_token_id,
            placeholder or self.config.placeholder,
            attention_mask,
            labels,
        )

    def _embed_media(self, input_ids, latents, attention_mask, labels, seq_ids) -> Spliced:
        """Flamingo: each image token stays in the sequence (an ordinary token; its label is
        ignored) and marks where its image stands; the image's latents go to the cross-attention
        blocks (LLaMA-Adapter V2, ``fusion: adapter``: to the visual prompts). Images are consumed
        row by row, left to right, one per image token."""
        tok = self.config.image_token_id
        is_img = input_ids == tok
        n_tok, n_img = int(is_img.sum()), 0 if latents is None else len(latents)
        if n_tok != n_img:
            raise PlaceholderMismatch(
                f"input_ids hold {n_tok} image token(s) (id {tok}) but {n_img} image(s) were given; "
                f"each image needs exactly one"
            )
        a = self.config.llm.adapter
        if n_img and self.config.fusion == "adapter" and (a is None or not a.visual_layers):
            raise ValueError("fusion adapter: the decoder has no visual prompts (llm.adapter.visual_layers)")
        emb = self.llm.embed_tokens(input_ids)
        if labels is not None:
            labels = labels.masked_fill(is_img.to(labels.device), IGNORE_INDEX)
        media = None
        # training without images (the decoder's mode: a trainer may hold the parts, not the MLLM):
        if n_img or self.llm.training:  # one zero latent nobody attends to
            # keeps the blocks' attention in the graph (DDP)
            if not n_img:
                latents = emb.new_zeros(0, 1, _media_dim(self.config))
            media = Media.from_ids(input_ids, tok, latents.to(emb.dtype), seq_ids)
        return Spliced(emb, torch.zeros_like(input_ids), attention_mask, labels, media)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        media: Media | None = None,
    ) -> MLLMOutput:
        """``input_ids`` [B, T] with image placeholders and ``pixel_values`` [N, 3, S, S], as the
        reference class for the checkpoint takes them (InstructBLIP also ``qformer_input_ids``);
        or ``inputs_embeds`` [B, T, D] with ``modality_ids`` [B, T] (from ``embed``). With a
        ``cache`` holding a prompt, ``input_ids`` are new text tokens. ``image_features``: the
        vision tower's output, computed beforehand, instead of ``pixel_values``. With ``labels``
        the output carries the mean next-token loss over labels != -100. An encoder-decoder LLM
        (T5) reads the spliced prompt with its encoder; its decoder takes ``decoder_input_ids``
        (or the ``labels`` shifted right) and ``logits`` / ``loss`` are the decoder's.
        ``seq_ids`` [B, T] instead of ``attention_mask``: packed rows (several samples a row, numbered
        1, 2, ... in ``input_ids`` order, 0 padding; ``data/collate.py``'s ``collate_packed``), each
        sample attended and positioned alone and its first label ignored; the output's ``seq_ids``
        are the spliced ones. ``media``: with ``inputs_embeds`` of a cross-attention model, the
        ``embed`` output's ``media`` (``fusion`` cross_attention or adapter; a cache keeps the prompt's)."""
        packed = seq_ids is not None
        if packed and (attention_mask is not None or cache is not None or self.config.llm.is_encoder_decoder):
            raise ValueError("seq_ids (packed rows) replace attention_mask; a decoder-only model, no cache")
        if self.config.llm.is_encoder_decoder:
            return self._seq2seq(input_ids, pixel_values, attention_mask, labels, inputs_embeds, decoder_input_ids,
                                 image_features, qformer_input_ids, qformer_attention_mask)  # fmt: skip
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            decoding = cache is not None and cache.length > 0
            if decoding and pixel_values is not None:
                raise ValueError("pixel_values belong to the prompt, not to decode steps")
            if decoding and labels is None and modality_ids is None:  # new text tokens: no splice
                logits = self.llm(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, logits_to_keep=logits_to_keep)  # fmt: skip
                return MLLMOutput(logits=logits, attention_mask=attention_mask)
            sp = self.embed(input_ids, pixel_values, seq_ids if packed else attention_mask, labels,
                            image_features=image_features, qformer_input_ids=qformer_input_ids,
                            qformer_attention_mask=qformer_attention_mask, seq_ids=seq_ids)  # fmt: skip
            inputs_embeds, attention_mask, labels = sp.inputs_embeds, sp.attention_mask, sp.labels
            media = sp.media
            if packed:  # the splice carried each sample's number onto its visual tokens
                seq_ids, attention_mask = attention_mask, None
            # all-text inference skips the image branches (bit-identical to the base model); in
            # training the ids are always passed so routed parameters stay in the graph (DDP)
            if modality_ids is None and (
                pixel_values is not None or image_features is not None or self.training
            ):
                modality_ids = sp.modality_ids
        logits = self.llm(
            inputs_embeds=inputs_embeds,
            modality_ids=modality_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            logits_to_keep=logits_to_keep,
            seq_ids=seq_ids,
            media=media,
        )
        out = MLLMOutput(
            logits=logits, modality_ids=modality_ids, attention_mask=attention_mask, seq_ids=seq_ids
        )
        if labels is not None:
            if packed:
                labels = mask_sample_starts(labels, seq_ids)
            out.loss, out.num_tokens = causal_lm_loss(logits, labels)
        return out

    def _seq2seq(self, input_ids, pixel_values, attention_mask, labels, inputs_embeds, decoder_input_ids,
                 image_features, qformer_input_ids, qformer_attention_mask) -> MLLMOutput:  # fmt: skip
        if inputs_embeds is None:
            sp = self.embed(input_ids, pixel_values, attention_mask, image_features=image_features,
                            qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)  # fmt: skip
            inputs_embeds, attention_mask = sp.inputs_embeds, sp.attention_mask
        c = self.config.llm
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id or 0, c.pad_token_id or 0)
        logits = self.llm(inputs_embeds, attention_mask, decoder_input_ids)
        out = MLLMOutput(logits=logits, attention_mask=attention_mask)
        if labels is not None:
            keep = labels != IGNORE_INDEX
            out.num_tokens = int(keep.sum())
            out.loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum") / max(
                out.num_tokens, 1
            )
        return out

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None,
                        base: str | Path | None = None, vision_tower: str | Path | None = None) -> MLLM:  # fmt: skip
        """Load a native modalign directory or any supported external format (``base``: the base
        LLM of a training-run folder; ``vision_tower``: a tower the checkpoint names but lacks)."""
        from modalign.checkpoints import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, base=base, vision_tower=vision_tower)

    def save_pretrained(self, path: str | Path, keep_tokenizer: bool = True) -> None:
        """Write ``config.json`` + ``model.safetensors`` (native format), atomically; tokenizer
        files already in ``path`` stay unless ``keep_tokenizer`` is False."""
        from modalign.checkpoints.native import save_native

        save_native(self, path, keep_tokenizer=keep_tokenizer)

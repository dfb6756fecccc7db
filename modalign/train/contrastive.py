"""CLIP-style pretraining of the vision tower on image-caption pairs (quickstart stage 0).

The text side is the (frozen) language model: mean of its last hidden states over the caption.
Image side: the class token after the post-LayerNorm (as CLIP; mean-pooling the patches does not
learn here: it throws away where things are). Both are projected to a shared space and
trained with the symmetric InfoNCE loss and a learned temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.conversation import BadSample, Conversation
from modalign.data.datasets import Example


class ContrastiveModel(nn.Module):
    """Wraps an MLLM's ``vision`` and ``llm``; adds ``clip_image_proj``/``clip_text_proj``."""

    def __init__(self, mllm: nn.Module, dim: int = 128):
        super().__init__()
        self.vision, self.llm = mllm.vision, mllm.llm
        self.clip_image_proj = nn.Linear(mllm.config.vision.hidden_size, dim, bias=False)
        self.clip_text_proj = nn.Linear(mllm.config.llm.hidden_size, dim, bias=False)
        self.clip_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixel_values, input_ids, attention_mask):
        h = self.vision.hidden_states(pixel_values)[-1]
        if self.vision.cfg.class_token:  # CLIP: the class token after the post-LayerNorm
            img = self.vision.post_layernorm(h[:, 0]) if self.vision.cfg.post_layernorm else h[:, 0]
        else:  # no class token (SigLIP-style towers): mean of the patches
            img = h.mean(1)
        h = self.llm(input_ids=input_ids, attention_mask=attention_mask, return_hidden=True)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        txt = (h * m).sum(1) / m.sum(1).clamp(min=1)
        a = F.normalize(self.clip_image_proj(img), dim=-1)
        b = F.normalize(self.clip_text_proj(txt), dim=-1)
        logits = a @ b.t() * self.clip_logit_scale.exp().clamp(max=100)
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def contrastive_loss(model, batch, device):
    loss = model(
        batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device)
    )
    return loss, int(batch["attention_mask"].sum())


class CaptionProcessor:
    """Conversation with one image -> Example(caption ids, [pixels]); the caption is the first
    assistant reply."""

    def __init__(self, tok, image_root, image_processor, max_length: int = 128):
        from modalign.data.datasets import SampleProcessor

        self._images = SampleProcessor(tok, None, image_root, image_processor)
        self.tok, self.max_length = tok, max_length
        self.image_tokens = 0

    def __call__(self, s) -> Example:
        if isinstance(s, BadSample):
            raise s
        if not isinstance(s, Conversation) or len(s.images) != 1:
            raise BadSample(
                "image count mismatch",
                "contrastive pretraining needs exactly one image",
                getattr(s, "id", None),
            )
        cap = next(m.content for m in s.messages if m.role == "assistant")
        ids = self.tok.encode(cap)[: self.max_length]
        return Example(s.id, ids, ids, [self._images._image(s.images[0], s.id)], s.source)

"""Text-only perplexity of a model on a text corpus (how much language ability a multimodal
training stage kept)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modalign.data.datasets import load_samples
from modalign.data.tokenizer import Tokenizer
from modalign.models.mllm import MLLM


@torch.inference_mode()
def text_perplexity(model: MLLM, tok: Tokenizer, text_file: str | Path, batch_size: int = 32,
                    max_length: int = 256) -> float:  # fmt: skip
    """exp(mean next-token NLL) over a text JSONL file (all-text inputs: no image branches)."""
    model.eval()
    docs = [s.text for s in load_samples(text_file) if hasattr(s, "text")]
    nll, n = 0.0, 0
    dev = model.llm.embed_tokens.weight.device
    for s in range(0, len(docs), batch_size):
        rows = [([tok.bos_id] + tok.encode(d) + [tok.eos_id])[:max_length] for d in docs[s : s + batch_size]]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out = model(ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev))
        nll += out.loss.item() * out.num_tokens
        n += out.num_tokens
    return math.exp(nll / max(n, 1))

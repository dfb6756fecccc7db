"""PNP-VQA (Tiong et al. 2022, "Plug-and-Play VQA"): question-guided captions, then a QA model.

1. Image-question matching: the question (its ``?`` stripped) against the image through an
   image-text matching head (here BLIP-2's Q-Former ``itm`` head; the paper used BLIP's). A
   GradCAM over one layer's cross-attention gives each image patch a relevance to the question:
   the attention probabilities times the positive part of the gradient of the matching logit
   (the raw "match" logit, not a softmax) with respect to them, averaged over the heads and over
   the tokens that cross-attend (BLIP: the question's tokens; the Q-Former: its queries, which are
   what attends to the image there). No normalisation.
2. For each caption, ``num_patches`` patches drawn without replacement with probabilities
   proportional to the relevance; the captioner describes those patches alone, sampling with
   top-k 50. A caption contained in one already kept is dropped; sampling goes on until
   ``num_captions`` are kept (or ``max_tries`` drawn).
3. A QA model answers the question over the captions. The paper's is UnifiedQA with
   fusion-in-decoder, which reads ``"<question> \\n <caption>. <caption>. "`` passages
   (``qa_passages``). Here a prompted LLM stands in for it: ``qa_format`` renders the question and
   the captions joined (``"<caption>. <caption>."``) into one prompt for a completer.

Left out: LAVIS's filter that keeps a caption only where the matching head scores it >= 0.5 (used
by Img2LLM's captions), and its choice of cross-attention layer (block 7 of BLIP's 12; here the
last by default, ``layer``). The matching model's patch grid is resampled onto the captioner's
where they differ (``to_grid``).

Patches "alone": PNP-VQA's BLIP captioner cross-attends to the selected patches' features only.
To let any captioner (a modalign model or a served endpoint) take part, the patches that are not
selected are painted over with the image's background (the mean colour of its border pixels)
before captioning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from modalign.pipelines.pica import Completer


def itm_ids(question: str, tok, cfg) -> torch.Tensor:
    """The matching head's text: ``[CLS] words [SEP]`` (``connector.text_cls_id`` ...), the
    question's ``?`` stripped as the paper's code strips it, cut to the text positions."""
    words = tok.encode(question.strip().strip("?"))[: cfg.text_max_positions - 2]
    return torch.tensor([[cfg.text_cls_id, *words, cfg.text_sep_id]])


def question_gradcam(model, pixel_values: torch.Tensor, question: str, tok, layer: int = -1) -> torch.Tensor:
    """Each patch's relevance to ``question`` [P]: GradCAM of the Q-Former's ``itm`` "match" logit
    over the cross-attention of layer ``layer`` (the index among the layers that cross-attend)."""
    conn = model.connector
    if not hasattr(conn, "itm_head"):
        raise ValueError("PNP-VQA's matching model needs a Q-Former with an itm head (connector.text_heads)")
    crosses = [
        lyr.crossattention.attention for lyr in conn.qformer.encoder.layer if lyr.crossattention is not None
    ]
    att = crosses[layer]
    dev = next(model.parameters()).device
    ids = itm_ids(question, tok, conn.cfg).to(dev)
    with torch.no_grad():
        image = model.vision(pixel_values[None].to(dev))
    att.keep_probs = True
    try:
        with torch.enable_grad():
            logit = conn.itm_logits(image, ids)[0, 1]
            probs = att.probs
            (grad,) = torch.autograd.grad(logit, probs)
    finally:
        att.keep_probs, att.probs = False, None
    cam = (probs * grad.clamp(min=0)).mean(1)  # [1, Q, L]: over the heads
    cam = cam[0].mean(0).detach().float().cpu()  # over the tokens that cross-attend
    v = model.config.vision
    grid = (v.image_size // v.patch_size) ** 2
    return cam[cam.shape[0] - grid :]  # the patches (a tower that keeps its CLS token: dropped)


def to_grid(relevance: torch.Tensor, grid: int) -> torch.Tensor:
    """A square patch map [g * g] resampled to ``grid`` x ``grid`` (area-weighted), flattened:
    the matching model's patches onto the captioner's."""
    g = math.isqrt(relevance.numel())
    if g * g != relevance.numel():
        raise ValueError(f"PNP-VQA: {relevance.numel()} patch relevances do not make a square grid")
    if g == grid:
        return relevance
    m = relevance.view(1, 1, g, g)
    return torch.nn.functional.interpolate(
        m, size=(grid, grid), mode="bilinear", align_corners=False
    ).flatten()


def sample_patches(relevance: torch.Tensor, k: int, generator: torch.Generator | None = None) -> list[int]:
    """``k`` patch indices drawn without replacement, proportional to ``relevance`` (uniform
    where every relevance is 0), sorted."""
    w = relevance.clamp(min=0).double()
    k = min(k, len(w))
    if float(w.sum()) <= 0 or int((w > 0).sum()) < k:  # the zeros drawn last, uniformly
        w = w + (1e-12 * float(w.max()) if float(w.sum()) > 0 else 1.0)
    return sorted(torch.multinomial(w, k, replacement=False, generator=generator).tolist())


def keep_patches(pixel_values: torch.Tensor, patches: Sequence[int], patch_size: int) -> torch.Tensor:
    """The image [3, S, S] with every patch not in ``patches`` painted with the background (the
    mean of the border pixels)."""
    c, h, w = pixel_values.shape
    grid_w = w // patch_size
    border = torch.cat(
        [pixel_values[:, 0], pixel_values[:, -1], pixel_values[:, :, 0], pixel_values[:, :, -1]], 1
    )
    out = border.mean(1)[:, None, None].expand(c, h, w).clone()
    for p in patches:
        r, q = divmod(int(p), grid_w)
        ys, xs = slice(r * patch_size, (r + 1) * patch_size), slice(q * patch_size, (q + 1) * patch_size)
        out[:, ys, xs] = pixel_values[:, ys, xs]
    return out


def qa_passages(question: str, captions: Sequence[str], per_passage: int = 1) -> list[str]:
    """The paper's UnifiedQA fusion-in-decoder passages: ``per_passage`` captions each."""
    out = []
    for i in range(0, len(captions), per_passage):
        ctx = "".join(c.strip() + ". " for c in captions[i : i + per_passage])
        out.append(question.lower().strip() + " \\n " + ctx.lower().strip())
    return out


def join_captions(captions: Sequence[str]) -> str:
    return " ".join(c.strip().rstrip(".") + "." for c in captions)


DEFAULT_QA_FORMAT = "Context: {context}\nQuestion: {question}\nAnswer:"


@dataclass
class PNPAnswer:
    answer: str
    captions: list[str] = field(default_factory=list)
    patches: list[list[int]] = field(default_factory=list)
    relevance: torch.Tensor | None = None
    prompt: str = ""


class PNPVQA:
    """``itm``: a modalign model with a Q-Former ``itm`` head and its tokenizer; ``captioner``:
    ``(images [N, 3, S, S], seed) -> captions`` (one sampled caption per image); ``qa``: a
    completer (the prompted-LLM stand-in for UnifiedQA-FiD)."""

    def __init__(self, itm_model, itm_tok, captioner: Callable, qa: Completer, num_patches: int = 20,
                 num_captions: int = 5, max_tries: int | None = None, layer: int = -1,
                 qa_format: str = DEFAULT_QA_FORMAT, seed: int = 0, max_tokens: int = 10,
                 caption_patch_size: int | None = None):  # fmt: skip
        if num_patches < 1 or num_captions < 1:
            raise ValueError(f"PNP-VQA needs num_patches >= 1 and num_captions >= 1, got {num_patches}, "
                             f"{num_captions}")  # fmt: skip
        if "{question}" not in qa_format or "{context}" not in qa_format:
            raise ValueError("PNP-VQA qa_format must hold {question} and {context}")
        self.itm, self.tok, self.captioner, self.qa = itm_model.eval(), itm_tok, captioner, qa
        self.num_patches, self.num_captions, self.layer = num_patches, num_captions, layer
        self.max_tries = max_tries or 4 * num_captions
        self.qa_format, self.max_tokens = qa_format, max_tokens
        self.patch_size = caption_patch_size or itm_model.config.vision.patch_size  # the captioner's
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed

    def captions(
        self, pixel_values: torch.Tensor, relevance: torch.Tensor
    ) -> tuple[list[str], list[list[int]]]:
        kept: list[str] = []
        chosen: list[list[int]] = []
        tries = 0
        while len(kept) < self.num_captions and tries < self.max_tries:
            n = min(self.num_captions - len(kept), self.max_tries - tries)
            draws = [sample_patches(relevance, self.num_patches, self.gen) for _ in range(n)]
            imgs = torch.stack([keep_patches(pixel_values, d, self.patch_size) for d in draws])
            self.seed += 1
            for cap, d in zip(self.captioner(imgs, self.seed), draws, strict=True):
                cap = cap.strip()
                if cap and not any(cap in k for k in kept):
                    kept.append(cap)
                    chosen.append(d)
            tries += n
        return kept, chosen

    def answer(
        self, question: str, pixel_values: torch.Tensor, itm_pixels: torch.Tensor | None = None
    ) -> PNPAnswer:
        """``pixel_values``: the image as the captioner reads it; ``itm_pixels``: as the matching
        model reads it (default: the same tensor)."""
        rel = question_gradcam(self.itm, pixel_values if itm_pixels is None else itm_pixels, question, self.tok,
                               self.layer)  # fmt: skip
        rel = to_grid(rel, pixel_values.shape[-1] // self.patch_size)
        caps, patches = self.captions(pixel_values, rel)
        prompt = self.qa_format.format(question=question.strip(), context=join_captions(caps))
        text, _ = self.qa.complete(prompt, max_tokens=self.max_tokens)
        return PNPAnswer(text.strip().rstrip(".").strip(), caps, patches, rel, prompt)

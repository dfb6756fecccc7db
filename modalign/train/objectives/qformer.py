"""The qformer objective: BLIP-2's stage 1, the Q-Former learning to read a frozen image encoder
with three losses that share its queries, on image-caption pairs (no LLM involved).

A caption enters the Q-Former's text branch framed as BERT frames it: ``[CLS] words [SEP]``
(``[DEC] words [SEP]`` for generation); the framing ids are ``connector.text_cls_id`` ... .

    itc  image-text contrastive: s(i, t) = max over queries q of cos(v_iq, t_t) / temp; the
         cross-entropy of each image over the batch's texts and of each text over the images,
         averaged, with label smoothing (0.1 in BLIP-2). The temperature is learned, kept in
         [0.001, 0.5] as BLIP-2 keeps it.
    itm  image-text matching: the batch's pairs (label 1) plus, for each text, a negative image
         and, for each image, a negative text (label 0), each drawn from the softmax of the itc
         similarities (hard negatives; the positive pair and pairs whose texts are identical are
         never drawn); the Q-Former reads [queries; text] with every token seeing every token; the
         itm head's logits averaged over the queries; cross-entropy.
    itg  image-grounded text generation: the text after ``[DEC]`` predicted token by token, each
         token seeing the queries and the text before it (the queries see the queries only, so
         whatever the text needs from the image must pass through them); cross-entropy with label
         smoothing over the positions after the first.

    loss = itc.weight * itc + itm.weight * itm + itg.weight * itg      (1 / 1 / 1 in BLIP-2)

The module holds the model's ``vision`` tower and ``connector`` (the Q-Former with its heads,
saved with the model); the LLM takes no part. Options (``objective.qformer``): ``itc``, ``itm``,
``itg`` (weights; 0 leaves a loss out), ``label_smoothing`` and ``tokenizer`` (the Q-Former's own,
BERT's in BLIP-2; by default the model's).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.collate import collate


class QFormerObjective(nn.Module):
    def __init__(
        self, model, itc: float = 1.0, itm: float = 1.0, itg: float = 1.0, label_smoothing: float = 0.1
    ):
        super().__init__()
        cfg = model.config.connector
        if cfg is None or cfg.type != "qformer":
            raise ValueError(
                "the qformer objective trains a Q-Former: the model's connector.type must be qformer"
            )
        need = [h for h, w in (("itc", itc), ("itm", itm), ("itg", itg)) if w]
        if itm and "itc" not in need:
            need.append("itc")  # itm draws its hard negatives from the itc similarities
        missing = [h for h in need if h not in (cfg.text_heads or [])]
        if missing:
            raise ValueError(
                f"the qformer objective's {', '.join(missing)} loss needs the Q-Former's {', '.join(missing)} head "
                f"(connector.text_heads: {cfg.text_heads}); add it or set objective.qformer.{missing[0]}: 0"
            )
        self.vision, self.connector = model.vision, model.connector
        self.cfg = cfg
        self.weights = {"itc": itc, "itm": itm, "itg": itg}
        self.label_smoothing = label_smoothing
        c = self.connector
        heads = {"itc": getattr(c, "text_projection", None), "itm": getattr(c, "itm_head", None),
                 "itg": getattr(c, "itg_head", None)}  # fmt: skip
        self.__dict__["_heads"] = {k: m for k, m in heads.items() if m is not None}  # not sub-modules

    def frame(self, ids: torch.Tensor, mask: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded caption ids [B, T] -> ``[first] words [SEP]`` rows padded with ``[PAD]``, at most
        ``text_max_positions`` long (the words cut to fit)."""
        c = self.cfg
        if mask.any() and int(ids[mask.bool()].max()) >= c.text_vocab_size:
            raise ValueError(
                f"a caption token id ({int(ids[mask.bool()].max())}) is outside the Q-Former's text vocabulary "
                f"(connector.text_vocab_size {c.text_vocab_size}): give the Q-Former's tokenizer as "
                "objective.qformer.tokenizer"
            )
        rows = [r[m.bool()].tolist()[: c.text_max_positions - 2] for r, m in zip(ids, mask, strict=True)]
        width = max(len(r) for r in rows) + 2
        out = torch.full((len(rows), width), c.text_pad_id, dtype=torch.long)
        att = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            seq = [first, *r, c.text_sep_id]
            out[i, : len(seq)] = torch.tensor(seq)
            att[i, : len(seq)] = 1
        return out.to(ids.device), att.to(ids.device)

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        dev = self.connector.query_tokens.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        image = self.vision(batch["pixel_values"].to(dev))
        parts = self.losses(image, ids, mask)
        loss = sum(self.weights[k] * v for k, v in parts.items())
        # a head without a loss this step (weight 0, or itm on a batch of one) stays in the graph
        # at zero: under DDP every trainable parameter must get a gradient each step
        idle = [self._heads[h] for h in self._heads if h not in parts]
        if idle:
            loss = loss + 0.0 * sum(p.sum() for m in idle for p in m.parameters())
        return loss, int(mask.sum())

    def losses(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted losses' values on image features [B, L, D] and their captions (padded ids,
        mask, without framing): ``{"itc": ..., "itm": ..., "itg": ...}`` (those with a weight)."""
        c, out = self.connector, {}
        text, text_mask = self.frame(ids, mask, self.cfg.text_cls_id)
        b = len(text)
        sim = None
        if self.weights["itc"] or self.weights["itm"]:
            with torch.no_grad():
                c.temp.clamp_(0.001, 0.5)
            sim = c.itc_similarity(image, text, text_mask) / c.temp  # [B_img, B_txt]
        if self.weights["itc"]:
            target = torch.arange(b, device=sim.device)
            ls = self.label_smoothing
            out["itc"] = (F.cross_entropy(sim, target, label_smoothing=ls)
                          + F.cross_entropy(sim.t(), target, label_smoothing=ls)) / 2  # fmt: skip
        if self.weights["itm"] and b > 1:  # one pair has no negative to draw
            neg_img, neg_txt = hard_negatives(sim.detach(), text, text_mask)
            txt_all = torch.cat([text, text, text[neg_txt]])
            mask_all = torch.cat([text_mask, text_mask, text_mask[neg_txt]])
            img_all = torch.cat([image, image[neg_img], image])
            logits = c.itm_logits(img_all, txt_all, mask_all)
            labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
            out["itm"] = F.cross_entropy(logits, labels)
        if self.weights["itg"]:
            dec, dec_mask = self.frame(ids, mask, self.cfg.text_dec_id)
            logits = c.itg_logits(image, dec, dec_mask)
            labels = dec.masked_fill(dec_mask == 0, -100)
            out["itg"] = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100, label_smoothing=self.label_smoothing,
            )  # fmt: skip
        return out


@torch.no_grad()
def hard_negatives(sim: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
    """For each text a negative image and for each image a negative text, drawn from the softmax of
    the similarities [B_img, B_txt] (BLIP-2's hard-negative mining), never the pair's own and
    never one whose text is identical to the pair's. -> (image index per text, text index per image)."""
    b = sim.shape[0]
    keys = [tuple(r[m.bool()].tolist()) for r, m in zip(text, text_mask, strict=True)]
    same = torch.tensor([[keys[i] == keys[j] for j in range(b)] for i in range(b)], device=sim.device)
    same |= torch.eye(b, dtype=torch.bool, device=sim.device)
    s = sim.float().masked_fill(same, -10000.0)
    # (a row whose every text is identical to its own draws uniformly: there is no true negative)
    w_t2i = F.softmax(s.t(), dim=1)
    w_i2t = F.softmax(s, dim=1)
    return torch.multinomial(w_t2i, 1).squeeze(1), torch.multinomial(w_i2t, 1).squeeze(1)


# --------------------------------------------------------------------------- as a recipe objective


def module(model, stage=None, text_cache: bool = False) -> QFormerObjective:
    opts = stage.objective.qformer if stage is not None and stage.objective.qformer is not None else None
    if opts is None:
        return QFormerObjective(model)
    return QFormerObjective(model, opts.itc, opts.itm, opts.itg, opts.label_smoothing)


def setup(ctx):
    """(module, dataset, collator) of a qformer stage: image-caption pairs (as the contrastive
    objective reads them: a conversation's first reply, or an annotated image's first caption)."""
    from modalign.data.tokenizer import Tokenizer
    from modalign.train.objectives.contrastive import CaptionProcessor, load_caption_samples

    stage = ctx.stage
    target = module(ctx.model, stage).to(ctx.device)
    opts = stage.objective.qformer
    tok = Tokenizer.from_dir(opts.tokenizer) if opts is not None and opts.tokenizer else ctx.tok

    def processor(root, images, max_length):
        return CaptionProcessor(tok, root, images, max_length)

    dataset = ctx.dataset(processor, load_caption_samples)
    return target, dataset, functools.partial(collate, pad_id=ctx.tok.pad_id)

"""The language-modelling objective: next-token loss on the supervised tokens (assistant replies,
captions, or every token of a text document), as every seed paper's stages 1 and 2 train.

``LMObjective`` is the module the trainer wraps (DDP / FSDP2): it holds the MLLM's parts under
their own names (``vision``, ``connector``, ``llm``: trainable patterns, optimiser groups and
training state read as the model's) and computes the loss only where a label is supervised,
running the vocabulary projection on those positions alone. It takes a frozen tower's features
from the trainer's cache (``train/feature_cache.py``) and, optionally, trains against an answer
prior (``answer_prior.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.conversation import IGNORE_INDEX
from modalign.models.mllm import MLLM, mask_sample_starts


def predicting(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] True at the positions whose next token is supervised (the rows the loss reads)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def supervised_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module | None = None,
    answer_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labels != -100 from the final hidden states [B, T, D]
    (or [N, D]: those of ``predicting(labels)``'s positions alone, in row-major order), running
    ``head`` only where a label is supervised (``head`` None: ``hidden`` are logits already).
    ``answer_bias`` [B, V] is added to the logits that predict each row's first supervised token
    (training against an answer prior). Returns (loss, supervised tokens)."""
    keep = predicting(labels.to(hidden.device))[:, :-1]  # [B, T-1]: the positions the loss reads
    n = int(keep.sum())
    if hidden.dim() == 2:
        if hidden.shape[0] != n:
            raise ValueError(f"{hidden.shape[0]} hidden rows for {n} supervised tokens")
        rows = hidden
    else:
        rows = hidden[:, :-1][keep]
    logits = (rows if head is None else head(rows)).float()
    if answer_bias is not None:
        first = keep & (keep.cumsum(1) == 1)  # [B, T-1]: each row's first supervised position
        # both row-major: the k-th first position is the k-th kept row that is a first one
        at, batch_row = first[keep].nonzero()[:, 0], first.nonzero()[:, 0]
        logits = logits.index_add(0, at, answer_bias.to(logits)[batch_row])
    loss = F.cross_entropy(logits, labels[:, 1:].to(hidden.device)[keep], reduction="sum")
    return loss / max(n, 1), n


def to_device(px, device):
    """A batch's pixel values (a tensor, a list of tensors, or None) on ``device``."""
    if isinstance(px, torch.Tensor):
        return px.to(device)
    if isinstance(px, list):
        return [p.to(device) for p in px]
    return px


class LMObjective(nn.Module):
    """``forward(batch) -> (loss, supervised tokens)`` for a collated batch (``data/collate.py``)."""

    def __init__(self, model: MLLM, prior=None):
        super().__init__()
        for name, child in model.named_children():  # the model's parts, under their own names
            self.add_module(name, child)
        self.config = model.config
        self.__dict__["model"] = model  # not a sub-module: its parts are registered above
        self.prior = prior  # an AnswerPrior, or None
        self.features = None  # a FeatureCache of the frozen tower, set by the trainer while it holds one

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        if self.config.llm.is_encoder_decoder:  # T5: encoder input, decoder labels (to_seq2seq)
            return self._seq2seq(batch)
        device = self.model.llm.embed_tokens.weight.device
        px, keys = to_device(batch["pixel_values"], device), batch.get("image_keys")
        features = None
        if self.features is not None and keys is not None and isinstance(px, torch.Tensor):
            features = self.features(self.model.vision, px, keys)
        labels = batch["labels"].to(device)
        seq_ids = batch.get("seq_ids")  # packed rows (collate_packed): they take the attention mask's place
        mask = batch["attention_mask"] if seq_ids is None else seq_ids
        sp = self.model.embed(batch["input_ids"].to(device), px, mask.to(device), labels, image_features=features,
                              seq_ids=None if seq_ids is None else seq_ids.to(device))  # fmt: skip
        if seq_ids is not None:  # the splice carried each sample's number onto its visual tokens
            if self.prior is not None:
                raise ValueError("the answer prior needs one sample a row; packing is off for it")
            labels = mask_sample_starts(sp.labels, sp.attention_mask)
            hidden = self.model.llm(inputs_embeds=sp.inputs_embeds, modality_ids=sp.modality_ids,
                                    seq_ids=sp.attention_mask, media=sp.media, return_hidden=True,
                                    keep=predicting(labels))  # fmt: skip
            return supervised_lm_loss(hidden, labels, self.model.llm.lm_head)
        # modality ids always go in while training: routed parameters stay in the graph (DDP);
        # the hidden states come back for the positions the loss reads alone (``keep``)
        hidden = self.model.llm(inputs_embeds=sp.inputs_embeds, modality_ids=sp.modality_ids,
                                attention_mask=sp.attention_mask, media=sp.media, return_hidden=True,
                                keep=predicting(sp.labels))  # fmt: skip
        bias = self.prior.bias(batch["ids"]).to(device) if self.prior is not None else None
        return supervised_lm_loss(hidden, sp.labels, self.model.llm.lm_head, bias)

    def _seq2seq(self, batch: dict) -> tuple[torch.Tensor, int]:
        device = next(self.model.llm.parameters()).device
        px, keys = to_device(batch["pixel_values"], device), batch.get("image_keys")
        features = None  # a frozen tower's cached output (the images held by the cache arrive blank)
        if self.features is not None and keys is not None and isinstance(px, torch.Tensor):
            features = self.features(self.model.vision, px, keys)
        out = self.model(batch["input_ids"].to(device), pixel_values=px, image_features=features,
                         attention_mask=batch["attention_mask"].to(device), labels=batch["labels"].to(device))  # fmt: skip
        return out.loss, out.num_tokens


# --------------------------------------------------------------------------- as a recipe objective


def to_seq2seq(ex, prefix_seed: int | None = None):
    """An Example rendered for a decoder-only LM -> the same conversation for an encoder-decoder
    LM (T5; BLIP-2 Flan-T5): the encoder reads everything before the last reply (images, prompt,
    earlier turns), the decoder is trained on the last reply (its supervised tokens).

    ``prefix_seed`` (BLIP-2's prefix LM for encoder-decoder LLMs): the reply is split at a point
    drawn uniformly from its inner token boundaries (the same for a sample in every epoch: seeded
    by ``prefix_seed`` and the sample id); its first part joins the encoder's input, the rest
    (with the end token) is the target. A reply of one token (plus its end) is not split."""
    from modalign.data.conversation import BadSample
    from modalign.data.datasets import Example

    sup = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]
    if not sup:
        raise BadSample("nothing to learn", "no supervised token (truncated away?)", ex.id)
    end = sup[-1] + 1
    start = end - 1
    while start > 0 and ex.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    cut = start
    if prefix_seed is not None and end - start > 2:  # at least two tokens before the end token
        import random

        cut = random.Random(f"{prefix_seed}:{ex.id}").randrange(start + 1, end - 1)
    return Example(ex.id, list(ex.input_ids[:cut]), list(ex.labels[cut:end]), ex.pixel_values, ex.source,
                   image_keys=ex.image_keys)  # fmt: skip


def seq2seq_processor(prefix_seed: int | None = None):
    """``SampleProcessor`` for an encoder-decoder LM: each Example through ``to_seq2seq``."""
    from modalign.data.datasets import SampleProcessor

    class Seq2SeqProcessor(SampleProcessor):
        def __call__(self, s, tokens=None):
            return to_seq2seq(super().__call__(s, tokens), prefix_seed)

    return Seq2SeqProcessor


def module(model: MLLM, stage=None, text_cache: bool = False) -> LMObjective:
    return LMObjective(model)


def setup(ctx):
    """(module, dataset, collator) of an lm stage; ``ctx`` is the run's ``StageContext``."""
    from modalign.data.collate import Collator
    from modalign.data.conversation import get_template
    from modalign.data.datasets import SampleProcessor

    stage, model, tok = ctx.stage, ctx.model, ctx.tok
    cfg = model.config
    per_image = model.num_image_tokens() if cfg.placeholder == "per_token" and model.has_vision else 1
    template = get_template(stage.data.template, tok)

    seq2seq = cfg.llm.is_encoder_decoder
    if seq2seq and (
        stage.data.packing or (stage.objective.answer_prior and stage.objective.answer_prior.weight)
    ):
        raise ValueError(
            f"stage {stage.name}: an encoder-decoder LLM trains without packing and answer prior"
        )
    if stage.objective.prefix_lm and not seq2seq:
        raise ValueError(f"stage {stage.name}: objective.prefix_lm needs an encoder-decoder LLM (T5)")
    kind = seq2seq_processor(ctx.seed if stage.objective.prefix_lm else None) if seq2seq else SampleProcessor

    def processor(root, images, max_length):
        return kind(tok, template, root, images, cfg.image_token_id, per_image, max_length)

    dataset = ctx.dataset(processor)
    target = LMObjective(model)
    collator = Collator(tok.pad_id)
    if stage.data.packing:  # a per-image placeholder grows by the image's visual tokens less one
        extra = model.num_image_tokens() - 1 if cfg.placeholder == "per_image" and model.has_vision else 0
        collator = Collator(tok.pad_id, pack_length=stage.data.pack_length or stage.data.max_length,
                            image_extra=extra)  # fmt: skip
    opts = stage.objective.answer_prior
    if opts is not None and opts.weight:
        from modalign.train.objectives.answer_prior import AnswerPrior

        target.prior = AnswerPrior.from_dataset(
            dataset, model.llm.lm_head.weight.shape[0], opts.min_count, opts.weight
        )
        ctx.log(f"stage {stage.name}: {target.prior.describe()}")
    return target, dataset, collator

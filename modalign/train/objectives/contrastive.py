"""The contrastive objective: CLIP-style pretraining of the vision tower on image-caption pairs.

The text side is the (frozen) language model: mean of its last hidden states over the caption.
Image side: the class token after the post-LayerNorm (as CLIP; mean-pooling the patches does not
learn here: it throws away where things are). Both are projected to a shared space and
trained with the symmetric InfoNCE loss and a learned temperature.

With ``region_weight`` > 0 and annotated images (``{"id", "image", "captions", "objects":
[{"category", "bbox"}]}``, e.g. ShapesWorld's ``scenes.jsonl`` or COCO boxes), a region-phrase
term is added, as in grounded pretraining (GLIP, RegionCLIP): the patch feature under each box
centre, at the layer the connector reads, is matched against the text embeddings of the batch's
box categories (InfoNCE over the distinct phrases of the batch). The class-token loss alone
leaves most of a patch feature's variance to things other than what is in that patch; the
region term makes each visual token say what its region holds, which is what the connector and
the LLM later read per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.collate import _pad, collate
from modalign.data.conversation import BadSample, Conversation
from modalign.data.datasets import Example, load_samples
from modalign.data.images import grid_place, patch_at


@dataclass
class AnnotatedImage:
    """An image with captions and labelled boxes (normalised [x1, y1, x2, y2])."""

    id: str
    image: str
    captions: list[str]
    objects: list[dict]
    source: str = ""

    @property
    def images(self) -> list[str]:
        return [self.image]


def region_phrase(template: str, category: str, cx: float, cy: float) -> str:
    """The text a box is matched against: ``template`` with ``{category}`` and ``{where}``, the
    coarse place of the box centre in a 3x3 grid ("top left" ... "center" ... "bottom right")."""
    return template.format(category=category, where=grid_place(cx, cy))


@dataclass
class RegionExample(Example):
    regions: list[tuple[int, list[int]]] = field(default_factory=list)  # (patch index, phrase ids)


class ContrastiveModel(nn.Module):
    """Wraps an MLLM's ``vision`` and ``llm``; adds ``clip_image_proj``/``clip_text_proj``."""

    def __init__(self, mllm: nn.Module, dim: int = 128, region_weight: float = 0.0, text_cache: bool = False):
        super().__init__()
        self.vision, self.llm = mllm.vision, mllm.llm
        self.clip_image_proj = nn.Linear(mllm.config.vision.hidden_size, dim, bias=False)
        self.clip_text_proj = nn.Linear(mllm.config.llm.hidden_size, dim, bias=False)
        self.clip_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.region_weight = region_weight
        if region_weight > 0:
            self.clip_region_proj = nn.Linear(mllm.config.vision.hidden_size, dim, bias=False)
        # with a frozen LM a text's embedding never changes: ``text_cache`` keeps each distinct
        # text's, filled before training in a fixed order (fill_text_cache: so a resumed run gets the
        # same values), a text it lacks computed on its own; not under FSDP (a collective forward)
        self.text_cache = text_cache
        self._text_memo: dict[tuple[int, ...], torch.Tensor] = {}

    def _text(self, input_ids, attention_mask):
        """Mean of the LM's last hidden states over the real tokens."""
        if self.text_cache_on():
            rows = [tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask, strict=True)]
            return self._texts_cached(rows, input_ids.device)
        return self._mean_hidden(input_ids, attention_mask)

    def _mean_hidden(self, input_ids, attention_mask=None):
        """The LM's last hidden states averaged over the real tokens (all of them without a mask)."""
        return self.llm.mean_hidden(input_ids, attention_mask)

    @torch.no_grad()
    def _texts_cached(self, rows: list[tuple[int, ...]], device) -> torch.Tensor:
        memo = self._text_memo
        for r in dict.fromkeys(rows):
            if r not in memo:
                if r:
                    memo[r] = self._mean_hidden(torch.tensor([r], device=device))[0]
                else:  # an empty text: the padded path's mean over no tokens
                    memo[r] = torch.zeros(self.clip_text_proj.in_features, device=device)
        return torch.stack([memo[r] for r in rows])

    def text_cache_on(self) -> bool:
        return self.text_cache and not any(p.requires_grad for p in self.llm.parameters())

    @torch.no_grad()
    def fill_text_cache(self, texts, batch_size: int = 64) -> int:
        """Embed ``texts`` (token-id sequences) ``batch_size`` at a time, shortest first, before
        training; returns how many the cache holds."""
        dev = next(self.llm.parameters()).device
        todo = sorted({tuple(t) for t in texts if t} - self._text_memo.keys(), key=lambda t: (len(t), t))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            for t, e in zip(chunk, self._mean_hidden(*_padded(chunk, dev)), strict=True):
                self._text_memo[t] = e.clone()
        return len(self._text_memo)

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        """A collated batch (``ContrastiveCollator``) -> (loss, text tokens)."""
        device = self.clip_logit_scale.device
        mask = batch["attention_mask"].to(device)
        loss = self.loss(
            batch["pixel_values"].to(device), batch["input_ids"].to(device), mask, batch.get("regions")
        )
        return loss, int(batch["attention_mask"].sum())

    def loss(self, pixel_values, input_ids, attention_mask, regions=None):
        states = self.vision.hidden_states(pixel_values)
        h = states[-1]
        if self.vision.cfg.class_token:  # CLIP: the class token after the post-LayerNorm
            img = self.vision.post_layernorm(h[:, 0]) if self.vision.cfg.post_layernorm else h[:, 0]
        else:  # no class token (SigLIP-style towers): mean of the patches
            img = h.mean(1)
        txt = self._text(input_ids, attention_mask)
        a = F.normalize(self.clip_image_proj(img), dim=-1)
        b = F.normalize(self.clip_text_proj(txt), dim=-1)
        scale = self.clip_logit_scale.exp().clamp(max=100)
        logits = a @ b.t() * scale
        target = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        if self.region_weight > 0 and regions and any(regions):
            loss = loss + self.region_weight * self._region_loss(states, regions, scale)
        return loss

    def _region_loss(self, states, regions, scale):
        """InfoNCE of each box's patch feature against the batch's distinct box phrases."""
        dev = states[0].device
        layer = self.vision._layer_indices()[0]
        first = 1 if self.vision.cfg.class_token else 0
        phrases: dict[tuple[int, ...], int] = {}
        rows, patches, labels = [], [], []
        for i, regs in enumerate(regions):
            for patch, ids in regs:
                rows.append(i)
                patches.append(first + patch)
                labels.append(phrases.setdefault(tuple(ids), len(phrases)))
        feats = states[layer][torch.tensor(rows, device=dev), torch.tensor(patches, device=dev)]
        r = F.normalize(self.clip_region_proj(feats), dim=-1)
        t = F.normalize(self.clip_text_proj(self._text(*_padded(list(phrases), dev))), dim=-1)
        return F.cross_entropy(r @ t.t() * scale, torch.tensor(labels, device=dev))


def _padded(seqs: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences -> right-padded ids and their attention mask, on ``device``."""
    return _pad(seqs, 0, False).to(device), _pad([[1] * len(s) for s in seqs], 0, False).to(device)


def fill_text_cache(model: ContrastiveModel, dataset) -> int:
    """Fill ``model``'s text cache with every text of ``dataset`` (its caption processor's), where
    the cache is on (a frozen LM); returns how many texts it holds."""
    if not model.text_cache_on():
        return 0
    sets = getattr(dataset, "datasets", [dataset])
    return model.fill_text_cache(t for d in sets for s in d.samples for t in d.processor.texts(s))


def check_regions(dataset, stage) -> None:
    """A region term needs boxes: refuse a stage whose data has none (it would silently train
    the class-token loss alone)."""
    sets = getattr(dataset, "datasets", [dataset])
    if not any(isinstance(x, AnnotatedImage) and x.objects for d in sets for x in d.samples):
        files = ", ".join(src.path for src in stage.data.sources)
        raise ValueError(
            f"stage {stage.name}: objective.region.weight is {stage.objective.region.weight} but its data ({files}) "
            'has no annotated images with boxes ({"id", "image", "captions", "objects": '
            '[{"category", "bbox"}]} per line)'
        )


class ContrastiveCollator:
    """``collate`` plus each row's regions (patch index, phrase ids)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        out = collate(batch, self.pad_id)
        out["regions"] = [
            ex.regions if isinstance(ex, RegionExample) else [] for ex in batch if isinstance(ex, Example)
        ]
        return out


def load_caption_samples(path: str | Path) -> list:
    """A data file for contrastive pretraining: LLaVA/messages conversations (the caption is the
    first reply) or annotated images (``{"id", "image", "captions", "objects"}`` per line of a
    .jsonl, or COCO instances, as ``read_annotations`` reads them; records without captions are
    rejected with their id)."""
    from modalign.data.synthesize import read_annotations

    path = Path(path)
    if not _is_annotations(path):
        return load_samples(path)
    out = []
    for a in read_annotations(path):
        if not a["captions"]:
            out.append(
                BadSample(
                    "malformed record", f"{path.name}: annotated image {a['id']} has no caption", a["id"]
                )
            )
        else:
            out.append(AnnotatedImage(a["id"], a["image"], a["captions"], a["objects"], path.stem))
    return out


def _is_annotations(path: Path) -> bool:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            rec = json.loads(first) if first else None
        except json.JSONDecodeError:
            return False  # load_samples reports the line
        return (
            isinstance(rec, dict)
            and ("captions" in rec or "objects" in rec)
            and not ({"conversations", "messages", "text"} & rec.keys())
        )
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()[:1]
    return head == "{"  # a JSON object: COCO instances; a JSON list: conversations


class CaptionProcessor:
    """Conversation with one image -> Example(caption ids, [pixels]); the caption is the first
    assistant reply."""

    load_samples = staticmethod(load_caption_samples)

    def __init__(self, tok, image_root, image_processor, max_length: int = 128, phrase: str = "{category}"):
        from modalign.data.datasets import SampleProcessor

        self._images = SampleProcessor(tok, None, image_root, image_processor)
        self.tok, self.max_length = tok, max_length
        self.image_tokens = 0
        self.phrase = phrase
        self._texts: dict[int, tuple] = {}  # id(sample) -> its caption ids and (cx, cy, phrase ids) per box

    def __call__(self, s) -> Example:
        if isinstance(s, BadSample):
            raise s
        if isinstance(s, AnnotatedImage):
            return self._annotated(s)
        if not isinstance(s, Conversation) or len(s.images) != 1:
            raise BadSample(
                "image count mismatch",
                "contrastive pretraining needs exactly one image",
                getattr(s, "id", None),
            )
        ids = self._caption(s)
        return Example(s.id, ids, ids, [self._images._image(s.images[0], s.id)], s.source)

    def _annotated(self, s: AnnotatedImage) -> RegionExample:
        images = self._images.images
        px, size = images.load(self._images.image_path(s.image, s.id), s.id)
        texts = self._texts.get(id(s))
        if texts is None or texts[0] is not s:  # tokenised once per sample (each epoch reads it again)
            texts = self._texts[id(s)] = (s, self._caption(s), [self._phrase(o) for o in s.objects])
        _, ids, boxes = texts
        regions = []
        for cx, cy, phrase in boxes:
            patch = patch_at(cx, cy, size, images.cfg)
            if patch is not None and phrase:
                regions.append((patch, phrase))
        return RegionExample(s.id, ids, ids, [px], s.source, regions=regions)

    def _caption(self, s: AnnotatedImage | Conversation) -> list[int]:
        """The caption's token ids: an annotated image's first caption, a conversation's first
        assistant reply."""
        if isinstance(s, AnnotatedImage):
            cap = s.captions[0]
        else:
            cap = next(m.content for m in s.messages if m.role == "assistant")
        return self.tok.encode(cap)[: self.max_length]

    def _phrase(self, o: dict) -> tuple[float, float, list[int]]:
        x1, y1, x2, y2 = (float(v) for v in o["bbox"])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        return (
            cx,
            cy,
            self.tok.encode(region_phrase(self.phrase, str(o["category"]), cx, cy))[: self.max_length],
        )

    def texts(self, s) -> list[list[int]]:
        """The token ids of each text a sample is matched against (its caption and its boxes'
        phrases), without reading its image; none for a sample that training would reject."""
        try:
            if isinstance(s, AnnotatedImage):
                return [self._caption(s)] + [self._phrase(o)[2] for o in s.objects]
            if isinstance(s, Conversation) and len(s.images) == 1:
                return [self._caption(s)]
        except (KeyError, TypeError, ValueError, StopIteration):
            pass
        return []


# --------------------------------------------------------------------------- as a recipe objective


def module(model, stage, text_cache: bool = False) -> ContrastiveModel:
    """The trained module for ``stage``: the model's vision tower and LM plus the new heads."""
    region = stage.objective.region
    return ContrastiveModel(model, region_weight=region.weight if region else 0.0, text_cache=text_cache)


def setup(ctx):
    """(module, dataset, collator) of a contrastive stage; ``ctx`` is the run's ``StageContext``."""
    stage = ctx.stage
    torch.manual_seed(ctx.seed * 7919 + ctx.index)  # the new heads' init, as on a resumed run
    target = module(ctx.model, stage, text_cache=ctx.strategy != "fsdp").to(ctx.device)
    phrase = stage.objective.region.phrase if stage.objective.region else "{category}"

    def processor(root, images, max_length):
        return CaptionProcessor(ctx.tok, root, images, max_length, phrase)

    dataset = ctx.dataset(processor, load_caption_samples)
    if target.region_weight > 0:
        check_regions(dataset, stage)
    return target, dataset, ContrastiveCollator(ctx.tok.pad_id)


def prepare(target: ContrastiveModel, dataset) -> None:
    """After freezing: embed every text of the data once where the LM is frozen."""
    fill_text_cache(target, dataset)

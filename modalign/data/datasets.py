"""Datasets: LLaVA JSON, JSONL of OpenAI-style ``messages``, plain-text corpora, and weighted
mixtures; every sample is either turned into an ``Example`` or rejected with a reason.

Formats read:
- LLaVA JSON: ``[{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
  "value": "...<image>..."}]}]`` (``.json``, or one object a line in ``.jsonl``).
- Messages JSONL: ``{"id", "messages": [{"role", "content": str | [{"type": "text", "text"},
  {"type": "image", "image": path} | {"type": "image_url", "image_url": {"url": path}}]}]}``.
- Text JSONL: ``{"id"?, "text": "..."}`` (language-model pretraining: loss on every token).
"""

from __future__ import annotations

import bisect
import json
import random
from array import array
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modalign.data.conversation import (
    IGNORE_INDEX,
    IMAGE_MARK,
    IMAGE_PLACEHOLDER,
    BadSample,
    Conversation,
    Message,
    Rendered,
    Template,
    render,
)
from modalign.data.images import ImageProcessor, resolve_image_path
from modalign.data.tokenizer import Tokenizer

LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class TextSample:
    """A plain-text document for language modelling (loss on every token)."""

    text: str
    id: str = ""
    source: str = ""


# ------------------------------------------------------------------------------ reading


def _records(path: Path) -> list[tuple[int, Any]]:
    """(line or index, record) pairs from a .json list or a .jsonl file. A JSONL line that is not
    UTF-8 or not JSON becomes a ``BadSample`` naming its line (the other lines are kept); a .json
    file that cannot be read is an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        out = []
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{path.name}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    out.append(
                        (n, BadSample("malformed record", f"{where}: not UTF-8 (byte {e.start}: {e.reason})"))
                    )
                    continue
                if line.strip():
                    try:
                        out.append((n, json.loads(line)))
                    except (json.JSONDecodeError, RecursionError) as e:
                        msg = getattr(e, "msg", "nested too deeply")
                        out.append((n, BadSample("malformed record", f"{where}: invalid JSON ({msg})")))
        return out
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return list(enumerate(data))


def _check_text(value, sid: str, field: str) -> None:
    """A string of a record must be valid Unicode: no lone surrogates (a JSON ``"\\udcff"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample("invalid text", f"{field} holds a lone surrogate (not valid Unicode)", sid) from None


def parse_record(rec: Any, where: str, source: str) -> Conversation | TextSample | BadSample:
    """One record of any supported format -> Conversation / TextSample, or the reason it is bad
    (the reason names the record: its id, or the file and line / index)."""
    if isinstance(rec, BadSample):
        return rec
    if not isinstance(rec, dict):
        return BadSample("malformed record", f"{where}: expected an object, got {type(rec).__name__}")
    sid = rec.get("id")
    if sid is None:
        sid = where
    elif isinstance(sid, int | str) and not isinstance(sid, bool) and _valid(str(sid)):
        sid = str(sid)
    else:
        sid = f"{where} (id {sid!r:.40})"
    try:
        if "conversations" in rec:
            return _from_llava(rec, sid, source)
        if "messages" in rec:
            return _from_messages(rec, sid, source)
        if "text" in rec:
            if not isinstance(rec["text"], str) or not rec["text"].strip():
                raise BadSample("empty conversation", "field 'text' is empty", sid)
            _check_text(rec["text"], sid, "field 'text'")
            return TextSample(rec["text"], sid, source)
        raise BadSample("malformed record", f"{where}: needs 'conversations', 'messages' or 'text'", sid)
    except BadSample as e:
        return e


def _valid(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _image_refs(img, sid: str) -> list[str]:
    """A record's ``image`` field: a path or a list of paths (non-empty strings, no NUL byte)."""
    refs = [] if img is None else [img] if isinstance(img, str) else img
    if not isinstance(refs, list) or not all(
        isinstance(r, str) and r and "\x00" not in r and _valid(r) for r in refs
    ):
        raise BadSample(
            "bad image path", f"field 'image' must be a path or a list of paths, got {img!r:.80}", sid
        )
    return list(refs)


def _from_llava(rec: dict, sid: str, source: str) -> Conversation:
    images = _image_refs(rec.get("image"), sid)
    msgs = []
    convs = rec["conversations"]
    if not isinstance(convs, list):
        raise BadSample("malformed record", "field 'conversations' must be a list", sid)
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadSample("malformed record", f"conversations[{i}] needs 'from' and 'value'", sid)
        role = LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise BadSample("unknown role", f"conversations[{i}] has unknown role {turn['from']!r}", sid)
        value = turn["value"]
        if not isinstance(value, str):
            raise BadSample("malformed record", f"conversations[{i}].value must be a string", sid)
        _check_text(value, sid, f"conversations[{i}].value")
        msgs.append(Message(role, value.replace(IMAGE_PLACEHOLDER, IMAGE_MARK)))
    conv = Conversation(msgs, images, sid, source)
    conv.validate()
    return conv


def _from_messages(rec: dict, sid: str, source: str) -> Conversation:
    msgs, images = [], []
    if not isinstance(rec["messages"], list):
        raise BadSample("malformed record", "field 'messages' must be a list", sid)
    for i, m in enumerate(rec["messages"]):
        if not isinstance(m, dict) or "role" not in m:
            raise BadSample("malformed record", f"messages[{i}] needs 'role' and 'content'", sid)
        content = m.get("content")
        if not isinstance(m["role"], str):
            raise BadSample("unknown role", f"messages[{i}].role must be a string", sid)
        if isinstance(content, str):
            _check_text(content, sid, f"messages[{i}].content")
            text = content.replace(IMAGE_PLACEHOLDER, IMAGE_MARK)
            images += [None] * text.count(IMAGE_MARK)  # needs an "images" list
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    piece = part.get("text", "")
                    if not isinstance(piece, str):
                        raise BadSample(
                            "malformed record", f"messages[{i}].content[{j}].text must be a string", sid
                        )
                    _check_text(piece, sid, f"messages[{i}].content[{j}].text")
                    pieces.append(piece)
                elif kind in ("image", "image_url"):
                    ref = part.get("image") if kind == "image" else part.get("image_url")
                    if isinstance(ref, dict):  # OpenAI's {"url": ...}; a plain string is taken too
                        ref = ref.get("url")
                    if not isinstance(ref, str):
                        raise BadSample(
                            "malformed record", f"messages[{i}].content[{j}] has no image path", sid
                        )
                    pieces.append(IMAGE_MARK)
                    images += _image_refs(ref, sid)
                else:
                    raise BadSample(
                        "malformed record", f"messages[{i}].content[{j}] has unknown type {kind!r}", sid
                    )
            text = "".join(pieces)
        else:
            raise BadSample("malformed record", f"messages[{i}].content must be a string or a list", sid)
        msgs.append(Message(m["role"], text))
    if None in images:
        listed = _image_refs(rec.get("images") or [], sid)
        if len(listed) != len(images):
            raise BadSample("image count mismatch",
                            f"has {len(images)} <image> placeholder(s) but {len(listed)} entries in 'images'", sid)  # fmt: skip
        images = list(listed)
    elif rec.get("images"):  # listed images that no placeholder places: not a text-only chat
        listed = _image_refs(rec["images"], sid)
        raise BadSample("image count mismatch", f"lists {len(listed)} image(s) in 'images' but its messages have "
                        f"{len(images)} <image> placeholder(s) for them", sid)  # fmt: skip
    conv = Conversation(msgs, images, sid, source)
    conv.validate()
    return conv


def load_samples(path: str | Path, source: str | None = None) -> list[Conversation | TextSample | BadSample]:
    """Read every record of a data file; malformed ones come back as ``BadSample``s."""
    path = Path(path)
    src = source or path.stem
    return [parse_record(rec, f"{path.name}:{n}", src) for n, rec in _records(path)]


# ------------------------------------------------------------------------------ processing


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    source: str = ""
    image_keys: list[str | None] = field(default_factory=list)  # each image's file, where it has one

    def __len__(self) -> int:
        return len(self.input_ids)


class SampleProcessor:
    """Conversation -> Example: render with the template, load and preprocess the images."""

    def __init__(
        self,
        tok: Tokenizer,
        template: Template,
        image_root: str | Path | None = None,
        image_processor: ImageProcessor | None = None,
        image_token_id: int | None = None,
        image_tokens: int = 1,
        max_length: int | None = 2048,
    ):
        self.tok, self.template = tok, template
        self.image_root = Path(image_root) if image_root is not None else None
        self.images, self.image_token_id, self.image_tokens = image_processor, image_token_id, image_tokens
        self.max_length = max_length
        self._resolved: dict[str, Path] = {}
        # image files whose vision-tower output the model holds (its feature cache, while a stage
        # with a frozen tower trains): their pixels are never used, so they are not read
        self.held_images: Container = ()
        self._blank: torch.Tensor | None = None

    def __call__(self, s: Conversation | TextSample | BadSample, tokens: Rendered | None = None) -> Example:
        """``tokens``: what ``tokens(s)`` returned before (the dataset's cache), if anything."""
        r = tokens if tokens is not None else self.tokens(s)
        refs = s.images[: r.num_images] if isinstance(s, Conversation) else []
        keys = [str(self.image_path(ref, s.id)) if isinstance(ref, str) else None for ref in refs]
        pixels = [self._image(ref, s.id) if k is None or k not in self.held_images else self._stand_in()
                  for ref, k in zip(refs, keys, strict=True)]  # fmt: skip
        ids, labels = (x.tolist() if isinstance(x, array) else x for x in (r.input_ids, r.labels))
        return Example(s.id, ids, labels, pixels, s.source, image_keys=keys)

    def _stand_in(self) -> torch.Tensor:
        """Zeros in the shape of a preprocessed image, for an image the model's feature cache holds."""
        if self._blank is None:
            n = self.images.cfg.image_size
            self._blank = torch.zeros(3, n, n)
        return self._blank

    def tokens(self, s: Conversation | TextSample | BadSample) -> Rendered:
        """The sample's token ids and labels (and how many images survive truncation); no images
        are read."""
        if isinstance(s, BadSample):
            raise s
        if isinstance(s, TextSample):
            bos, eos = self.tok.bos_id, self.tok.eos_id
            ids = (
                ([bos] if bos is not None else [])
                + self.tok.encode(s.text)
                + ([eos] if eos is not None else [])
            )
            ids = ids[: self.max_length] if self.max_length else ids
            return Rendered(ids, list(ids), 0)
        if s.images and self.images is None:
            raise BadSample(
                "image count mismatch", f"has {len(s.images)} image(s) but the model takes none", s.id
            )
        r = render(s, self.tok, self.template, self.image_token_id, self.image_tokens, self.max_length)
        # tokens after the last supervised one change no loss (causal attention): a template's
        # closing "\n" and the like are dropped, never an image's placeholders
        end = len(r.labels)
        while end and r.labels[end - 1] == IGNORE_INDEX and r.input_ids[end - 1] != self.image_token_id:
            end -= 1
        return Rendered(r.input_ids[:end], r.labels[:end], r.num_images) if end < len(r.labels) else r

    def image_path(self, ref: str, sid: str | None) -> Path:
        """``ref`` inside the image root; each path is checked once (inside the root, no escaping
        link) and remembered."""
        if self.image_root is None:
            raise BadSample("missing image", f"image {ref!r} given but no image root configured", sid)
        path = self._resolved.get(ref) if isinstance(ref, str) else None
        if path is None:  # resolve_image_path refuses a ref that is not a string, too
            path = self._resolved[ref] = resolve_image_path(self.image_root, ref, sid)
        return path

    def _image(self, ref, sid):
        return self.images(self.image_path(ref, sid) if isinstance(ref, str) else ref, sid)


class SkipBudgetExceeded(RuntimeError):
    pass


@dataclass
class BadSamplePolicy:
    """``error``: stop at the first bad sample. ``skip``: count it by reason; stop once more
    than ``max_skip_fraction`` of the samples seen were skipped (after ``min_seen``)."""

    mode: str = "skip"
    max_skip_fraction: float = 0.05
    min_seen: int = 20
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first message

    def __post_init__(self):
        if self.mode not in ("error", "skip"):
            raise ValueError(f"bad-sample policy must be 'error' or 'skip', got {self.mode!r}")

    def ok(self) -> None:
        self.seen += 1

    def bad(self, e: BadSample) -> None:
        self.seen += 1
        if self.mode == "error":
            raise e
        self.skipped[e.reason] += 1
        self.examples.setdefault(e.reason, str(e))
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise once the skipped share is over budget (``final``: ignore ``min_seen``)."""
        total = sum(self.skipped.values())
        if (final or self.seen >= self.min_seen) and self.seen and total / self.seen > self.max_skip_fraction:
            raise SkipBudgetExceeded(
                f"skipped {total} of {self.seen} samples ({total / self.seen:.1%} > "
                f"{self.max_skip_fraction:.1%}): {self.report()}"
            )

    def report(self) -> str:
        if not self.skipped:
            return "no samples skipped"
        parts = [f"{r}: {n} (e.g. {self.examples[r]})" for r, n in self.skipped.most_common()]
        return "skipped " + "; ".join(parts)


class ConversationDataset(torch.utils.data.Dataset):
    """Samples of one or more sources processed lazily. ``__getitem__`` returns an ``Example`` or
    the ``BadSample`` that rejected it (the collator/trainer applies the policy)."""

    def __init__(self, samples: list, processor: SampleProcessor, token_cache_mb: float = 256):
        self.samples, self.processor = samples, processor
        # a SampleProcessor's token ids and labels per sample, kept as int32 arrays after the first
        # read until they fill ``token_cache_mb`` MiB (0: off); images have ImageProcessor's cache
        cache = token_cache_mb > 0 and hasattr(processor, "tokens")
        self._tokens: dict[int, Rendered] | None = {} if cache else None
        self._token_room = int(token_cache_mb * 2**20)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Example | BadSample:
        try:
            if self._tokens is None:
                return self.processor(self.samples[i])
            r = self._tokens.get(i)
            if r is None:
                r = self.processor.tokens(self.samples[i])
                size = 8 * len(r.input_ids)
                if size <= self._token_room:
                    self._token_room -= size
                    self._tokens[i] = Rendered(array("i", r.input_ids), array("i", r.labels), r.num_images)
            return self.processor(self.samples[i], r)
        except BadSample as e:
            return e

    def length(self, i: int) -> int:
        """Cheap length estimate for length-grouped batching (characters / 4 + images)."""
        s = self.samples[i]
        if isinstance(s, TextSample):
            return len(s.text) // 4
        if isinstance(s, Conversation):
            return sum(len(m.content) for m in s.messages) // 4 + len(s.images) * self.processor.image_tokens
        return 1

    def is_text_only(self, i: int) -> bool:
        s = self.samples[i]
        return not isinstance(s, Conversation) or s.is_text_only

    def hold_images(self, held: Container) -> None:
        """Image files whose tower output the model holds (``()``: none): not read from then on."""
        if isinstance(self.processor, SampleProcessor):
            self.processor.held_images = held

    def image_files(self, skip=()):
        """Each distinct image file the samples name, in sample order: (its key, as ``image_keys``
        give it, and its pixels); images that cannot be read are left to the bad-sample policy.
        Keys in ``skip`` (e.g. a feature cache that holds them already) are not read."""
        seen: set[str] = set()
        proc = self.processor
        if not isinstance(proc, SampleProcessor) or proc.images is None:
            return
        for s in self.samples:
            for ref in s.images if isinstance(s, Conversation) else []:
                if not isinstance(ref, str):
                    continue
                try:
                    key = str(proc.image_path(ref, s.id))
                    if key in seen or key in skip:
                        continue
                    seen.add(key)
                    yield key, proc._image(ref, s.id)
                except BadSample:
                    continue


def record_groups(path: str | Path, by: str) -> list[str | None]:
    """The value of field ``by`` of every record of a data file, in ``load_samples``' order (None
    for a malformed record). A well-formed record without the field is an error naming it."""
    path = Path(path)
    out: list[str | None] = []
    for n, rec in _records(path):
        if not isinstance(rec, dict):
            out.append(None)
            continue
        if by not in rec:
            raise ValueError(
                f"{path.name}:{n}: record {rec.get('id', n)!r} has no field {by!r} to balance by"
            )
        out.append(str(rec[by]))
    return out


def balanced_groups(samples: list, groups: list[str | None], alpha: float) -> list[tuple[str, list, float]]:
    """Split ``samples`` by their group values: (value, its samples, its share of the draws), the
    shares proportional to each group's size to the power ``alpha`` (XLM's multilingual sampling:
    1 keeps the file's proportions, 0 draws every group equally, between them rare groups are drawn
    more often than the file holds them). Groups come sorted by value, so the split does not
    depend on the file's order; malformed records (value None) join the largest group, where
    the bad-sample policy meets them as without balancing."""
    if len(samples) != len(groups):
        raise ValueError(f"{len(samples)} samples but {len(groups)} group values")
    by: dict[str, list] = {}
    for s, g in zip(samples, groups, strict=True):
        if g is not None:
            by.setdefault(g, []).append(s)
    if not by:
        raise ValueError("no well-formed record to balance")
    bad = [s for s, g in zip(samples, groups, strict=True) if g is None]
    if bad:
        max(by.values(), key=len).extend(bad)
    sizes = {g: len(v) for g, v in by.items()}
    total = sum(sizes[g] ** alpha for g in by)
    return [(g, by[g], sizes[g] ** alpha / total) for g in sorted(by)]


def mixture_indices(
    sizes: list[int], weights: list[float], total: int, seed: int = 0, epoch: int = 0
) -> list[tuple[int, int]]:
    """(source, index) pairs of one epoch: ``total`` draws where source k appears in proportion to
    weights[k]. Within a source, indices cycle through shuffled orders (every sample before any
    repeat), and each epoch takes the next draws of the cycle in the same places of the list: a
    source drawn less than its size per epoch gives other samples the next epoch, one drawn whole
    gives the same list."""
    if len(sizes) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights {weights} must be non-negative, one per source, not all zero")
    rng = random.Random(seed)
    wsum = sum(weights)
    counts = [int(total * w / wsum) for w in weights]
    for k in sorted(range(len(weights)), key=lambda k: -weights[k])[: total - sum(counts)]:
        counts[k] += 1
    pairs = []
    for k, (n, size) in enumerate(zip(counts, sizes, strict=True)):
        if n and not size:
            raise ValueError(f"mixture source {k} is empty but has weight {weights[k]}")
        cycle: list[int] = []  # one period: whole shuffled orders of the source
        while len(cycle) < n:
            block = list(range(size))
            rng.shuffle(block)
            cycle += block
        pairs += [(k, cycle[(n * epoch + j) % len(cycle)]) for j in range(n)]
    rng.shuffle(pairs)
    return pairs


class _Sources(torch.utils.data.Dataset):
    """Several ``ConversationDataset``s behind one index: ``locate(i)`` is (source, index in it)."""

    datasets: list[ConversationDataset]

    def locate(self, i: int) -> tuple[int, int]:
        raise NotImplementedError

    def __getitem__(self, i: int):
        k, j = self.locate(i)
        return self.datasets[k][j]

    def length(self, i: int) -> int:
        k, j = self.locate(i)
        return self.datasets[k].length(j)

    def is_text_only(self, i: int) -> bool:
        k, j = self.locate(i)
        return self.datasets[k].is_text_only(j)

    def hold_images(self, held: Container) -> None:
        for d in self.datasets:
            d.hold_images(held)

    def image_files(self, skip=()):
        for d in self.datasets:
            yield from d.image_files(skip)


class MixtureDataset(_Sources):
    """A weighted mixture of ``ConversationDataset``s (e.g. 90% multimodal, 10% text-only)."""

    def __init__(
        self, datasets: list[ConversationDataset], weights: list[float], total: int | None = None, seed=0
    ):
        self.datasets, self.weights, self.seed, self.epoch = datasets, weights, seed, 0
        self.total = total or sum(len(d) for d in datasets)
        self.pairs = mixture_indices([len(d) for d in datasets], weights, self.total, seed)

    def set_epoch(self, epoch: int) -> bool:
        """Draw the pairs of ``epoch`` (deterministic for (seed, epoch)); True if they changed."""
        if epoch == self.epoch:
            return False
        self.pairs = mixture_indices(
            [len(d) for d in self.datasets], self.weights, self.total, self.seed, epoch
        )
        self.epoch = epoch
        return True

    def __len__(self) -> int:
        return len(self.pairs)

    def locate(self, i: int) -> tuple[int, int]:
        return self.pairs[i]


class SourcesDataset(_Sources):
    """Sources side by side for ``mix: batch``: one index space (source 0's samples, then source
    1's, ...), each batch from one source (``SourceBatches``)."""

    def __init__(self, datasets: list[ConversationDataset], names: list[str]):
        self.datasets, self.names = datasets, names
        self.offsets = [0]
        for d in datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index within it) of the global index ``i``."""
        if not 0 <= i < self.offsets[-1]:
            raise IndexError(f"sample {i} of {self.offsets[-1]}")
        k = bisect.bisect_right(self.offsets, i) - 1
        return k, i - self.offsets[k]

    def sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def __len__(self) -> int:
        return self.offsets[-1]


def supervised_fraction(ex: Example) -> float:
    return sum(1 for x in ex.labels if x != IGNORE_INDEX) / max(len(ex.labels), 1)

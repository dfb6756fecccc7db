"""Batching: right padding for training, left padding for generation, sequence packing (several
samples per row, told apart by ``seq_ids``), and a length-grouped sampler (optionally keeping
text-only and image samples in separate batches)."""

from __future__ import annotations

import math
import random

import torch

from modalign.data.conversation import IGNORE_INDEX, BadSample
from modalign.data.datasets import Example


def _pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    t = max((len(s) for s in seqs), default=0)
    if not seqs or not t:
        return torch.full((len(seqs), t), value, dtype=torch.long)
    # one tensor from padded lists: a tensor per row costs more than the rows' copying
    if left:
        rows = [[value] * (t - len(s)) + list(s) for s in seqs]
    else:
        rows = [list(s) + [value] * (t - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate(batch: list[Example | BadSample], pad_id: int, left: bool = False, pack_length: int | None = None,
            image_extra: int = 0) -> dict:  # fmt: skip
    """Examples -> tensors. Rejected samples are dropped and returned under ``"bad"``.

    ``input_ids``/``labels``/``attention_mask`` [B, T]; ``pixel_values`` [N_img, 3, S, S] (the
    images of all rows, in row order) or ``None``; ``image_keys`` (their files) or ``None``;
    ``image_counts`` per row; ``ids``. With ``pack_length`` the samples are packed
    (``collate_packed``)."""
    good = [x for x in batch if isinstance(x, Example)]
    bad = [x for x in batch if isinstance(x, BadSample)]
    if pack_length is not None:
        if left:
            raise ValueError("packed rows are right-padded; left padding is for generation")
        return collate_packed(good, bad, pad_id, pack_length, image_extra)
    pixels = [p for ex in good for p in ex.pixel_values]
    same = pixels and all(p.shape == pixels[0].shape for p in pixels)
    keys = [k for ex in good for k in ex.image_keys]
    return {
        "input_ids": _pad([ex.input_ids for ex in good], pad_id, left),
        "labels": _pad([ex.labels for ex in good], IGNORE_INDEX, left),
        "attention_mask": _pad([[1] * len(ex) for ex in good], 0, left),
        "pixel_values": (torch.stack(pixels) if same else pixels) if pixels else None,
        "image_counts": [len(ex.pixel_values) for ex in good],
        # each image's file (None: not from a file); absent unless every image says
        "image_keys": keys if pixels and len(keys) == len(pixels) else None,
        "ids": [ex.id for ex in good],
        "bad": bad,
    }


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of ``lengths`` in bins whose lengths sum to at most
    ``capacity`` (an item longer than that gets a bin of its own). Each bin lists its indices in
    ascending order; bins are ordered by their first index. Deterministic."""
    if capacity < 1:
        raise ValueError(f"pack length must be >= 1, got {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def balanced_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """``pack`` into as few rows as ``capacity`` allows, at the smallest capacity that still gives
    that few (rows are padded to the longest: even rows pad less)."""
    bins = pack(lengths, capacity)
    if len(bins) < 2:
        return bins
    lo, hi = max(max(lengths), -(-sum(lengths) // len(bins))), capacity - 1
    while lo <= hi:  # the smallest capacity found that needs no more rows
        mid = (lo + hi) // 2
        tight = pack(lengths, mid)
        if len(tight) <= len(bins):
            bins, hi = tight, mid - 1
        else:
            lo = mid + 1
    return bins


def collate_packed(good: list[Example], bad: list[BadSample], pad_id: int, pack_length: int,
                   image_extra: int = 0) -> dict:  # fmt: skip
    """Several samples per row: whole samples packed first-fit decreasing into rows of at most
    ``pack_length`` tokens as the decoder sees them (each image counts ``image_extra`` more than
    its placeholders: a per-image placeholder grows by the image's visual tokens less one), as
    few rows as fit, evened out (``balanced_pack``), then right-padded to the longest row.

    Besides ``collate``'s keys (``attention_mask`` 1 at every real token; ``ids``,
    ``pixel_values`` and ``image_keys`` in packed order: row by row, sample by sample, so each
    sample keeps its images in order), ``seq_ids`` [R, T] numbers the samples of each row 1, 2, ...
    (0: padding); the model attends causally within a sample only and restarts positions at
    each sample (``LLM.forward``'s ``seq_ids``). Each sample's first label is ignored, so no loss
    term predicts a sample from the one before it (an unpacked row never predicts its first
    token either): the loss is the unpacked batch's."""
    bins = balanced_pack([len(ex) + image_extra * len(ex.pixel_values) for ex in good], pack_length)
    rows = [[good[i] for i in b] for b in bins]
    good = [ex for row in rows for ex in row]
    # each sample's first label ignored: it would be predicted from the previous sample's last token
    labels = [[x for ex in row for x in [IGNORE_INDEX, *ex.labels[1:]][: len(ex)]] for row in rows]
    seq_ids = _pad([[n for n, ex in enumerate(row, 1) for _ in range(len(ex))] for row in rows], 0, False)
    pixels = [p for ex in good for p in ex.pixel_values]
    same = pixels and all(p.shape == pixels[0].shape for p in pixels)
    keys = [k for ex in good for k in ex.image_keys]
    return {
        "input_ids": _pad([[x for ex in row for x in ex.input_ids] for row in rows], pad_id, False),
        "labels": _pad(labels, IGNORE_INDEX, False),
        "attention_mask": (seq_ids > 0).long(),
        "seq_ids": seq_ids,
        "pixel_values": (torch.stack(pixels) if same else pixels) if pixels else None,
        "image_counts": [sum(len(ex.pixel_values) for ex in row) for row in rows],
        "image_keys": keys if pixels and len(keys) == len(pixels) else None,
        "ids": [ex.id for ex in good],
        "bad": bad,
    }


class Collator:
    """Picklable collate function for DataLoader workers. ``pack_length``: pack the samples
    (``collate_packed``; ``image_extra`` tokens more per image than its placeholders)."""

    def __init__(self, pad_id: int, left: bool = False, pack_length: int | None = None, image_extra: int = 0):
        self.pad_id, self.left = pad_id, left
        self.pack_length, self.image_extra = pack_length, image_extra

    def __call__(self, batch):
        if self.pack_length is None:
            return collate(batch, self.pad_id, self.left)
        return collate(batch, self.pad_id, self.left, self.pack_length, self.image_extra)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length: shuffle, cut into mega-batches of ``batch_size * mega``, sort
    each by length, cut into batches, shuffle the batches. With ``by_modality`` text-only and
    image samples never share a batch. Deterministic for (seed, epoch); yields batches of
    indices (use as ``batch_sampler``)."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, by_modality: bool = False, mega: int = 32,
                 drop_last: bool = False):  # fmt: skip
        self.dataset, self.by_modality = dataset, by_modality
        self._read_lengths()
        self.batch_size, self.seed, self.mega, self.drop_last = batch_size, seed, mega, drop_last
        self.epoch = 0

    def _read_lengths(self) -> None:
        d = self.dataset
        self.lengths = [d.length(i) for i in range(len(d))]
        self.text_only = [d.is_text_only(i) for i in range(len(d))] if self.by_modality else None

    def set_epoch(self, epoch: int) -> None:
        """The epoch's order; a dataset that draws per epoch (a mixture) draws it first."""
        self.epoch = epoch
        if getattr(self.dataset, "set_epoch", None) is not None and self.dataset.set_epoch(epoch):
            self._read_lengths()

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        idx = list(range(len(self.lengths)))
        groups = [idx] if self.text_only is None else [
            [i for i in idx if self.text_only[i]], [i for i in idx if not self.text_only[i]]
        ]  # fmt: skip
        out = []
        for g in groups:
            rng.shuffle(g)
            m = self.batch_size * self.mega
            for s in range(0, len(g), m):
                chunk = sorted(g[s : s + m], key=lambda i: -self.lengths[i])
                for b in range(0, len(chunk), self.batch_size):
                    batch = chunk[b : b + self.batch_size]
                    if len(batch) == self.batch_size or not self.drop_last:
                        out.append(batch)
        rng.shuffle(out)
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class SourceBatches:
    """The batches of ``mix: batch`` over a ``SourcesDataset``: round r holds one batch of every
    source, in the sources' order (the trainer's step takes whole rounds). Source k's batch r is
    the next ``batch_sizes[k]`` draws of its own cycle of shuffled orders (every sample before any
    repeat), so every batch is full and a small source repeats within an epoch; an epoch is as
    many rounds as the largest source needs to be drawn whole, and the next epoch goes on along
    each cycle. Deterministic for (seed, epoch); same interface as ``LengthGroupedSampler``."""

    def __init__(self, dataset, batch_sizes: list[int], seed: int = 0):
        sizes = dataset.sizes()
        if len(batch_sizes) != len(sizes):
            raise ValueError(f"{len(batch_sizes)} batch sizes for {len(sizes)} sources")
        for name, n in zip(dataset.names, sizes, strict=True):
            if not n:
                raise ValueError(f"data source {name} holds no samples")
        self.dataset, self.sizes, self.batch_sizes, self.seed = dataset, sizes, list(batch_sizes), seed
        self.rounds = max(math.ceil(n / b) for n, b in zip(sizes, self.batch_sizes, strict=True))
        self.epoch = 0

    @property
    def num_sources(self) -> int:
        return len(self.sizes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draws(self, k: int, start: int, count: int) -> list[int]:
        """Positions ``start`` .. ``start + count`` of source k's cycle (indices within it)."""
        n, out, cur, order = self.sizes[k], [], None, []
        for pos in range(start, start + count):
            c = pos // n
            if c != cur:
                order = list(range(n))
                random.Random(f"{self.seed}:{k}:{c}").shuffle(order)
                cur = c
            out.append(order[pos % n])
        return out

    def batches(self) -> list[list[int]]:
        per_source = []
        for k, b in enumerate(self.batch_sizes):
            draws = self._draws(k, self.epoch * self.rounds * b, self.rounds * b)
            off = self.dataset.offsets[k]
            per_source.append([[off + j for j in draws[r * b : (r + 1) * b]] for r in range(self.rounds)])
        return [per_source[k][r] for r in range(self.rounds) for k in range(len(self.sizes))]

    def source_of(self, batch_index: int) -> int:
        return batch_index % len(self.sizes)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return self.rounds * len(self.sizes)

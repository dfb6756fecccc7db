"""Batching: right padding for training, left padding for generation, and a length-grouped
sampler (optionally keeping text-only and image samples in separate batches)."""

from __future__ import annotations

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


def collate(batch: list[Example | BadSample], pad_id: int, left: bool = False) -> dict:
    """Examples -> tensors. Rejected samples are dropped and returned under ``"bad"``.

    ``input_ids``/``labels``/``attention_mask`` [B, T]; ``pixel_values`` [N_img, 3, S, S] (the
    images of all rows, in row order) or ``None``; ``image_keys`` (their files) or ``None``;
    ``image_counts`` per row; ``ids``."""
    good = [x for x in batch if isinstance(x, Example)]
    bad = [x for x in batch if isinstance(x, BadSample)]
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


class Collator:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, pad_id: int, left: bool = False):
        self.pad_id, self.left = pad_id, left

    def __call__(self, batch):
        return collate(batch, self.pad_id, self.left)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length: shuffle, cut into mega-batches of ``batch_size * mega``, sort
    each by length, cut into batches, shuffle the batches. With ``by_modality`` text-only and
    image samples never share a batch. Deterministic for (seed, epoch); yields batches of
    indices (use as ``batch_sampler``)."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, by_modality: bool = False, mega: int = 32,
                 drop_last: bool = False):  # fmt: skip
        self.lengths = [dataset.length(i) for i in range(len(dataset))]
        self.text_only = [dataset.is_text_only(i) for i in range(len(dataset))] if by_modality else None
        self.batch_size, self.seed, self.mega, self.drop_last = batch_size, seed, mega, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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

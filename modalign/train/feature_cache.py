"""What the stages of a run share: decoded images and a frozen vision tower's output per image.

While a stage trains with the vision tower frozen, its output for an image never changes: the
trainer fills this cache once before the stage (in a fixed file order, so what it holds does not
depend on the batches or on where a run resumed), hands the cached features to the objective
(``MLLM.embed(image_features=...)``), and keeps the cache for the next stage while the tower's
weights are the same (``tower_fingerprint``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


def tower_fingerprint(tower: nn.Module) -> str:
    """A digest of a vision tower's configuration, weights and buffers: equal digests, equal outputs."""
    h = hashlib.sha1(repr(getattr(tower, "cfg", None)).encode())
    for name, t in [*tower.named_parameters(), *tower.named_buffers()]:
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """A frozen tower's output per image key, up to ``limit`` bytes. It is filled once, before
    training, in a fixed order (``fill``), so what it holds does not depend on the batches or on
    where a run resumed; images it does not hold are encoded with their batch, as without it."""

    def __init__(self, limit: int, fingerprint: str | None = None):
        self.limit, self.bytes, self._memo = limit, 0, {}
        self.hits = self.misses = 0
        self.fingerprint = fingerprint  # the tower whose output it holds (``tower_fingerprint``)

    @classmethod
    def for_tower(cls, tower: nn.Module, max_mb: float, reuse: FeatureCache | None = None) -> FeatureCache:
        """A cache of at most ``max_mb`` MiB for ``tower``: ``reuse`` (one an earlier stage filled)
        where it was filled by this very tower (same weights and feature selection) with the same
        limit, else an empty one."""
        limit, fp = int(max_mb * 2**20), tower_fingerprint(tower)
        if reuse is not None and reuse.fingerprint == fp and reuse.limit == limit:
            return reuse
        return cls(limit, fp)

    def __contains__(self, key) -> bool:
        return key in self._memo

    def __len__(self) -> int:
        return len(self._memo)

    @torch.no_grad()
    def fill(self, tower: nn.Module, images, batch_size: int = 64) -> int:
        """``images``: (key, pixels [3, S, S]) pairs; encodes them ``batch_size`` at a time until
        the limit is reached. Returns how many it holds."""
        chunk: list = []
        pending: set = set()
        for key, px in images:
            if key in self._memo or key in pending:
                continue
            chunk.append((key, px))
            pending.add(key)
            if len(chunk) == batch_size:
                if not self._add(tower, chunk):
                    return len(self._memo)
                chunk, pending = [], set()
        if chunk:
            self._add(tower, chunk)
        return len(self._memo)

    def _add(self, tower, chunk) -> bool:
        dev = next(tower.parameters()).device
        feats = tower(torch.stack([px for _, px in chunk]).to(dev))
        for (key, _), f in zip(chunk, feats, strict=True):
            n = f.numel() * f.element_size()
            if self.bytes + n > self.limit:
                return False
            self._memo[key], self.bytes = f.clone(), self.bytes + n
        return True

    @torch.no_grad()
    def __call__(self, tower: nn.Module, pixel_values: torch.Tensor, keys: list) -> torch.Tensor:
        if len(keys) != len(pixel_values):
            raise ValueError(f"image_keys: {len(keys)} keys for {len(pixel_values)} images")
        held = [self._memo.get(k) if k is not None else None for k in keys]
        miss = [i for i, f in enumerate(held) if f is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if len(miss) == len(keys):
            return tower(pixel_values)
        if miss:
            for i, f in zip(miss, tower(pixel_values[miss]), strict=True):
                held[i] = f
        return torch.stack(held)


@dataclass
class RunCache:
    """Carried from one stage of a run to the next, so that work is not done twice: the image
    processor (with its cache of decoded images), kept while the vision config and cache size are
    the same, and the frozen tower's feature cache (``FeatureCache.for_tower`` checks the tower)."""

    images: object | None = None  # an ImageProcessor
    images_key: tuple | None = None
    features: FeatureCache | None = None

    def image_processor(self, vcfg, cache_mb: float):
        from modalign.data.images import ImageProcessor

        key = (repr(vcfg), cache_mb)
        if self.images is None or self.images_key != key:
            self.images, self.images_key = ImageProcessor(vcfg, cache_mb=cache_mb), key
        return self.images

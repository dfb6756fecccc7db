"""Visual tokens by image content: an image met again (the next turn of a chat, many clients
asking about one picture) is not run through the vision tower and connector a second time.

    pixels [3, H, W] --blake2b of dtype, shape and bytes--> key --LRU (bounded in bytes)--> tokens [L, D]

The key is the preprocessed pixels' own content, so equal images hit whatever path or upload they
came from, and a different preprocessing (size, normalisation) never does. Tokens are kept on the
model's device in its dtype; the least recently used are dropped once ``max_bytes`` is exceeded.
The cache empties itself when the weights that make visual tokens change (an optimiser step, a
module replaced: each parameter's storage and version counter are compared, as the fused decode
plan does). One engine's cache belongs to the thread that runs it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from modalign.infer.fast_decode import weight_versions


def image_key(pixels: torch.Tensor) -> bytes:
    """A digest of one preprocessed image: its dtype, shape and values."""
    t = pixels.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class ImageCache:
    """A least-recently-used map from ``image_key`` to an image's visual tokens ``[L, D]``."""

    def __init__(self, max_bytes: int = 256 << 20):
        if max_bytes < 0:
            raise ValueError(f"the image cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.weights: list[tuple[int, int]] | None = None  # what the cached tokens were made with

    def follow(self, model) -> None:
        """Empty the cache if the model's image-side weights changed since the last call."""
        now = _versions(model)
        if now != self.weights:
            self.clear()
            self.weights = now

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> torch.Tensor | None:
        tokens = self.entries.get(key)
        if tokens is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return tokens

    def put(self, key: bytes, tokens: torch.Tensor) -> None:
        size = _nbytes(tokens)
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        if tokens.untyped_storage().nbytes() > size:  # a view into a batch's output: kept alone,
            tokens = tokens.clone()  # or the whole batch would stay in memory, uncounted
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        self.entries[key] = tokens
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= _nbytes(dropped)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def encode_cached(model, images: list[torch.Tensor], cache: ImageCache) -> list[torch.Tensor]:
    """Each image's visual tokens ``[L_i, D]``, in order: from ``cache`` where it holds them, the
    rest through ``encode`` in one batch, then kept. An image that occurs twice in ``images`` is
    encoded once."""
    cache.follow(model)
    keys = [image_key(px) for px in images]
    out: list[torch.Tensor | None] = [cache.get(k) for k in keys]
    todo: dict[bytes, list[int]] = {}
    for i, (k, tok) in enumerate(zip(keys, out, strict=True)):
        if tok is None:
            todo.setdefault(k, []).append(i)
    if todo:
        first = [idx[0] for idx in todo.values()]
        for (k, idx), tokens in zip(todo.items(), encode(model, [images[i] for i in first]), strict=True):
            cache.put(k, tokens)
            for i in idx:
                out[i] = tokens
    return out


def encode(model, images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """``images`` through the tower and connector in one batch: [N, L, D], or a list of [L_i, D]
    where their sizes differ (HD layouts)."""
    dev = model.llm.embed_tokens.weight.device
    same = all(x.shape == images[0].shape for x in images)
    return model.encode_images(torch.stack(images).to(dev) if same else [x.to(dev) for x in images])


def _versions(model) -> list[tuple[int, int]]:
    """Storage and version counter of every parameter and buffer outside the LLM (the vision tower,
    the connector: what turns pixels into visual tokens)."""
    return weight_versions([m for name, m in model.named_children() if name != "llm"], buffers=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

"""Keys and values of sequences already run, reused by prompts that begin with them: the next turn
of a chat (its prompt is the last prompt, the reply and a new message), many requests with one
system prompt or one picture. Only the tokens after the longest cached prefix are prefilled.

    a finished generation's tokens --blocks of 16--> chained digests d_1..d_n --> entry (K/V [layers][H, n, D])
    a new prompt's digests --longest d_j held--> K/V of its first 16 j tokens copied into its cache

A block's digest covers every token before it and, for each image that starts in it, the image's
own digest (``image_cache.image_key``): equal digests mean the same tokens and pictures in the same
places, so the same keys and values (positions count from a sequence's first token, and keys are
stored after RoPE). Entries are kept least recently used first out within ``max_bytes``; each
block digest names the newest entry that holds it, and an entry no digest names any more (a
longer sequence covers all of it) is dropped at once. The cache belongs to the thread that runs
its engine. Decoders with cross-attention to images (their cache holds per-row visual latents)
do not use it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from modalign.infer.fast_decode import weight_versions

BLOCK = 16


@dataclass(eq=False)
class Entry:
    keys: list[bytes]  # its blocks' digests
    k: list[torch.Tensor]  # per layer [H_kv, n, D]
    v: list[torch.Tensor]
    tokens: int
    named: int = 0  # block digests that name this entry

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class Hit:
    """The first ``tokens`` positions of a prompt, held by ``entry``."""

    entry: Entry
    tokens: int


def block_keys(ids: list[int], image_token_id: int | None, image_keys: list[bytes], counts: list[int],
               block: int = BLOCK) -> list[bytes]:  # fmt: skip
    """The chained digest of every whole block of ``ids``. ``image_keys`` / ``counts``: each image's
    digest and how many placeholders it has in ``ids``, in order (placeholders of consecutive images
    may touch: the counts say where one ends)."""
    starts: dict[int, list[bytes]] = {}
    for key, (pos, _) in zip(image_keys, image_spans(ids, image_token_id, counts), strict=True):
        if pos >= len(ids):
            raise ValueError(f"the prompt has fewer image placeholders than its {len(image_keys)} image(s)")
        starts.setdefault(pos // block, []).append(pos.to_bytes(4, "little") + key)
    out, prev = [], b""
    for j in range(len(ids) // block):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(array("q", ids[j * block : (j + 1) * block]).tobytes())
        for part in starts.get(j, ()):
            h.update(part)
        prev = h.digest()
        out.append(prev)
    return out


def image_spans(ids: list[int], image_token_id: int | None, counts: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each image's placeholders in ``ids``."""
    spans, pos = [], 0
    for n in counts:
        while pos < len(ids) and ids[pos] != image_token_id:
            pos += 1
        spans.append((pos, pos + n))
        pos += n
    return spans


class PrefixCache:
    """Keys and values by token prefix (see the module's docstring), at most ``max_bytes``."""

    def __init__(self, max_bytes: int, block: int = BLOCK):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes, got {max_bytes}")
        if block < 1:
            raise ValueError(f"the prefix cache's block must be >= 1 token, got {block}")
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # by id(entry), least recent first
        self.index: dict[bytes, Entry] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self.hit_tokens = 0  # prompt tokens served from the cache (not prefilled)
        self.weights: list[tuple[int, int]] | None = None  # what the cached keys and values were made with

    def __len__(self) -> int:
        return len(self.entries)

    def follow(self, model) -> None:
        """Empty the cache if the model's weights changed since the last call (training, a part
        replaced): keys and values depend on every weight before the LM head."""
        now = weight_versions([model], buffers=True)
        if now != self.weights:
            self.clear()
            self.weights = now

    def lookup(self, keys: list[bytes], limit: int) -> Hit | None:
        """The longest cached prefix of the sequence with block digests ``keys``, at most ``limit``
        tokens (a prompt's last token is always run: its logits are the first token's)."""
        for j in range(min(len(keys), limit // self.block) - 1, -1, -1):
            entry = self.index.get(keys[j])
            if entry is not None:
                self.entries.move_to_end(id(entry))
                self.hits += 1
                return Hit(entry, (j + 1) * self.block)
        self.misses += 1
        return None

    def put(
        self, keys: list[bytes], k: list[torch.Tensor], v: list[torch.Tensor], owned: bool = False
    ) -> None:
        """Keep ``k`` / ``v`` (per layer [H_kv, n, D], n >= the blocks' tokens) for the sequence with
        block digests ``keys``; copies are made only where the cache takes them (``owned``: the
        tensors are the caller's own copies, kept as they are where they hold exactly those tokens)."""
        if not keys:
            return
        old = self.index.get(keys[-1])
        if old is not None and old.keys[: len(keys)] == keys:  # held already (a repeated prompt)
            self.entries.move_to_end(id(old))
            return
        n = len(keys) * self.block
        size = sum(t[:, :n].numel() * t.element_size() for t in (*k, *v))
        if size > self.max_bytes:
            return

        def kept(t):
            return t if owned and t.shape[1] == n else t[:, :n].clone()

        entry = Entry(list(keys), [kept(t) for t in k], [kept(t) for t in v], n)
        for key in keys:
            prev = self.index.get(key)
            if prev is not None:
                prev.named -= 1
                if prev.named == 0:  # every block it held is held by this newer entry
                    self._drop(prev)
            self.index[key] = entry
            entry.named += 1
        self.entries[id(entry)] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries.values())))

    def _drop(self, entry: Entry) -> None:
        if self.entries.pop(id(entry), None) is None:
            return
        self.bytes -= entry.nbytes
        for key in entry.keys:
            if self.index.get(key) is entry:
                del self.index[key]

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()
        self.bytes = 0

"""The text decode step on fused weights: one token per row through the cached decoder.

The module forward (``models/decoder.py``) serves every design, training and the multimodal
prefill. A decode step is simpler: one text token per row, so MAM's image copies and Partial
LoRA's image branch are off, and q/k/v (and gate/up) can be read as one matrix. ``DecodePlan``
holds those fused weights; ``decode_layers`` runs the decoder blocks with the same layer maths
(``models/layers.py``: ``rms_norm``, ``apply_rotary``, ``gated_mlp``, ``attend``) as the module
path. ``FastDecoder`` owns a model's plan (rebuilt when its weights change) and, optionally, a
``torch.compile``d step.

    x = embed(id)
    per block: h = rms(x); q|k|v = h @ Wqkv; rope(q, k); x += attend(q, K, V) @ Wo
               g|u = rms(x) @ Wgu;  x += (silu(g) * u) @ Wdown
    logits = rms(x) @ Whead
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from modalign.models.decoder import LLM, KVCache
from modalign.models.layers import apply_rotary, attend, gated_mlp, rms_norm
from modalign.models.modality import ALinear

log = logging.getLogger("modalign")


def _d(t):
    """A view without autograd (cheaper dispatch); shares storage, so in-place updates show."""
    return None if t is None else t.detach()


def weight_versions(modules: list[nn.Module], buffers: bool = False) -> list[tuple[int, int]]:
    """Storage address and version counter of every parameter (and buffer) under ``modules``, in
    a fixed order: an equal list means no tensor was replaced, moved or changed in place since.
    A plain walk of the module tree, three times cheaper than ``parameters()``'s generators: the
    decode plan checks it at each batch merge, the image cache at each prefill with images."""
    out, seen, todo = [], set(), list(reversed(modules))
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for t in m._parameters.values():
            if t is not None:
                out.append((t.data_ptr(), t._version))
        if buffers:
            for t in m._buffers.values():
                if t is not None:
                    out.append((t.data_ptr(), t._version))
        todo.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


class DecodePlan:
    """Per-layer tensors for one text decode step. q/k/v and gate/up are concatenated so that a
    step makes two matmuls fewer per block; every matrix is kept as the modules store it,
    [out, in] (a view where nothing is concatenated), in a ``Mat`` with the forms it is
    multiplied in (``_lin``) and, made by ``pack`` when a step needs them, packed copies.
    ``stale`` notices in-place updates (training, LoRA merges) and replaced modules (a part
    enabled after the plan was made)."""

    def __init__(self, llm: LLM):
        def text(m):  # MAM: a decode step is text, so the text copy
            return m.multiway[0] if hasattr(m, "multiway") else m

        def lin(mods):
            ops = [getattr(m, "quantized", None) for m in mods]
            if all(op is not None for op in ops):  # quantized in place (``quantize_llm_``): read those
                return (ops[0] if len(ops) == 1 else Concat(ops)), None
            w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight
            bs = [m.bias for m in mods]
            b = None if bs[0] is None else (torch.cat(bs) if len(bs) > 1 else bs[0])
            return _d(w), _d(b)

        layers = []
        for layer in llm.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = [a.qkv_proj] if hasattr(a, "qkv_proj") else [text(a.q_proj), text(a.k_proj), text(a.v_proj)]
            gu = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
            layers.append((
                _d(text(layer.input_layernorm).weight), lin(qkv), lin([a.o_proj]),
                _d(text(layer.post_attention_layernorm).weight), lin(gu),
                lin([mlp.down_proj]),
            ))  # fmt: skip
        head = (lin([llm.lm_head])[0], None)
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}  # matrices of one shape, timed together
        for w in [m[0] for layer in layers for m in (layer[1], layer[2], layer[4], layer[5])] + [head[0]]:
            if _timed(w):
                groups.setdefault(tuple(w.shape), []).append(w)

        def formed(wb):  # (w, b) -> Mat(w, b, forms): how this machine multiplies w fastest
            return Mat(*wb, _forms(wb[0], groups))

        self.layers = [
            (n1, formed(qkv), formed(o), n2, formed(gu), formed(d)) for n1, qkv, o, n2, gu, d in layers
        ]
        self.embed, self.norm = _d(llm.embed_tokens.weight), _d(llm.norm.weight)
        self.head = formed(head)
        self.versions = weight_versions([llm])
        self.packed: bool | None = None  # None: not tried yet; else whether copies were made

    def mats(self) -> list[Mat]:
        return [m for layer in self.layers for m in (layer[1], layer[2], layer[4], layer[5])] + [self.head]

    def pack(self, rows: int, compiled: bool = False) -> None:
        """Before a step of ``rows`` rows: where the packed form is the fastest with that many
        rows (``_forms``; more than ``PACK_ROWS`` rows: ``DNN_ANY``), make the matrices' packed
        copies (MKL's or oneDNN's), once. MKL's packed copy of a matrix
        is larger than the matrix (1.4x for a 32000 x 512 one, several MB more for a small one),
        so they are made only when a step first needs some of them (all kinds at once: a first
        step of more than ``PACK_ROWS`` rows makes those of five to eight too), and dropped again (the unpacked forms
        used) as soon as they would take more than half of the memory available when packing
        began. Copies of the weights as they are now: an in-place update shows in the next plan
        (``stale``, checked at each generation's start)."""
        if self.packed is not None or rows <= FEW_ROWS:
            return
        if rows > PACK_ROWS and (compiled or not any(m.forms[1] == DNN_ANY for m in self.mats())):
            return  # no copy is multiplied with this many rows (a later step of fewer may make them)
        # a compiled step multiplies unpacked where oneDNN's copies were chosen: none made for it
        todo = [m for m in self.mats() if m.forms[1] == PACKED or (m.forms[1] in DNNS and not compiled)]
        if compiled and not todo and any(m.forms[1] in DNNS for m in self.mats()):
            return  # only oneDNN's: not tried, so an eager step (after a failed compile) makes them
        free, used = _free_memory(), 0
        try:
            for m in todo:
                m.packed = _pack(m.w, m.forms[1])
                used += m.packed.numel() * 4
                if free is not None and 2 * used > free:
                    raise MemoryError(
                        f"{used / 2**20:.0f} MB of packed matrices, {free / 2**20:.0f} MB available"
                    )
        except (MemoryError, RuntimeError) as e:  # RuntimeError: an allocation the BLAS refused
            for m in todo:
                m.packed = None
            log.info("decode: packed matrices skipped (%s); multiplying them unpacked", e)
        self.packed = all(m.packed is not None for m in todo) and bool(todo)

    def stale(self, llm: LLM) -> bool:
        return weight_versions([llm]) != self.versions


def supported(llm: LLM, cache: KVCache | None) -> bool:
    """Whether the fused step covers this model now (``cache`` None: at any cache length):
    Llama-family base layers, MAM (text copy) and Partial LoRA (off for text) are covered; LoRA (unmerged), adapters, non-SiLU MLPs, OPT-style
    decoders, active sliding windows and Flamingo's gated cross-attention blocks (which read the
    cached images at every step) take the module path."""
    c = llm.cfg
    if c.hidden_act != "silu" or c.adapter is not None or c.cross_attention is not None or llm.training:
        return False
    if (c.norm, c.position, c.mlp) != ("rms", "rope", "gated"):  # OPT-style decoders: the module path
        return False
    if c.lora is not None and any(
        isinstance(m, ALinear) and m.lora_A is not None and not m.lora_merged for m in llm.modules()
    ):
        return False
    if c.sliding_window is not None and cache is not None and cache.length + 1 > c.sliding_window:
        return False
    return True


def _attend_one(q, k, v, mask):
    """Attention of one query per row written out (q [B, H, 1, D], k/v [B, Hkv, S, D], mask
    [B, 1, 1, S]): under ``torch.compile`` this fuses into a few loops, where the SDPA kernel
    costs more than the work for a single query."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, d)  # query heads grouped by their key/value head
    scores = (qg @ k.transpose(-1, -2)) * (d**-0.5)  # [B, Hkv, G, S]
    scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ v).view(b, h, 1, d)


class Concat:
    """Quantized matrices read one after another, outputs concatenated (MAM's separate text K/V)."""

    def __init__(self, ops):
        self.ops = ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([op(x) for op in self.ops], -1)


FEW_ROWS = 4  # up to this many rows a matrix is multiplied as timed with one row, above as with eight
# (packed copies up to PACK_ROWS rows; above, oneDNN's where it won with MORE_ROWS, else the best unpacked form)
PACK_ROWS = 8  # packed matrices are packed for this many rows; fewer (above FEW_ROWS) are padded
MORE_ROWS = 32  # where oneDNN's copy wins with PACK_ROWS rows, it is timed again with this many
LINEAR, TALL, PACKED, DNN = "linear", "tall", "packed", "onednn"  # how a matrix is multiplied (``_lin``)
DNN_ANY = "onednn-any"  # oneDNN's copy for any step of more than FEW_ROWS rows (it won with MORE_ROWS too)
DNNS = (DNN, DNN_ANY)  # the forms that multiply oneDNN's copy
PACKS = (PACKED, *DNNS)  # the forms that multiply a packed copy (MKL's, oneDNN's)
# (out, in, threads, bytes timed, from memory) -> form with few rows, with more, with more where
# nothing is packed; timed once per machine (``_saved_forms``), then kept here for the process
_FORMS: dict[tuple, tuple[str, str, str]] = {}
_FORMS_VERSION = 4  # of how forms are timed and chosen: saved forms of another version are timed again
_TIMED_BYTES = 64 * 2**20  # the forms are timed over up to this much of a shape's matrices


class Mat:
    """One decode matrix ``w`` [out, in] with its bias, its forms (``_forms``) and, once a step
    needs it, its packed copy (``DecodePlan.pack``)."""

    def __init__(self, w, b=None, forms=(LINEAR, LINEAR, LINEAR)):
        self.w, self.b, self.forms = w, b, forms
        self.packed: torch.Tensor | None = None


def _has_packed() -> bool:
    return bool(getattr(torch._C, "has_mkl", False)) and hasattr(torch.ops.mkl, "_mkl_linear")


def _has_dnn() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))  # fmt: skip


def _pack(w: torch.Tensor, form: str = PACKED) -> torch.Tensor:
    """``w`` [out, in] packed for products with ``PACK_ROWS`` rows: by MKL (``PACKED``) or in
    oneDNN's blocked layout (``DNN``, an opaque tensor that takes any number of rows)."""
    if form in DNNS:
        return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
    return torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)


def _many_forms() -> tuple[str, ...]:
    """The forms timed with ``PACK_ROWS`` rows: the packed ones where this torch has them."""
    return (LINEAR, TALL) + ((PACKED,) if _has_packed() else ()) + ((DNN,) if _has_dnn() else ())


@torch.library.custom_op("modalign::packed_linear", mutates_args=())
def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """MKL's product with a packed matrix, as one operator the compiler calls as it is (its own
    lowering of this product wants the weights frozen into the graph; the plan passes them in)."""
    return torch.ops.mkl._mkl_linear(x, packed, w, b, PACK_ROWS)


@_packed_linear.register_fake
def _(x, packed, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _free_memory() -> int | None:
    """Bytes a new allocation can take: Linux's ``MemAvailable`` (free memory and caches it can
    drop), less where a control group's limit leaves less; None where unknown."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not on this system
            pass
    try:  # cgroup v2: the container's limit less what it uses
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                left = int(limit) - int(g.read())
                free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def _timed(w) -> bool:
    return isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.dtype == torch.float32


def _tall(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return (w @ (torch.cat([x, x]) if n == 1 else x).t()).t()[:n].contiguous()


def _forms(w, groups: dict) -> tuple[str, str, str]:
    """How ``w`` is multiplied (``_lin``) with up to ``FEW_ROWS`` rows, with up to ``PACK_ROWS``
    (``DNN_ANY``: oneDNN's copy, timed fastest with ``MORE_ROWS`` rows as well, with any number
    above ``FEW_ROWS``), and with more or where the plan has no packed copies: timed over up to ``_TIMED_BYTES`` of
    that shape's matrices, once per machine (saved, ``_forms_file``) and kept for the process;
    another form than ``x @ w.T`` only where it is at least 10% faster. They are read as a decode
    step reads them: from memory where all the plan's matrices (``groups``) are more than the
    last-level cache holds (the cache is flushed before each timed round), else from the cache."""
    if not _timed(w):
        return (LINEAR, LINEAR, LINEAR)
    shape = tuple(w.shape)
    cold = sum(m.numel() * m.element_size() for ms in groups.values() for m in ms) > _llc_bytes()
    ws, size = [], 0  # up to _TIMED_BYTES of the shape's matrices, the last one's leading rows
    for m in groups[shape]:
        rows = min(m.shape[0], max(1, (_TIMED_BYTES - size) // (m.shape[1] * m.element_size())))
        ws.append(m[:rows])
        size += ws[-1].numel() * m.element_size()
        if size >= _TIMED_BYTES:
            break
    key = (*shape, torch.get_num_threads(), size, cold)
    if key not in _FORMS:
        read = "from memory" if cold else "from the cache"
        name = (f"{shape[0]}x{shape[1]}, {size} bytes timed {read}, {key[2]} threads, packed {_has_packed()}, "
                f"onednn {_has_dnn()}")  # fmt: skip
        forms = _valid_forms(_saved_forms().get(name))
        if forms is None:
            few = _fastest(_times(ws, 1, (LINEAR, TALL), cold=cold))
            times = _times(ws, PACK_ROWS, _many_forms(), cold=cold)
            unpacked, many = _fastest({f: t for f, t in times.items() if f not in PACKS}), _fastest(times)
            if many == DNN and _fastest(_times(ws, MORE_ROWS, (LINEAR, TALL, DNN), cold=cold)) == DNN:
                many = DNN_ANY  # oneDNN's copy takes any number of rows, and wins with more too
            forms = _save_forms(name, (few, many, unpacked))  # another process's if it saved first
        _FORMS[key] = forms
        log.debug("decode matrices %s, %d threads: forms %s", shape, key[2], forms)
    return _FORMS[key]


def _valid_forms(forms) -> tuple[str, str, str] | None:
    """Saved forms as a tuple, None unless each slot holds a form it may hold here."""
    if not isinstance(forms, list | tuple) or len(forms) != 3 or not all(isinstance(f, str) for f in forms):
        return None
    many = forms[1] if forms[1] != DNN_ANY else DNN
    ok = forms[0] in (LINEAR, TALL) and many in _many_forms() and forms[2] in (LINEAR, TALL)
    return tuple(forms) if ok else None


def _forms_file() -> str | None:
    """Where the forms timed on this machine are kept (``MODALIGN_DECODE_FORMS``: a file, or empty
    for none; by default ``$XDG_CACHE_HOME/modalign/decode_forms.json``, ``~/.cache``): later
    processes take the same forms instead of timing them again. Timings near the 10% bar can come
    out either way, and the forms sum in different orders, so a process that timed anew could
    answer a near-tie otherwise than the one before on the same machine. Delete the file to time
    again (after a noisy first timing, say)."""
    path = os.environ.get("MODALIGN_DECODE_FORMS")
    if path is None:
        path = os.path.join(_cache_dir(), "decode_forms.json")
    return path or None


@functools.cache
def _machine() -> str:
    """This machine's CPU, its vector ISA as torch sees it, torch's version and the forms'
    version: the key saved forms are kept under (read once per process)."""
    import platform

    cpu = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() in ("model name", "CPU implementer", "CPU part") and v.strip() not in cpu:
                    cpu.append(v.strip())
    except OSError:
        pass
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        isa = "?"
    return f"{' '.join(cpu) or platform.processor() or platform.machine()} | {isa} | torch {torch.__version__} | forms v{_FORMS_VERSION}"


def _saved_forms() -> dict:
    """The forms saved for this machine (``_forms_file``), keyed by shape, bytes timed, threads
    and whether packed products exist."""
    path = _forms_file()
    return {} if path is None else _this_machine(_read_forms(path))


def _read_forms(path: str) -> dict:
    """The forms file's machines (empty where there is none yet, or it is unreadable: time anew)."""
    try:
        with open(path) as f:
            every = json.load(f)
    except (OSError, ValueError):
        return {}
    return every if isinstance(every, dict) else {}


def _this_machine(every: dict) -> dict:
    mine = every.get(_machine())
    return mine if isinstance(mine, dict) else {}


def _save_forms(name: str, forms: tuple[str, str, str]) -> tuple[str, str, str]:
    """Save ``forms`` under ``name`` unless another process saved forms there first: returns the
    forms saved, so that processes timing at the same moment end up with the same. The file is
    read and replaced under a lock (where the system has one) and written whole to a temporary
    file first, so a reader sees the old file or the new one."""
    path = _forms_file()
    if path is None:
        return forms
    import tempfile

    tmp = None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".lock", "a") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:  # no advisory locks here: the last writer wins
                pass
            every = _read_forms(path)
            mine = _this_machine(every)
            first = _valid_forms(mine.get(name))
            if first is not None:
                return first
            mine[name] = list(forms)
            every[_machine()] = mine
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(every, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            tmp = None
    except OSError as e:  # a read-only home: the forms are timed again next time
        log.debug("decode forms not saved to %s: %s", path, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return forms


def _fastest(times: dict[str, float]) -> str:
    """``x @ w.T`` unless another form is at least 10% faster: then the fastest."""
    form = min(times, key=times.get)
    return form if times[form] < 0.9 * times[LINEAR] else LINEAR


@functools.cache
def _llc_bytes() -> int:
    """The last-level cache the process's CPUs have (Linux's sysfs): the largest cache level's size,
    summed over its distinct instances among the CPUs this process may run on (chiplets and sockets
    each have their own); 32 MiB where unknown."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = [0]
    found: dict[tuple[int, str], int] = {}  # (level, the CPUs sharing it) -> bytes
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/cache"
        try:
            entries = [d for d in os.listdir(base) if d.startswith("index")]
        except OSError:
            continue
        for d in entries:  # an entry that cannot be read is passed over, the others still count
            try:
                level, size, shared = (_sysfs(base, d, f) for f in ("level", "size", "shared_cpu_list"))
                found[(int(level), shared)] = _cache_size(size)
            except (OSError, ValueError):
                continue
    top = max((level for level, _ in found), default=None)
    return sum(size for (level, _), size in found.items() if level == top) or 32 * 2**20


def _sysfs(*path: str) -> str:
    with open(os.path.join(*path)) as f:
        return f.read().strip()


def _flush_buffer() -> torch.Tensor:
    """What ``_times`` reads before a round to push the matrices out of the caches: twice the
    last-level cache, at most 1 GiB and a quarter of the memory available."""
    free = _free_memory()
    size = min(2 * _llc_bytes(), 2**30, free // 4 if free else 2**30)
    return torch.ones(max(size, 4) // 4)


def _cache_size(text: str) -> int:
    """sysfs's cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@torch.no_grad()
def _times(ws: list[torch.Tensor], rows: int, forms: tuple[str, ...], reps: int = 3,
           cold: bool = False) -> dict[str, float]:  # fmt: skip
    """Seconds for products of ``rows`` rows with each of the matrices ``ws``, in each form;
    ``cold``: each round reads the matrices from memory (``_flush_buffer`` read before it)."""
    x = torch.full((rows, ws[0].shape[1]), 0.5)  # any values (not random: the global generator stays put)
    mats = [Mat(w) for w in ws]
    flush = _flush_buffer() if cold else None

    def best(form) -> float:
        times = []
        for _ in range(reps + 1):  # the first round warms up
            if flush is not None:
                flush.sum()  # the matrices leave the caches
            t0 = time.perf_counter()
            for m in mats:
                _product(x, m, form)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    out = {}
    for form in forms:
        for m in mats:  # the copies this form multiplies (one kind at a time)
            m.packed = None
        try:
            for m in mats:
                m.packed = _pack(m.w, form) if form in PACKS else None
            out[form] = best(form)
        except RuntimeError as e:  # a packed product this build has but cannot run here: never chosen
            log.debug("decode form %s unavailable: %s", form, e)
            out[form] = float("inf")
    return out


def _product(x2: torch.Tensor, m: Mat, form: str) -> torch.Tensor:
    """``x2 @ m.w.T`` for ``x2`` [n, in] in the given form (no bias)."""
    if form == TALL:
        return _tall(x2, m.w)
    if form == PACKED:
        n = x2.shape[0]
        xp = F.pad(x2, (0, 0, 0, PACK_ROWS - n))  # padded to the rows it was packed for
        if torch.compiler.is_compiling():
            return _packed_linear(xp, m.packed, m.w, None)[:n]
        return torch.ops.mkl._mkl_linear(xp, m.packed, m.w, None, PACK_ROWS)[:n]
    if form in DNNS:
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), m.packed, None, "none", [], "")
    return F.linear(x2, m.w)


def _lin(x, m: Mat):
    """``x @ m.w.T (+ m.b)`` for ``m.w`` [out, in], in the form ``m.forms`` says is the fastest
    on this machine for that many rows (``_forms``). Float32 matrices on the CPU can be
    multiplied as ``(w @ x.T).T`` over at least two rows (one row is doubled), a tall product
    the BLAS runs over all its threads, instead of ``x @ w.T``, which with a few rows may be a
    one-thread matrix-vector product per row; or, with more than ``FEW_ROWS`` and up to
    ``PACK_ROWS`` rows, against a copy packed for that many rows (made by ``DecodePlan.pack``)
    by MKL (rows padded to ``PACK_ROWS``) or by oneDNN (eager steps only: a compiled one takes the
    unpacked form), whose copy takes any number of rows: ``DNN_ANY``, where it also won with
    ``MORE_ROWS`` rows, multiplies every eager step of more than ``FEW_ROWS`` rows against it (on
    the AMD EPYC below 2.1x the tall form with 16 rows, 1.4x with 64). Which is faster depends on the CPU and its BLAS
    (``bench/bench_decode.py``, a 6-layer 512-wide Llama's matrices, 2 threads: on an AMD EPYC
    the tall form with one row (2.2x ``x @ w.T``) and oneDNN's packed copy with eight (1.9x the
    tall form); on an Intel Xeon ``x @ w.T`` with one row (2.6x the tall form), MKL's packed copy
    with eight (1.3x ``x @ w.T`` over all the matrices read from memory, 1.5x on the LM head))."""
    w = m.w
    if not isinstance(w, torch.Tensor):  # a quantized matrix (``Int8Linear``, ``Int4Linear``), bias included
        return w(x)
    few, many, unpacked = m.forms
    # one form for any row count where they agree: no branch on the batch size (a compiled step
    # guards on none); the packed copy is looked at only above FEW_ROWS rows, so graphs for fewer
    # rows stay valid when it is made
    if few == many == unpacked or (n := x.numel() // x.shape[-1]) <= FEW_ROWS:
        form = few
    elif (
        not (many in DNNS and torch.compiler.is_compiling())  # an opaque oneDNN tensor: eager only
        and (n <= PACK_ROWS or many == DNN_ANY)  # (after it: a compiled step guards on no row count)
        and (many not in PACKS or m.packed is not None)
    ):
        form = many
    else:
        form = unpacked
    if form == LINEAR:
        return F.linear(x, w, m.b)
    y = _product(x.reshape(-1, x.shape[-1]), m, form).view(*x.shape[:-1], w.shape[0])
    return y if m.b is None else y + m.b


def decode_layers(plan: DecodePlan, cfg, x, cos, sin, mask, write, attention=attend):
    """The decoder blocks for one text token per row; ``write(i, k, v)`` stores the new keys
    and values of layer ``i`` and returns the keys/values to attend over. Returns logits [B, V]."""
    b, eps, nh, nkv, hd = x.shape[0], cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
    inter = cfg.intermediate_size
    for i, (w_in, qkv, o, w_post, gu, d) in enumerate(plan.layers):
        h = rms_norm(x, w_in, eps)
        heads = _lin(h, qkv).view(b, nh + 2 * nkv, hd)  # [q heads, k heads, v heads]
        qk = apply_rotary(heads[:, : nh + nkv], cos, sin)  # RoPE on q and k at once
        k, v = write(i, qk[:, nh:, None], heads[:, nh + nkv :, None])
        a = attention(qk[:, :nh, None], k, v, mask)
        x = x + _lin(a.reshape(b, 1, nh * hd), o)
        gate, up = _lin(rms_norm(x, w_post, eps), gu).split(inter, -1)
        x = x + _lin(gated_mlp(gate, up, F.silu), d)
    return _lin(rms_norm(x[:, -1], plan.norm, eps), plan.head)


def _static_step(plan, cfg, rotary, ids, pos, valid, ks, vs, idx):
    """Decode step over the whole preallocated cache (static shapes, for ``torch.compile``):
    new keys/values are written at ``idx``; ``valid`` [B, max_len] says which slots to attend."""

    def write(i, k, v):
        ks[i].index_copy_(2, idx, k)
        vs[i].index_copy_(2, idx, v)
        return ks[i], vs[i]

    x = F.embedding(ids, plan.embed)
    cos, sin = rotary(pos, x.dtype)
    return decode_layers(plan, cfg, x, cos, sin, valid[:, None, None, :], write, _attend_one)


def _dynamic_step(plan, cfg, rotary, ids, pos, valid, ks, vs, idx):
    """``_static_step`` compiled once for any batch size and cache length (its own code object, so
    its graphs are cached apart from the static ones)."""
    return _static_step(plan, cfg, rotary, ids, pos, valid, ks, vs, idx)


def _run_dynamic(fn, args):
    """``fn`` (``_dynamic_step`` compiled) with the batch size and the cache length symbolic and
    every other size (heads, head size) static: one graph for a single row (a size of 1 is
    specialised) and, for any cache length, one for each range of batch sizes whose matrix forms
    differ (2 to ``FEW_ROWS``, up to ``PACK_ROWS``, more; one for all where the forms agree).
    Sizes that happen to be equal when it compiles are not assumed equal afterwards (no duck
    shaping)."""
    import torch._dynamo
    from torch.fx.experimental import _config as fx_config

    _, _, _, ids, pos, valid, ks, vs, _ = args
    for t in (ids, pos):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    for t in (valid, *ks, *vs):
        torch._dynamo.maybe_mark_dynamic(t, [0, t.dim() - 2 if t.dim() == 4 else 1])
    with fx_config.patch(use_duck_shape=False):
        return fn(*args)


def _recompile_limit(n: int) -> None:
    """Let the compiler keep up to ``n`` graphs per function (its default, 8, is too few for the
    static step's batch sizes and cache lengths). Its settings hold per thread in recent torch
    (context variables; a server compiles in its scheduler's thread), so this is called in the
    thread that runs the step."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < n:
        setattr(cfg, name, n)


def _persistent_compile_cache() -> None:
    """Keep the compiler's cache (inductor's compiled graphs) across reboots: under
    ``$XDG_CACHE_HOME/modalign/inductor`` (``~/.cache``) unless ``TORCHINDUCTOR_CACHE_DIR`` says
    where; the compiler's own default is a folder under ``/tmp``. A process compiling a decode
    step it compiled before then loads the kernels instead of building them again."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_cache_dir(), "inductor")


def _cache_dir() -> str:
    """modalign's folder for what it keeps between processes: ``$XDG_CACHE_HOME/modalign``
    (``~/.cache/modalign``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "modalign")


class FastDecoder:
    """A model's fused decode step (``step``), eager or compiled.

    ``compile``: the step runs through ``torch.compile`` (inductor), so the per-op dispatch of a
    step becomes a few fused kernels. ``compiled_step`` has static shapes, one compiled graph per
    (batch, cache length); callers round the cache length up (``round_cache_len``) so graphs are
    reused (``Engine.generate``). ``compiled_step(..., dynamic=True)`` runs graphs compiled for
    any cache length and a range of batch sizes (``_run_dynamic``), for callers whose batch
    changes from step to step (the server's continuous batching). Attention then runs over every cache
    slot with a validity mask, which gives the same result as attending over the filled prefix.
    If compiling fails (e.g. no C++ compiler), it logs why once and ``compiled_step`` returns None
    from then on: the caller uses the eager step."""

    def __init__(self, llm: LLM, compile: bool = False, max_graphs: int = 32):
        self.llm = llm
        self.plan: DecodePlan | None = None
        self.failed: str | None = None
        self.shapes: set[tuple[int, int]] = set()  # (batch, cache length) of the graphs compiled
        self.max_graphs = max_graphs
        self.fn = self.fn_dynamic = None
        if compile:
            _persistent_compile_cache()
            _recompile_limit(max_graphs)
            self.fn = torch.compile(_static_step, dynamic=False, fullgraph=True)
            self.fn_dynamic = torch.compile(_dynamic_step, fullgraph=True)  # batch and cache length marked

    @property
    def compiled(self) -> bool:
        return self.fn is not None and self.failed is None

    @staticmethod
    def round_cache_len(n: int, multiple: int = 128) -> int:
        return -(-n // multiple) * multiple

    def _plan(self, cache: KVCache) -> DecodePlan:
        # checked once per generation (right after the prefill), not per step
        if self.plan is None or (cache.length == cache.prefill_length and self.plan.stale(self.llm)):
            self.plan = DecodePlan(self.llm)
        return self.plan

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: KVCache, position_ids=None, attention_mask=None) -> torch.Tensor:
        """One text token per row ([B, 1]) through the cached decoder -> last logits [B, V]."""
        plan = self._plan(cache)
        plan.pack(ids.shape[0])
        x = F.embedding(ids, plan.embed)
        start = cache.length
        if position_ids is None:
            position_ids = torch.full((ids.shape[0], 1), start, dtype=torch.long, device=ids.device)
        cos, sin = self.llm.rotary(position_ids, x.dtype)  # [B, 1, hd]: broadcast over heads
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        logits = decode_layers(
            plan, self.llm.cfg, x, cos, sin, mask, lambda i, k, v: cache.write(i, k, v, start)
        )
        cache.length = start + 1
        return logits

    @torch.no_grad()
    def compiled_step(self, ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor,
                      valid: torch.Tensor, dynamic: bool = False) -> torch.Tensor | None:  # fmt: skip
        """One compiled step; ``valid`` [B, cache.max_len] must already mark this step's slot.
        ``dynamic``: the graph for any shape (else one per shape). None if compiling failed."""
        if not self.compiled:
            return None
        plan = self._plan(cache)
        plan.pack(ids.shape[0], compiled=True)
        start = cache.length
        if start >= cache.max_len:
            raise ValueError(f"KV cache full: need {start + 1} positions, allocated {cache.max_len}")
        idx = torch.tensor([start], device=ids.device)
        try:
            _recompile_limit(self.max_graphs)  # the compiler's settings are per thread: the caller's
            args = (plan, self.llm.cfg, self.llm.rotary, ids, position_ids, valid, cache.k, cache.v, idx)
            logits = _run_dynamic(self.fn_dynamic, args) if dynamic else self.fn(*args)
        except Exception as e:  # noqa: BLE001 - any backend failure means: use the eager step
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("compiled decoding is unavailable (%s); using the eager decode step", self.failed)
            return None
        cache.length = start + 1
        if not dynamic:
            self.shapes.add((ids.shape[0], cache.max_len))
        return logits

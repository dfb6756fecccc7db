"""Choosing a device and a floating-point precision by name ("auto" picks the best available)."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA if present, else Apple MPS, else the CPU; or a name (cpu, cuda, cuda:N, mps)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {name!r} is not available here (CUDA devices: {torch.cuda.device_count()})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' is not available here")
    return dev


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on the CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto")
    return DTYPES[name]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_HOST_MALLOC: bool | None = None  # whether keep_freed_host_memory took effect (None: not yet asked)


def keep_freed_host_memory() -> bool:
    """Have glibc's ``malloc`` keep freed blocks of up to 32 MiB for reuse instead of returning
    them to the kernel (which zeroes every page again on its next touch). Once per process, on
    Linux with glibc; True where it took effect. The trainer calls it when it trains on a CPU.

    By default glibc maps large blocks freshly and trims the heap's free top: LLaVA's quickstart
    method stages faulted in 3.0-3.4 million fresh pages, 0.5-0.6 million after. The process keeps
    its peak heap instead (as jemalloc and tcmalloc do). Left alone where the user tunes malloc
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) or sets
    ``MODALIGN_HOST_MALLOC=default``. Numerics are unchanged (tensors stay 64-byte aligned)."""
    global _HOST_MALLOC
    if _HOST_MALLOC is not None:
        return _HOST_MALLOC
    _HOST_MALLOC = False
    env = os.environ
    if env.get("MODALIGN_HOST_MALLOC") == "default" or any(
        k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    ):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # a fixed mmap threshold (this also stops glibc's own adjustment; 32 MiB is its largest on
        # 64-bit), and the largest trim threshold (2 GiB): the heap's free top stays below that
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        )
    except (OSError, AttributeError):
        return False
    _HOST_MALLOC = ok
    return ok


def in_own_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a new thread that ends with it; returns its result or
    raises its exception. For torch work done once before a long-lived thread takes over (a
    server's loading and warm-up before its generation worker runs the model).

    Why: a thread that runs a parallel CPU op keeps a pool of OpenMP threads for as long as it
    lives, and once the pools of a process hold more threads than there are CPUs, GNU OpenMP
    (torch's CPU builds) makes every pool's threads sleep after about 100 spins instead of some
    300,000 between parallel regions, so each parallel op then pays a futex wake-up. On 2 CPUs a
    server whose main thread had loaded the model ran the tiny model's one-row decode step in
    3.9 ms against 1.45 ms. A thread that ends gives its pool back."""
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    # a daemon: Ctrl-C in the caller (a long load) ends the process without waiting for it
    t = threading.Thread(target=run, name=getattr(fn, "__name__", "modalign-once"), daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]

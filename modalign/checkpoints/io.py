"""Reading and writing tensors: safetensors only (single file or sharded with an index),
strict state-dict loading with errors that name the tensor, atomic directory saves."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint directory is unreadable, unsupported, or does not fit the model."""


def read_config(path: str | Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a model directory?)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON: {e}") from None


def _index_files(d: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed shard index ({e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: malformed shard index (weight_map is not an object)")
    root = d.resolve()
    for name in set(weight_map.values()):
        if not isinstance(name, str) or root not in (d / name).resolve().parents:
            raise CheckpointError(f"{index}: shard {name!r} is not a file inside {d}")
    files = sorted({d / name for name in weight_map.values()})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
    return files


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors (single file or an index's shards)
    where there are any, else PyTorch ``.bin`` files (``pytorch_model.bin`` or an index's shards),
    which are read with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickle."""
    d = Path(path)
    for index in (d / "model.safetensors.index.json", d / "pytorch_model.bin.index.json"):
        if index.is_file():
            return _index_files(d, index)
    for single in (d / "model.safetensors", d / "pytorch_model.bin"):
        if single.is_file():
            return [single]
    others = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if others:
        return others
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or a shard index")


def safetensors_files(path: str | Path) -> list[Path]:
    return [f for f in weight_files(path) if f.suffix == ".safetensors"]


def read_bin(file: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` / ``.pth`` state dict (or a training file's ``{"model": state dict}``),
    memory-mapped, with ``weights_only=True``: a file holding anything but tensors (and plain
    containers of them) is refused, never executed."""
    file = Path(file)
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (pre-zip) file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused: it holds more than tensors ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable PyTorch file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a LAVIS / MiniGPT-4 training file: {"model": state dict, ...}
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    ):
        raise CheckpointError(f"{file}: expected a state dict of named tensors")
    return obj


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in weight_files(path):
        if f.suffix == ".bin":
            yield from read_bin(f).items()
            continue
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


def read_shapes(path: str | Path) -> dict[str, torch.Size]:
    """Tensor names and shapes of a checkpoint, without reading the data."""
    out = {}
    for f in weight_files(path):
        if f.suffix == ".bin":
            out.update({k: v.shape for k, v in read_bin(f).items()})  # memory-mapped: no data read
            continue
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = torch.Size(fh.get_slice(k).get_shape())
    return out


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None
) -> None:
    """Copy ``state`` into ``model``. Every parameter/persistent buffer must be present with
    the right shape and nothing may be left over; errors name the tensors and shapes."""
    expected = model.state_dict()
    tied = _tied_aliases(model)
    want = {k: v for k, v in expected.items() if k not in tied}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != tuple(want[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            if k in tied:
                continue
            target = expected[k]
            target.copy_(v.to(target.dtype if dtype is None else dtype))


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (tied embeddings): optional in files."""
    seen, aliases = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and t.numel():
            aliases.add(name)
        else:
            seen[key] = name
    return aliases


def _short(items: list[str], n: int = 12) -> str:
    head = ", ".join(items[:n])
    return head + (f" ... and {len(items) - n} more" if len(items) > n else "")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    An interrupted write leaves the previous ``path`` untouched (the temp dir is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# a tokenizer's files (a save over a checkpoint keeps them)
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.json",
                      "merges.txt", "*.model")  # fmt: skip
# what a checkpoint folder may hold: a save replaces the whole folder, so one holding anything else
# (a user's files, sub-folders, the checkpoint being read) is refused, never deleted
_CHECKPOINT_PATTERNS = (*TOKENIZER_PATTERNS, "config.json", "generation_config.json", "preprocessor_config.json",
                        "processor_config.json", "adapter_config.json", "README.md", ".gitattributes", "*.safetensors",
                        "*.safetensors.index.json", "*.bin", "*.bin.index.json")  # fmt: skip


def check_replaceable(path: str | Path, reads: tuple = ()) -> None:
    """Refuse to write a checkpoint to ``path`` when that would delete what is not a checkpoint's:
    a file, a folder holding other files or sub-folders, or a folder that is (or holds) one of
    ``reads`` (the checkpoints the write reads from)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder")
    here = path.resolve()
    for r in reads:
        r = Path(r).resolve()
        if here == r or here in r.parents:
            raise CheckpointError(f"writing a checkpoint to {path} would replace {r}, which this write reads")
    other = sorted(p.name for p in path.iterdir()
                   if p.is_dir() or not any(p.match(g) for g in _CHECKPOINT_PATTERNS))  # fmt: skip
    if other:
        raise CheckpointError(f"{path} holds {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}, no "
                              "checkpoint's files: a save replaces the whole folder; give a new or empty one")  # fmt: skip


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part of it (a temp file, flushed,
    then renamed over it)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_dir(tmp: Path, path: Path) -> None:
    """Flush every file under the finished directory ``tmp`` to disk, then rename it to ``path``
    (replacing an existing one only after the new one is complete)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def recover_dirs(parent: str | Path) -> list[str]:
    """Clean up after directory commits a kill interrupted (``atomic_dir``): a ``.NAME.old-*`` whose
    ``NAME`` is missing is renamed back (the kill fell between the two renames of ``commit_dir``);
    other ``.NAME.old-*`` and every ``.NAME.tmp-*`` (an unfinished write) are removed. Returns
    what was done, one line each."""
    parent, done = Path(parent), []
    if not parent.is_dir():
        return done
    for p in sorted(parent.iterdir()):
        if not (p.is_dir() and p.name.startswith(".")):
            continue
        name, sep, _ = p.name[1:].rpartition(".old-")
        if sep and not (parent / name).exists():
            os.replace(p, parent / name)
            done.append(f"restored {parent / name} from {p.name}")
        elif sep or ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p}")
    return done


def copy_dir_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy the directory ``src`` to ``dst``: written beside ``dst`` and renamed into place, so an
    interrupted copy never leaves a half-written ``dst``."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file), metadata)

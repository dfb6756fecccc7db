"""Devices and precisions by name: ``--device`` / ``--dtype`` on generate and eval, the Python
API loading straight into the requested dtype, and clear errors for what is not there."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalign import MLLM
from modalign.cli import main
from modalign.devices import resolve_device, resolve_dtype
from modalign.infer.chat import ChatModel, user_message


def test_names_resolve_and_unavailable_devices_are_named():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu and resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("float16", cpu) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="device 'cuda' is not available here"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", cpu)


def test_bf16_loads_straight_in_bf16_and_answers_like_fp32(tiny_model, world):
    m16 = MLLM.from_pretrained(tiny_model, dtype=torch.bfloat16, device="cpu")
    m32 = MLLM.from_pretrained(tiny_model)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    # the bf16 weights are the fp32 ones rounded: nothing else differs
    for (n, a), (_, b) in zip(m16.state_dict().items(), m32.state_dict().items(), strict=True):
        assert torch.equal(a, b.to(a.dtype)), n
    cm16, cm32 = ChatModel.load(tiny_model, dtype="bfloat16"), ChatModel.load(tiny_model, dtype="float32")
    img = sorted((world / "images").glob("*.png"))[0]
    with torch.no_grad():
        p = cm32.prompt([user_message("What colour is the circle?", 1)], [img])
        ids, px = torch.tensor([p.input_ids]), torch.stack(p.pixel_values)
        l32 = cm32.model(ids, pixel_values=px).logits[0, -1]
        l16 = cm16.model(ids, pixel_values=px).logits[0, -1].float()
    assert (l16 - l32).abs().max() < 0.1 * l32.abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_on_a_named_device_and_dtype(tiny_model, capsys, monkeypatch, dtype):
    """The model ``generate`` answers with is loaded in the named dtype on the named device, and
    its reply is that model's greedy reply."""
    loaded = []
    real = ChatModel.load.__func__

    def spy(cls, *a, **k):
        loaded.append(real(cls, *a, **k))
        return loaded[-1]

    monkeypatch.setattr(ChatModel, "load", classmethod(spy))
    argv = ["generate", "--model", str(tiny_model), "--prompt", "Hello", "--max-new-tokens", "4", "--json",
            "--device", "cpu", "--dtype", dtype]  # fmt: skip
    assert main(argv) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (cm,) = loaded
    assert {p.dtype for p in cm.model.parameters()} == {getattr(torch, dtype)}
    assert {p.device.type for p in cm.model.parameters()} == {"cpu"}
    again = ChatModel.load(tiny_model, dtype=dtype).reply(
        [user_message("Hello", 0)], [], cm.params(max_new_tokens=4)
    )
    assert reply["token_ids"] == again.token_ids and reply["completion_tokens"] == len(again.token_ids) >= 1


def test_a_bad_device_or_dtype_is_a_clear_cli_error(tiny_model, capsys):
    base = ["generate", "--model", str(tiny_model), "--prompt", "Hello", "--max-new-tokens", "2"]
    assert main([*base, "--dtype", "half"]) == 2
    assert "unknown dtype 'half'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda:1"]) == 2
        assert "is not available here" in capsys.readouterr().err


_FRESH_PAGES = """
import resource, sys, torch
from modalign.devices import keep_freed_host_memory
took = keep_freed_host_memory()
def touch():  # a step's activations: tensors of several sizes (1-16 MiB) live at once, then freed
    keep = [torch.ones(n << 18) for n in (16, 4, 11, 2, 16, 7, 16, 1)]
    del keep
for _ in range(3):
    touch()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_freed_host_memory_is_reused_not_faulted_in_afresh():
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "MODALIGN_"))
    }

    def run(**env):
        out = subprocess.run([sys.executable, "-c", _FRESH_PAGES], env={**base, **env},
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        return out[0] == "True", int(out[1])

    pages = 10 * 73 * 256  # ten steps of 73 MiB in 4 KiB pages
    # glibc's default hands most of it back to the kernel and faults it in afresh in most runs (not
    # asserted: whether it can depends on where small allocations happened to land)
    assert run(MODALIGN_HOST_MALLOC="default")[0] is False
    took, fresh = run()
    assert took and fresh < pages // 40  # reused: at most a quarter of one step's pages is new


def test_in_own_thread_returns_raises_and_runs_elsewhere():
    import threading

    from modalign.devices import in_own_thread

    main = threading.get_ident()
    assert in_own_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)[0] == 5
    assert in_own_thread(threading.get_ident) != main

    def fails():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        in_own_thread(fails)


OMP_THREADS = """
import os, time, torch
from modalign.devices import in_own_thread
torch.set_num_threads(2)
def n():
    return len(os.listdir("/proc/self/task"))
def work():
    return float(torch.randn(4_000_000).exp_().sum())
before = n()
in_own_thread(work)
for _ in range(200):  # the pool's threads end soon after the thread that owned them
    if n() == before:
        break
    time.sleep(0.01)
after_own = n()
work()
print(before, after_own, n())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_in_own_thread_gives_its_openmp_threads_back():
    """A parallel op in a thread that ends leaves no OpenMP threads behind (one in a thread that
    lives on, the main thread here, leaves its pool)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's CPU ops are not parallelised by OpenMP here")
    out = subprocess.run([sys.executable, "-c", OMP_THREADS], capture_output=True, text=True, check=True)
    before, after_own, after_main = map(int, out.stdout.split())
    assert after_own == before < after_main

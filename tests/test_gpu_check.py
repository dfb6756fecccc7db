"""``bench/gpu_check.py`` (what a GPU machine runs) goes through on the CPU at its tiny size."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_at_its_tiny_size():
    cmd = [sys.executable, "bench/gpu_check.py", "--size", "tiny", "--device", "cpu", "--dtype", "bfloat16",
           "--steps", "3", "--batch", "4", "--new-tokens", "8"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert (rep["dtype"], rep["train_steps"], rep["generate_tokens"]) == ("bfloat16", 3, 4 * 8)
    assert rep["train_tok_per_s"] > 0 and rep["train_final_loss"] > 0

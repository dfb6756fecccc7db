"""The benchmark scripts still run end to end (a short smoke run; CI does not time anything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_decode_runs_and_reports_every_matrix_form(tmp_path):
    env = {**os.environ, "MODALIGN_DECODE_FORMS": str(tmp_path / "forms.json")}
    out = subprocess.run(
        [sys.executable, "bench_decode.py", "--size", "tiny", "--new-tokens", "4", "--threads", "1", "--json",
         "--no-compile", "--no-int4"],
        cwd=BENCH, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(doc["batches"]) == {"1", "8"}
    for row in doc["batches"].values():
        assert row["eager"]["same_greedy"] == 4  # modalign's greedy tokens are transformers'
    # one entry per fp32 matrix shape of the tiny model's decoder, each with its three forms
    assert {"512x256", "256x256", "1376x256", "256x688"} <= set(doc["forms"])
    assert all(len(f) == 3 for f in doc["forms"].values())


def test_bench_chat_runs_and_the_prefix_cache_changes_no_token():
    out = subprocess.run(
        [sys.executable, "bench_chat.py", "--size", "tiny", "--turns", "3", "--reply", "4", "--threads", "1", "--json"],
        cwd=BENCH, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["same_tokens"] == {"transformers": True, "modalign": True, "modalign+prefix": True}
    assert [r["prompt_tokens"] for r in doc["rows"]] == [
        47,
        71,
        95,
    ]  # prompt, reply (4) and 20 new tokens a turn
    assert doc["reused_tokens"] == 48 + 64  # whole blocks of turns 1 and 2: prompt and the 3 replies fed back

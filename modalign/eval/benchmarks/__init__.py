"""Benchmarks, one module each, behind one registry: how to read the benchmark's public file
format, how to prompt for it, how to score an answer and what to aggregate.

    vqa          VQAv2 (questions + annotations JSON) or a JSON list with 10 answers   vqa.py
    exact        TextVQA / GQA-style single answers                                   exact.py
    mc           ScienceQA problems.json, MMBench .tsv (circular), a JSON list        mc.py
    scienceqa    ScienceQA problems.json in the MM-CoT formats: scienceqa (QCM->A),   scienceqa.py
                 scienceqa-cot (QCM->LEA), scienceqa-le / scienceqa-qcmg (two stages)
    pope         POPE JSONL (yes/no object hallucination)                             pope.py
    mme          the MME release folder or JSONL                                      mme.py
    caption      COCO captions (BLEU-4, CIDEr-D)                                      caption.py
    llava-bench  LLaVA-Bench with a judge; owleval: OwlEval-style grades           judged.py

A package can add its own (``register``); ``modalign.shapesworld`` adds ``shapes``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Benchmark:
    """``read(path, references) -> records`` ({id, image, question, gold, category, [options]});
    ``score(record, options, gold, raw) -> dict`` (at least ``answer`` and ``score``, None where a
    judge scores); ``aggregate(samples, circular) -> dict`` adds the benchmark's own metrics."""

    name: str
    read: Callable[[Path, Path | None], list[dict]]
    score: Callable[[dict, dict | None, object, str], dict]
    suffix: str = ""  # appended to every question (the benchmark's answer-format instruction)
    aggregate: Callable[[list[dict], bool], dict] | None = None
    # an LLM judge grades the answers (``eval/judge.py``): (rows, client, cache) -> (rows, results)
    judge: Callable | None = None
    prompt_version: str = "v1"
    # the leaderboard's file next to samples.jsonl (``eval/submission.py``): (out, samples, results) -> paths
    submission: Callable | None = None


REGISTRY: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    REGISTRY[b.name] = b
    return b


def get(name: str) -> Benchmark:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def need(rec: dict, keys: tuple[str, ...], where: str) -> None:
    """Raise naming the record and the missing fields."""
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")


def strings(value, field: str, where: str, least: int = 1) -> list[str]:
    """``value`` as a list of at least ``least`` strings, else a ValueError naming the record (a
    string in its place was read character by character)."""
    if not isinstance(value, list) or len(value) < least or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{where}: {field} must be a list of at least {least} string(s), got {value!r:.80}")
    return value


def rows(path: Path) -> list[tuple[str, dict]]:
    """(where, record) pairs of a JSON list or a JSONL file; ``where`` names the line or index."""
    if path.suffix == ".jsonl":
        return [(f"{path.name}:{n}", json.loads(line))
                for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]  # fmt: skip
    return [(f"{path.name} record {i}", r) for i, r in enumerate(json.loads(path.read_text()))]


def read_rows(convert: Callable[[dict, str], dict]) -> Callable[[Path, Path | None], list[dict]]:
    """A ``read`` for a benchmark stored as a JSON list / JSONL with one record per row."""

    def read(path: Path, references: Path | None = None) -> list[dict]:
        return [convert(r, where) for where, r in rows(path)]

    return read


# the built-in benchmarks register themselves (after the names above exist)
from modalign.eval.benchmarks import caption, exact, judged, mc, mme, pope, scienceqa, vqa  # noqa: E402, F401

"""Leaderboard files: ``modalign eval`` writes, next to ``samples.jsonl``, the file the benchmark's
evaluation server or official script takes. A benchmark names its writer in ``Benchmark.submission``:
``writer(out, samples, results) -> [written paths]``.

    vqa          vqav2_submission.json      [{"question_id": int, "answer": str}] (EvalAI: test-dev, test-std)
    mme          mme_results/<subtask>.txt  image_name<TAB>question<TAB>ground truth<TAB>prediction
                                            (MME's eval_tool/calculation.py reads a folder of these)
    mc (.tsv)    mmbench_submission.tsv     index, question, [hint,] A..D, answer, prediction (letter),
                 mmbench_submission.xlsx    [category, l2-category]; .xlsx when openpyxl is installed
    llava-bench  llava_bench_answers.jsonl  LLaVA's answers JSONL, as its review scripts read it

Answers are written as the model gave them (VQAv2: stripped, tabs and newlines as spaces, not
normalised: the server normalises as modalign's own scoring does), so the server's score and the
local one read the same text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

from modalign.eval.metrics import evalai_answer

VQAV2_FILE = "vqav2_submission.json"
MME_DIR = "mme_results"
MMBENCH_FILE = "mmbench_submission"  # .tsv and .xlsx
LLAVA_BENCH_FILE = "llava_bench_answers.jsonl"


def one_line(text: str) -> str:
    """The text with its line breaks and tabs as spaces (a field of a line-based file)."""
    return re.sub(r"\r\n|[\r\n\t]", " ", text)


def _question(s: dict, suffix: str) -> str:
    """The benchmark's own question: the prompt without the answer-format instruction."""
    p = s["prompt"]
    return p[: -len(suffix)] if suffix and p.endswith(suffix) else p


def _suffix(results: dict) -> str:
    from modalign.eval import benchmarks

    b = benchmarks.REGISTRY.get(results.get("task", ""))
    return b.suffix if b is not None else ""


# ------------------------------------------------------------------------------------ VQAv2


def _question_id(x):
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return x


def vqav2(out: Path, samples: list[dict], results: dict) -> list[Path]:
    """``[{"question_id", "answer"}]`` for EvalAI's VQAv2 challenge (one entry per question): each
    reply through the EvalAI answer processor, as LLaVA's converter uploads it (``evalai_answer``)."""
    rows = [{"question_id": _question_id(s["id"]), "answer": evalai_answer(s["raw"])} for s in samples]
    path = Path(out) / VQAV2_FILE
    path.write_text(json.dumps(rows) + "\n")
    return [path]


# ------------------------------------------------------------------------------------ MME


def mme(out: Path, samples: list[dict], results: dict) -> list[Path]:
    """One ``<subtask>.txt`` per subtask, an image's questions on consecutive lines (MME's tool
    scores them in pairs); the prediction is the raw reply on one line."""
    suffix = _suffix(results)
    by_task: dict[str, dict[str, list[str]]] = {}
    for s in samples:
        image = Path(s["image"]).name if s.get("image") else str(s["id"])
        line = "\t".join(
            [one_line(image), one_line(_question(s, suffix)), str(s["gold"]), one_line(s["raw"])]
        )
        by_task.setdefault(str(s["category"]), {}).setdefault(image, []).append(line)
    folder = Path(out) / MME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, images in sorted(by_task.items()):
        path = folder / (re.sub(r"[\\/]", "_", task) + ".txt")
        path.write_text("".join(line + "\n" for lines in images.values() for line in lines))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ MMBench


def _mmbench_rows(tsv: Path) -> tuple[list[str], list[dict]]:
    csv.field_size_limit(sys.maxsize)
    with tsv.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return list(reader.fieldnames or []), list(reader)


def mmbench_table(tsv: Path, samples: list[dict]) -> list[list]:
    """The submission table (header first) for the questions of ``tsv`` that were evaluated: the
    prediction of a question is the option letter picked with its options in the file's order
    (under ``--circular``, the unrotated pass)."""
    from modalign.eval.benchmarks.mc import cell_given

    header, rows = _mmbench_rows(tsv)
    letters = [k for k in "ABCDEF" if k in header]
    cols = ["index", "question", *(["hint"] if "hint" in header else []), *letters,
            *(["answer"] if "answer" in header else []), "prediction",
            *(c for c in ("category", "l2-category") if c in header)]  # fmt: skip
    by_id: dict[str, list[dict]] = {}
    for s in samples:
        by_id.setdefault(str(s["id"]), []).append(s)
    table = [cols]
    for r in rows:
        got = by_id.get(str(r["index"]))
        if not got:
            continue
        opts = {k: r[k] for k in letters if cell_given(r.get(k))}  # as the reader took them
        s = next((x for x in got if x.get("options") == opts), got[0])
        row = {k: (r.get(k) or "") for k in cols} | {"prediction": s.get("answer") or ""}
        table.append([row[k] for k in cols])
    return table


_XLSX_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _xlsx_cell(col: str, v):
    if col == "index" and isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return _XLSX_ILLEGAL.sub("", v) if isinstance(v, str) else v


def mmbench(out: Path, samples: list[dict], results: dict) -> list[Path]:
    """MMBench's submission (``.tsv``, and ``.xlsx`` with openpyxl) from the evaluated ``.tsv``;
    nothing for multiple-choice data in other formats (ScienceQA, JSON lists)."""
    data = Path(results.get("data", ""))
    if data.suffix != ".tsv" or not data.is_file():
        return []
    table = mmbench_table(data, samples)
    tsv = Path(out) / f"{MMBENCH_FILE}.tsv"
    with tsv.open("w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(table)
    paths = [tsv]
    try:
        from openpyxl import Workbook
    except ImportError:
        return paths
    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    for row in table:
        ws.append([_xlsx_cell(c, v) for c, v in zip(table[0], row, strict=True)])
    xlsx = Path(out) / f"{MMBENCH_FILE}.xlsx"
    wb.save(xlsx)
    return [*paths, xlsx]


# ------------------------------------------------------------------------------------ LLaVA-Bench


def llava_bench(out: Path, samples: list[dict], results: dict) -> list[Path]:
    """LLaVA's answers JSONL (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``,
    ``metadata``); ``answer_id`` is derived from the model, question and answer (stable across runs)."""
    model = Path(str(results.get("model") or "")).name or "modalign"
    suffix = _suffix(results)
    path = Path(out) / LLAVA_BENCH_FILE
    with path.open("w") as f:
        for s in samples:
            text = s["raw"].strip()
            aid = hashlib.sha256(json.dumps([model, s["id"], text], default=str).encode()).hexdigest()[:22]
            f.write(json.dumps({"question_id": s["id"], "prompt": _question(s, suffix), "text": text,
                                "answer_id": aid, "model_id": model, "metadata": {}}) + "\n")  # fmt: skip
    return [path]


def writer_for(bench):
    """The benchmark's submission writer, or None."""
    return getattr(bench, "submission", None)

"""ScienceQA (Lu et al., 2022) in the prompt formats of its chain-of-thought baselines and of
Multimodal-CoT (Zhang et al., 2023): the rationale (lecture + explanation) before the answer, or
in two stages. Scored as ScienceQA's own scripts score.

    scienceqa        QCM->A    answer only
    scienceqa-cot    QCM->LEA  lecture, explanation, then the answer (give --max-new-tokens 512)
    scienceqa-le     QCM->LE   MM-CoT stage 1: the rationale alone (kept in samples.jsonl, not scored)
    scienceqa-qcmg   QCMG->A   MM-CoT stage 2: the stage-1 rationale in the input, answer only; reads
                               the JSON that ``build_stage2`` writes from a stage-1 ``samples.jsonl``

Data: ScienceQA's ``problems.json`` (``{id: {question, choices, answer (index), hint, image (file
name or null), split, subject, grade, lecture, solution, ...}}``), images at
``<split>/<id>/<image>`` under ``--images``. Problems without an image are evaluated too (as text).
Which problems: ``--references`` naming a ``pid_splits.json`` (its "test" list, in its order) or a
JSON list of ids (any subset, in that order); else a ``pid_splits.json`` beside the data file;
else the problems whose ``split`` is "test", in file order (all of them when none has a split).

What this follows, read from the public code (ScienceQA ``models/base_prompt.py``,
``models/run_gpt3.py``, ``tools/evaluate_acc.py``; MM-CoT ``utils_prompt.py``, ``main.py``):

- Context is the hint ("N/A" when empty; a caption is added only with ``use_caption``); options
  read ``(A) x (B) y``; in lecture and solution every newline is written as the two characters
  ``\\n``, so a rationale is one line.
- Input QCM: ``Question: {q}\\nContext: {c}\\nOptions: {o}\\n``; QCMG appends
  ``Solution: {rationale}\\n`` (MM-CoT; the gold ``{lecture} {solution}`` when training without
  generated rationales). The prompt ends with ``Answer:`` (ScienceQA's test example, every
  output format) or, for LE, ``Solution:`` (MM-CoT); then each double space becomes one and the
  ends are stripped.
- Outputs (ScienceQA's example outputs; LE from MM-CoT): A ``Answer: The answer is {L}.``, LEA
  ``Answer: {lecture} {solution} The answer is {L}.``, LE ``Solution: {lecture} {solution}.``.
  As a training target the label the prompt already ends with is dropped (MM-CoT drops
  "Answer:" from its targets the same way). Letters stand bare as in ScienceQA (MM-CoT's code
  writes "(A)" and extracts ``The answer is \\(([A-Z])\\)``: not used here).
- Extraction (``run_gpt3.py``): ``re.findall(r"The answer is ([A-Z]).", output.strip())``; exactly
  one match gives the letter, anything else "FAILED". "FAILED" or a letter outside the problem's
  choices falls back to ``random.choice(range(len(choices)))`` of Python's ``random`` seeded with
  10 (the script's default ``--seed``), one draw per fallback in sample order: ``score`` leaves
  such an answer open and ``aggregate`` draws it, writing it into the samples (``fallback``:
  true). For a zero-shot run over ``pid_splits.json``'s order with nothing skipped this repeats
  the script's draws. (MM-CoT seeds 42 and draws from all five letters: not reproduced.)
- Groups (``evaluate_acc.py``): subject NAT / SOC / LAN; TXT has a hint, IMG has an image (a
  problem can be both), NO has neither; grades 1-6 / 7-12; Avg over all samples.

Differences: the GPT-3 runs stopped generating at the first newline, here the whole output is
scored; a group without samples is None (the script divides by zero). Training data in these
formats: ``modalign.data.scienceqa``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from modalign.eval.benchmarks import Benchmark, need, register, rows

OPTIONS = "ABCDE"  # ScienceQA's options; its problems have at most 5 choices
SEED = 10  # run_gpt3.py --seed default
ANSWER = re.compile(r"The answer is ([A-Z]).")
FORMATS = ("QCM-A", "QCM-LEA", "QCM-LE", "QCMG-A")
GROUPS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
GRADES = {f"grade{i}": "G1-6" if i <= 6 else "G7-12" for i in range(1, 13)}


# ---- formats ---------------------------------------------------------------------------------


def _tidy(text: str) -> str:
    return text.replace("  ", " ").strip()


def _one_line(text: str | None) -> str:
    return (text or "").replace("\n", "\\n")


def context_text(p: dict, use_caption: bool = False) -> str:
    caption = (p.get("caption") or "") if use_caption else ""
    return " ".join([p.get("hint") or "", caption]).strip() or "N/A"


def choice_text(p: dict) -> str:
    return " ".join(f"({k}) {c}" for k, c in zip(OPTIONS, p["choices"], strict=False))


def gold_rationale(p: dict) -> str:
    """The reference rationale: ``{lecture} {solution}`` (newlines as ``\\n``)."""
    return f"{_one_line(p.get('lecture'))} {_one_line(p.get('solution'))}"


def _check(fmt: str) -> tuple[str, str]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown ScienceQA format {fmt!r}; known: {', '.join(FORMATS)}")
    inp, out = fmt.split("-")
    return inp, out


def prompt(p: dict, fmt: str = "QCM-A", rationale: str | None = None, use_caption: bool = False) -> str:
    """The text the model sees for problem ``p`` (QCMG: ``rationale``, else the gold one)."""
    inp, out = _check(fmt)
    text = f"Question: {p['question']}\nContext: {context_text(p, use_caption)}\nOptions: {choice_text(p)}\n"
    if inp == "QCMG":
        text += f"Solution: {gold_rationale(p) if rationale is None else rationale}\n"
    return _tidy(text + ("Solution:" if out == "LE" else "Answer:"))


def output_text(p: dict, fmt: str = "QCM-A") -> str:
    """The format's full output for ``p``, label included (``Answer: ... The answer is B.``)."""
    _, out = _check(fmt)
    letter, lec, sol = OPTIONS[p["answer"]], _one_line(p.get("lecture")), _one_line(p.get("solution"))
    text = {"A": f"Answer: The answer is {letter}.", "LEA": f"Answer: {lec} {sol} The answer is {letter}.",
            "LE": f"Solution: {lec} {sol}."}[out]  # fmt: skip
    return _tidy(text)


def target(p: dict, fmt: str = "QCM-A") -> str:
    """The training target: ``output_text`` less the label the prompt ends with."""
    _, out = _check(fmt)
    return output_text(p, fmt).removeprefix("Solution:" if out == "LE" else "Answer:").strip()


def clean_rationale(raw: str) -> str:
    """A stage-1 output as the rationale of stage 2 (stripped, a leading "Solution:" dropped)."""
    return raw.strip().removeprefix("Solution:").strip()


# ---- scoring ---------------------------------------------------------------------------------


def extract(output: str) -> str:
    """The answer letter as ``run_gpt3.py`` reads it: the one match of the pattern, else FAILED."""
    found = ANSWER.findall(output.strip())
    return found[0] if len(found) == 1 else "FAILED"


def groups(p: dict) -> list[str]:
    """The official columns problem ``p`` counts in."""
    g = [SUBJECTS[p["subject"]]] if p.get("subject") in SUBJECTS else []
    g += ["TXT"] if p.get("hint") else []
    g += ["IMG"] if p.get("image") else []
    g += ["NO"] if not p.get("hint") and not p.get("image") else []
    return g + ([GRADES[p["grade"]]] if p.get("grade") in GRADES else [])


def score(r: dict, opts, gold, raw: str) -> dict:
    if r["format"] == "QCM-LE":  # stage 1: the rationale, no answer to score
        return {"answer": clean_rationale(raw), "score": None}
    letters = OPTIONS[: r["num_choices"]]
    got = extract(raw)
    ok = got != "FAILED" and got in letters
    return {"answer": got if ok else None, "extracted": got, "fallback": not ok,
            "score": float(got == gold) if ok else 0.0, "num_choices": r["num_choices"],
            "groups": r["groups"]}  # fmt: skip


def scores(samples: list[dict]) -> dict:
    """Accuracy over all samples (Avg) and in each official group, per subject as categories."""

    def acc(ss):
        return sum(s["score"] for s in ss) / len(ss) if ss else None

    by_group = {g: acc([s for s in samples if g in s["groups"]]) for g in GROUPS}
    cats = sorted({s["category"] for s in samples})
    return {
        "accuracy": acc(samples),
        "accuracy_by_category": {c: acc([s for s in samples if s["category"] == c]) for c in cats},
        "accuracy_by_group": by_group | {"Avg": acc(samples)},
        "group_sizes": {g: sum(g in s["groups"] for s in samples) for g in GROUPS},
        "failed_extractions": sum(s["extracted"] == "FAILED" for s in samples),
        "random_fallbacks": sum(bool(s["fallback"]) for s in samples),
    }


def aggregate(samples: list[dict], circular: bool = False) -> dict:
    """Draw the official random answer for each open sample (in order, seed 10), then score."""
    samples = [s for s in samples if s.get("score") is not None]
    if not samples:
        return {}
    rng = random.Random(SEED)
    for s in samples:
        if s["fallback"]:
            s["answer"] = OPTIONS[rng.choice(range(s["num_choices"]))]
            s["score"] = float(s["answer"] == s["gold"])
    return scores(samples)


# ---- reading ---------------------------------------------------------------------------------


def load(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{Path(path).name}: expected ScienceQA's problems.json, an object {{id: problem}}")
    return doc


def select(doc: dict, path: Path, references: Path | None = None, split: str = "test") -> list[str]:
    """The problem ids to use, in order (see the module's docstring)."""
    path = Path(path)
    splits = Path(references) if references is not None else path.parent / "pid_splits.json"
    if references is None and not splits.is_file():
        if not any("split" in p for p in doc.values()):
            return list(doc)
        return [pid for pid, p in doc.items() if p.get("split") == split]
    ref = json.loads(splits.read_text())
    if isinstance(ref, dict):
        if split not in ref:
            raise ValueError(f"{splits.name}: no {split!r} list (has {', '.join(ref)})")
        ref = ref[split]
    ids = [str(i) for i in ref]
    missing = [i for i in ids if i not in doc]
    if missing:
        raise ValueError(f"{splits.name}: {len(missing)} id(s) not in {path.name}, e.g. {missing[0]!r}")
    return ids


def image_path(pid: str, p: dict) -> str | None:
    return f"{p.get('split', 'test')}/{pid}/{p['image']}" if p.get("image") else None


def record(pid: str, p: dict, fmt: str, where: str, rationale: str | None = None) -> dict:
    """One problem as an evaluation record: the prompt as ``question``, no ``options`` (the
    prompt lists them), the letter as ``gold`` (stage 1: the reference rationale)."""
    need(p, ("question", "choices", "answer"), where)
    n = len(p["choices"]) if isinstance(p["choices"], list) else 0
    if not 1 <= n <= len(OPTIONS):
        raise ValueError(f"{where}: needs 1 to {len(OPTIONS)} choices, has {p['choices']!r:.80}")
    a = p["answer"]
    if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < n:
        raise ValueError(f"{where}: answer {a!r} is not an index into its {n} choices")
    gold = gold_rationale(p) if fmt == "QCM-LE" else OPTIONS[a]
    return {"id": pid, "image": image_path(pid, p), "question": prompt(p, fmt, rationale), "gold": gold,
            "category": p.get("subject") or "all", "format": fmt, "num_choices": n, "groups": groups(p)}  # fmt: skip


def _reader(fmt: str):
    def read(path: Path, references: Path | None = None) -> list[dict]:
        path = Path(path)
        doc = load(path)
        return [
            record(pid, doc[pid], fmt, f"{path.name} problem {pid}") for pid in select(doc, path, references)
        ]

    return read


def read_stage2(path: Path, references: Path | None = None) -> list[dict]:
    """Every problem of a ``build_stage2`` file, in its order, with its ``rationale`` (``references``
    is not used: the file holds the problems of the stage-1 run)."""
    path = Path(path)
    out = []
    for pid, p in load(path).items():
        where = f"{path.name} problem {pid}"
        if not isinstance(p.get("rationale"), str):
            raise ValueError(f"{where}: no 'rationale'; write this file with build_stage2 from a stage-1 run")
        out.append(record(pid, p, "QCMG-A", where, p["rationale"]))
    return out


def build_stage2(problems: Path, samples: Path, out: Path) -> int:
    """MM-CoT stage 2: ``problems.json`` restricted to the problems of a stage-1 run's
    ``samples.jsonl`` (in its order), each with its generated ``rationale``; the file
    ``scienceqa-qcmg`` reads. Problems the stage-1 run skipped are left out. Returns the count."""
    doc, stage2 = load(problems), {}
    for where, s in rows(Path(samples)):
        need(s, ("id", "raw"), where)
        pid = str(s["id"])
        if pid not in doc:
            raise ValueError(f"{where}: problem {pid!r} is not in {Path(problems).name}")
        stage2[pid] = doc[pid] | {"rationale": clean_rationale(s["raw"])}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(stage2, indent=1) + "\n")
    return len(stage2)


register(Benchmark("scienceqa", _reader("QCM-A"), score, "", aggregate))
register(Benchmark("scienceqa-cot", _reader("QCM-LEA"), score, "", aggregate))
register(Benchmark("scienceqa-le", _reader("QCM-LE"), score, "", aggregate))
register(Benchmark("scienceqa-qcmg", read_stage2, score, "", aggregate))

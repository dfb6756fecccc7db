"""ScienceQA as LLaVA-style training data in the prompt formats of ``modalign.eval.benchmarks.scienceqa``
(QCM->A, QCM->LEA, MM-CoT's QCM->LE and QCMG->A), so a model fine-tuned on it answers the
``scienceqa*`` evaluation tasks in the same format::

    python -m modalign.data.scienceqa train problems.json sqa_train_lea.json --format QCM-LEA
    python -m modalign.data.scienceqa stage2 problems.json runs/le/samples.jsonl stage2_test.json

Each record is ``{"id", "image": "<split>/<id>/image.png" (only where the problem has one),
"conversations": [{"from": "human", "value": "<image>\\n" + prompt}, {"from": "gpt", "value": target}]}``.
The problems are those of ``--split`` (default "train"), chosen like the evaluation chooses its
test problems: ``--references`` (a ``pid_splits.json`` or a JSON list of ids), else a
``pid_splits.json`` beside ``problems.json``, else each problem's ``split`` field. QCMG-A uses the
gold rationale (``{lecture} {solution}``) unless ``--rationales`` names a stage-1 run's
``samples.jsonl`` (MM-CoT trains stage 2 on either).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modalign.data.conversation import IMAGE_PLACEHOLDER
from modalign.eval.benchmarks import rows
from modalign.eval.benchmarks import scienceqa as sqa


def read_rationales(samples: Path) -> dict[str, str]:
    """``{id: rationale}`` from a stage-1 run's ``samples.jsonl``."""
    return {str(s["id"]): sqa.clean_rationale(s["raw"]) for _, s in rows(Path(samples))}


def conversations(doc: dict, ids: list[str], fmt: str = "QCM-LEA", rationales: dict[str, str] | None = None,
                  use_caption: bool = False) -> list[dict]:  # fmt: skip
    """The problems ``ids`` of ``doc`` (a loaded ``problems.json``) as conversation records."""
    out = []
    for pid in ids:
        p = doc[pid]
        sqa.record(pid, p, fmt, f"problem {pid}")  # validates the problem
        rationale = None
        if fmt == "QCMG-A" and rationales is not None:
            if pid not in rationales:
                raise ValueError(f"problem {pid}: no generated rationale")
            rationale = rationales[pid]
        text = sqa.prompt(p, fmt, rationale, use_caption)
        image = sqa.image_path(pid, p)
        rec = {"id": pid} | ({"image": image} if image else {})
        rec["conversations"] = [
            {"from": "human", "value": (f"{IMAGE_PLACEHOLDER}\n" if image else "") + text},
            {"from": "gpt", "value": sqa.target(p, fmt)},
        ]
        out.append(rec)
    return out


def write_training_data(problems: Path, out: Path, fmt: str = "QCM-LEA", split: str = "train",
                        references: Path | None = None, rationales: Path | dict | None = None,
                        use_caption: bool = False) -> int:  # fmt: skip
    """Write the ``split`` problems of ``problems`` to ``out`` (a JSON list); returns the count."""
    doc = sqa.load(problems)
    ids = sqa.select(doc, Path(problems), references, split)
    if isinstance(rationales, str | Path):
        rationales = read_rationales(Path(rationales))
    recs = conversations(doc, ids, fmt, rationales, use_caption)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(recs, indent=1) + "\n")
    return len(recs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m modalign.data.scienceqa", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="problems.json -> LLaVA-style training JSON in one format")
    t.add_argument("problems")
    t.add_argument("out")
    t.add_argument("--format", default="QCM-LEA", choices=sqa.FORMATS)
    t.add_argument("--split", default="train")
    t.add_argument("--references", default=None, help="pid_splits.json or a JSON list of ids")
    t.add_argument("--rationales", default=None, help="QCMG-A: a stage-1 run's samples.jsonl")
    t.add_argument("--use-caption", action="store_true", help="add each problem's 'caption' to the context")
    s = sub.add_parser("stage2", help="problems.json + stage-1 samples.jsonl -> the scienceqa-qcmg file")
    s.add_argument("problems")
    s.add_argument("samples")
    s.add_argument("out")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        n = write_training_data(Path(args.problems), Path(args.out), args.format, args.split, args.references,
                                args.rationales, args.use_caption)  # fmt: skip
    else:
        n = sqa.build_stage2(Path(args.problems), Path(args.samples), Path(args.out))
    print(f"wrote {n} problems to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

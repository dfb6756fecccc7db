"""MME (perception / cognition yes-no pairs): the release folder (``<subtask>/images`` +
``<subtask>/questions_answers_YN/*.txt``, or images beside same-named ``.txt`` files; each line
``question<TAB>answer``), or JSONL ``{"subtask", "image", "question", "answer": Yes|No}``."""

from __future__ import annotations

from pathlib import Path

from modalign.eval import metrics as M
from modalign.eval import submission
from modalign.eval.benchmarks import Benchmark, need, read_rows, register


def _row(r: dict, where: str) -> dict:
    need(r, ("subtask", "image", "question", "answer"), where)
    if r["answer"].lower() not in ("yes", "no"):
        raise ValueError(f"{where}: answer {r['answer']!r} is not Yes/No")
    return {"id": f"{r['subtask']}/{r['image']}/{r['question'][:20]}", "image": r["image"],
            "question": r["question"], "gold": r["answer"], "category": r["subtask"]}  # fmt: skip


def _release_dir(root: Path) -> list[dict]:
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa = sub / "questions_answers_YN"
        txts = sorted(qa.glob("*.txt")) if qa.is_dir() else sorted(sub.glob("*.txt"))
        img_dir = sub / "images" if (sub / "images").is_dir() else sub
        for t in txts:
            img = next(
                (p for p in img_dir.glob(t.stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                None,
            )
            if img is None:
                raise ValueError(f"{t}: no image named {t.stem}.* in {img_dir}")
            for n, line in enumerate(t.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                q, _, a = line.rpartition("\t")
                if a.strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{t}:{n}: answer {a.strip()!r} is not Yes/No")
                out.append({"id": f"{sub.name}/{t.stem}/{n}", "image": str(img.relative_to(root)), "question": q.strip(),
                            "gold": a.strip(), "category": sub.name})  # fmt: skip
    return out


def read(path: Path, references: Path | None = None) -> list[dict]:
    return _release_dir(path) if path.is_dir() else read_rows(_row)(path)


def score(r: dict, opts, gold: str, raw: str) -> dict:
    answer = M.mme_answer(raw)
    return {"answer": answer, "score": float(answer == gold.lower()),
            "image": r["image"] if isinstance(r["image"], str) else None}  # fmt: skip


def aggregate(samples: list[dict], circular: bool) -> dict:
    return M.mme_scores([{"subtask": s["category"], "image": s["image"], "prediction": s["answer"],
                          "answer": s["gold"]} for s in samples])  # fmt: skip


register(Benchmark("mme", read, score, "\nPlease answer yes or no.", aggregate, submission=submission.mme))

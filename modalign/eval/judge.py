"""LLM-as-judge through any OpenAI-compatible endpoint, with a versioned prompt and a cache.

- LLaVA-Bench: the judge rates the reference answer (assistant 1) and the model's answer
  (assistant 2) from 1 to 10; the relative score per category is 100 x sum(model) / sum(ref).
- OwlEval-style grading: the judge grades each answer A (correct and satisfying), B (acceptable
  with minor flaws), C (responds but has significant errors), D (irrelevant or wrong).

Every judgement is cached by (judge model, prompt version, question, answer[, reference]) in a
JSONL file, so a re-run costs nothing; each sample keeps the judge's raw output.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from modalign.llm_client import LLMClient, LLMError

LLAVA_BENCH_VERSION = "llava-bench-judge-v1"
OWL_VERSION = "owleval-grade-v1"

LLAVA_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. Please rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation."
)
OWL_SYSTEM = "You grade answers of a multimodal assistant."
OWL_RULE = (
    "Grade the assistant's answer to the question about an image. Reply with one letter on the first line: "
    "A = correct and satisfying; B = acceptable with minor imperfections; C = responds to the question but with "
    "significant errors; D = irrelevant or completely wrong. Then explain briefly."
)


class JudgeCache:
    def __init__(self, path: Path | None):
        self.path, self.data = path, {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["output"]
        self.hits = 0

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        out = self.data.get(key)
        self.hits += out is not None
        return out

    def put(self, key: str, output: str) -> None:
        self.data[key] = output
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "output": output}) + "\n")


def _judge(client: LLMClient, cache: JudgeCache, version: str, system: str, prompt: str) -> str | None:
    key = cache.key(client.model, version, prompt)
    hit = cache.get(key)
    if hit is not None:
        return hit
    try:
        out = client.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}], 0.0, 512
        )
    except LLMError:
        return None
    cache.put(key, out)
    return out


def parse_pair(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    nums = re.findall(r"\d+(?:\.\d+)?", text.strip().splitlines()[0] if text.strip() else "")
    if len(nums) < 2:
        return None
    a, b = float(nums[0]), float(nums[1])
    return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def parse_grade(text: str | None) -> str | None:
    if not text:
        return None
    m = re.match(r"\s*\(?([ABCD])\b", text.strip().upper())
    return m.group(1) if m else None


def llava_bench(samples: list[dict], client: LLMClient, cache: JudgeCache) -> tuple[list[dict], dict]:
    """``samples``: {id, question, answer (model), reference, category, context?}."""
    sums: dict[str, list[float]] = {}
    out = []
    for s in samples:
        ctx = f"[Context]\n{s['context']}\n\n" if s.get("context") else ""
        prompt = (f"{ctx}[Question]\n{s['question']}\n\n[Assistant 1]\n{s['reference']}\n\n[End of Assistant 1]\n\n"
                  f"[Assistant 2]\n{s['answer']}\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_RULE}\n\n")  # fmt: skip
        raw = _judge(client, cache, LLAVA_BENCH_VERSION, LLAVA_SYSTEM, prompt)
        pair = parse_pair(raw)
        out.append(s | {"judge_output": raw, "scores": pair})
        if pair:
            for cat in (s.get("category", "all"), "all"):
                acc = sums.setdefault(cat, [0.0, 0.0])
                acc[0] += pair[0]
                acc[1] += pair[1]
    rel = {k: (100 * v[1] / v[0] if v[0] else None) for k, v in sums.items()}
    unparsed = sum(1 for s in out if s["scores"] is None)
    return out, {"relative_score": rel.get("all"), "relative_score_by_category": rel, "judge_unparsed": unparsed,
                 "judge_prompt_version": LLAVA_BENCH_VERSION}  # fmt: skip


def owleval(samples: list[dict], client: LLMClient, cache: JudgeCache) -> tuple[list[dict], dict]:
    """``samples``: {id, question, answer}; returns per-sample grades and the A-D distribution."""
    out, counts = [], {"A": 0, "B": 0, "C": 0, "D": 0}
    for s in samples:
        prompt = f"[Question]\n{s['question']}\n\n[Answer]\n{s['answer']}\n\n{OWL_RULE}"
        raw = _judge(client, cache, OWL_VERSION, OWL_SYSTEM, prompt)
        g = parse_grade(raw)
        if g:
            counts[g] += 1
        out.append(s | {"judge_output": raw, "grade": g})
    n = sum(counts.values())
    return out, {"grades": counts, "grade_fractions": {k: v / n for k, v in counts.items()} if n else None,
                 "judge_unparsed": len(out) - n, "judge_prompt_version": OWL_VERSION}  # fmt: skip

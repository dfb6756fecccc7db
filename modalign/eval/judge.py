"""LLM-as-judge through any OpenAI-compatible endpoint: the official LLaVA-Bench review, an
OwlEval-style multimodal grader, an on-disk cache, and agreement between two judges.

LLaVA-Bench (as LLaVA's ``llava/eval/eval_gpt_review_bench.py`` for LLaVA-Bench-in-the-Wild and
``eval_gpt_review_visual.py`` for LLaVA-Bench-COCO, rules from ``llava/eval/table/rule.json``):
a text-only judge gets the system prompt ``LLAVA_SYSTEM`` and one user message::

    [Context]
    {captions, one a line}

    {boxes, "category: [x1, y1, x2, y2]" one a line -- COCO only}

    [Question]
    {question}

    [Assistant 1]
    {reference answer (GPT-4's)}

    [End of Assistant 1]

    [Assistant 2]
    {the model's answer}

    [End of Assistant 2]

    [System]
    {the category's rule}

followed by a blank line; temperature 0.2, at most 1024 new tokens (the official defaults). The
rule is ``llava_bench_{category}`` for the in-the-wild set (captions only) and ``{category}`` (conv,
detail, complex) for COCO, whose rule also explains the boxes. The rule texts below were checked
word for word against ``rule.json`` in haotian-liu/LLaVA (main branch). The first line of the review
is read as the official ``parse_score`` does: commas become spaces, the line is split on single
spaces and must give exactly two floats, else the pair is ``[-1, -1]``. As in the official
``summarize_gpt_review.py``, such failed pairs stay in the means (they are counted in
``judge_unparsed``); a request that fails outright (the official script retries forever) is left
out and not cached, so a re-run asks again. The relative score of a category is
100 x mean(model) / mean(reference); the official summary rounds the means to 3 decimals and the
score to 1 decimal (and prints the means x 10), modalign reports them unrounded on the 1-10 scale.

OwlEval-style grading: OwlEval (mPLUG-Owl) was graded by people on a four-level scale, A: correct
and satisfying, B: acceptable with minor imperfections, C: responds to the instruction but has
significant errors, D: irrelevant or invalid. The official release has no judge prompt, so
``OWL_RULE`` is modalign's own wording of that scale (from the paper's description, not a copied
text); the judge must accept images: it gets the image as an ``image_url`` part (a base64 data URI
of the file's bytes), the question, the model's answer and, where the data has one, a reference
answer. The grade is the first line's letter; the distribution of grades is reported.

Every judgement is cached in a JSONL file under a key hashed from (judge model, prompt version, the
full request payload), so a re-run makes no request. Two judges (``JudgePanel``) both judge every
sample; each sample keeps both outputs, and the results add each judge's figures and their
agreement (LLaVA-Bench: Pearson / Spearman correlation and mean absolute difference of the model's
scores; OwlEval: exact grade agreement and Cohen's kappa).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from pathlib import Path

from modalign.llm_client import LLMClient, LLMError, Usage

LLAVA_BENCH_VERSION = "llava-bench-judge-v2"
OWL_VERSION = "owleval-grade-v2"

LLAVA_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_TEMPERATURE, LLAVA_MAX_TOKENS = 0.2, 1024
LLAVA_CATEGORIES = ("conv", "detail", "complex")

_OPENING = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. "
)
_RATING = (
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)
# LLaVA-Bench-in-the-Wild: the context is a few sentences (note the space before the newline)
WILD_RULE = (
    _OPENING
    + "For your reference, the visual content in the image is represented with a few sentences describing "
    "the image. \n" + _RATING
)
# LLaVA-Bench-COCO: five captions and the objects' boxes
COCO_RULE = (
    _OPENING
    + "For your reference, the visual content in the image is represented with five descriptive sentences "
    "describing the same image and the bounding box coordinates of each object in the scene. These coordinates "
    "are in the form of bounding boxes, represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to "
    "1. These values correspond to the top left x, top left y, bottom right x, and bottom right y. \n"
    + _RATING
)
# rule.json's keys for the categories LLaVA-Bench uses (role "Assistant" for all of them)
RULES = {f"llava_bench_{c}": WILD_RULE for c in LLAVA_CATEGORIES} | {c: COCO_RULE for c in LLAVA_CATEGORIES}
LLAVA_ROLE = "Assistant"

OWL_SYSTEM = "You are a careful and impartial grader of a multimodal assistant's answers about images."
OWL_TEMPERATURE, OWL_MAX_TOKENS = 0.0, 512
OWL_RULE = (
    "Look at the image and grade the assistant's answer to the question on this four-level scale:\n"
    "A: the answer is correct and satisfying.\n"
    "B: the answer is acceptable, with minor imperfections.\n"
    "C: the answer responds to the question but has significant errors.\n"
    "D: the answer is irrelevant or invalid.\n"
    "Please first output a single line containing only the letter of the grade. In the subsequent line, "
    "explain your grade."
)
OWL_REFERENCE_NOTE = (
    "A reference answer is shown for guidance: the assistant's answer need not match its wording, but it "
    "should agree with it on the facts."
)
GRADES = ("A", "B", "C", "D")


class JudgeCache:
    """Judgements on disk (JSONL, appended), keyed by ``key(model, version, payload)``."""

    def __init__(self, path: Path | None):
        self.path, self.data = (Path(path) if path is not None else None), {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["output"]
        self.hits = 0

    @staticmethod
    def key(model: str, version: str, payload: dict) -> str:
        doc = json.dumps({"model": model, "version": version, "payload": payload}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        out = self.data.get(key)
        self.hits += out is not None
        return out

    def put(self, key: str, output: str, **meta) -> None:
        self.data[key] = output
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, **meta, "output": output}) + "\n")


class JudgePanel:
    """Several judges (``LLMClient``s) that each judge every sample; ``model`` and ``usage`` sum
    them up for the run's results."""

    def __init__(self, clients: list[LLMClient]):
        if not clients:
            raise ValueError("a judge panel needs at least one judge")
        self.clients = list(clients)

    @property
    def model(self) -> str:
        return " + ".join(c.model for c in self.clients)

    @property
    def usage(self) -> Usage:
        u = Usage()
        for c in self.clients:
            for k in ("requests", "retries", "failures", "prompt_tokens", "completion_tokens"):
                setattr(u, k, getattr(u, k) + getattr(c.usage, k))
            for why, n in c.usage.retry_reasons.items():
                u.retry_reasons[why] = u.retry_reasons.get(why, 0) + n
        return u


def _clients(judge) -> list[LLMClient]:
    return list(judge.clients) if isinstance(judge, JudgePanel) else [judge]


def _labels(clients: list[LLMClient]) -> list[str]:
    """One name per judge: its model, with ``#2``... where two judges share a model name."""
    out = []
    for c in clients:
        name, n = c.model, 1
        while name in out:
            n += 1
            name = f"{c.model}#{n}"
        out.append(name)
    return out


def ask(client: LLMClient, cache: JudgeCache, version: str, messages: list[dict], temperature: float,
        max_tokens: int, name: str | None = None) -> str | None:  # fmt: skip
    """The judge's reply, from the cache when this exact request was made before; None when the
    endpoint keeps failing (not cached). ``name`` (default: the model) keys the cache, so two judges
    of one model name in a panel ("m", "m#2") keep their own judgements."""
    name = name or client.model
    key = cache.key(name, version, client._payload(messages, temperature, max_tokens))
    hit = cache.get(key)
    if hit is not None:
        return hit
    try:
        out = client.chat(messages, temperature, max_tokens)
    except LLMError:
        return None
    cache.put(key, out, model=name, version=version)
    return out


# ----------------------------------------------------------------------------- LLaVA-Bench


def llava_rule_key(category: str, boxes: bool) -> str:
    """The key of ``rule.json`` the official scripts use: ``llava_bench_{category}`` for the
    in-the-wild set, the bare category for COCO (whose context has boxes)."""
    key = category if boxes else f"llava_bench_{category}"
    if key not in RULES:
        raise ValueError(
            f"LLaVA-Bench: no judge rule for category {category!r} (known: {', '.join(LLAVA_CATEGORIES)})"
        )
    return key


def llava_context(ctx: dict) -> tuple[str, str | None]:
    """(captions, boxes) text from a ``context.jsonl`` record (``caption``: str or list) or a COCO
    one (``captions`` list + ``instances`` [{category, bbox}]); boxes are None for the former."""
    if "instances" in ctx or "captions" in ctx:
        caps = ctx.get("captions", ctx.get("caption", []))
        cap = "\n".join(caps) if isinstance(caps, list) else str(caps)
        return cap, "\n".join(f"{i['category']}: {i['bbox']}" for i in ctx.get("instances", []))
    cap = ctx["caption"]
    return ("\n".join(cap) if isinstance(cap, list) else cap), None


def llava_prompt(
    question: str, reference: str, answer: str, caption: str, boxes: str | None, category: str
) -> str:
    """The official review request's user message (reference as assistant 1, the model as 2)."""
    ctx = f"[Context]\n{caption}\n\n" + (f"{boxes}\n\n" if boxes is not None else "")
    rule, role = RULES[llava_rule_key(category, boxes is not None)], LLAVA_ROLE
    return (
        f"{ctx}[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule}\n\n"
    )


def llava_messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": LLAVA_SYSTEM}, {"role": "user", "content": prompt}]


def parse_score(review: str) -> list[float]:
    """The official ``parse_score``: the first line, commas read as spaces, split on single spaces,
    exactly two floats; anything else is ``[-1, -1]`` (so "8  6", "8 6 " or "8/10 6/10" fail)."""
    try:
        sp = review.split("\n")[0].replace(",", " ").split(" ")
        if len(sp) == 2:
            return [float(sp[0]), float(sp[1])]
    except (ValueError, AttributeError):
        pass
    return [-1, -1]


def relative_scores(pairs_by_category: dict[str, list[list[float]]]) -> dict:
    """Per category: the mean reference and model scores and 100 x mean(model) / mean(reference)."""
    out = {}
    for cat, pairs in pairs_by_category.items():
        if not pairs:
            continue
        ref = sum(p[0] for p in pairs) / len(pairs)
        mod = sum(p[1] for p in pairs) / len(pairs)
        out[cat] = {"relative_score": 100 * mod / ref if ref else None, "reference_mean": ref,
                    "model_mean": mod, "n": len(pairs)}  # fmt: skip
    return out


def _llava_summary(rows: list[dict], pairs: list[list[float] | None]) -> dict:
    by_cat: dict[str, list[list[float]]] = {}
    for r, p in zip(rows, pairs, strict=True):
        if p is not None:
            by_cat.setdefault(r.get("category", "all"), []).append(p)
            if r.get("category", "all") != "all":
                by_cat.setdefault("all", []).append(p)
    stats = relative_scores(dict(sorted(by_cat.items())))
    overall = stats.get("all", {})
    return {
        "relative_score": overall.get("relative_score"),
        "reference_mean": overall.get("reference_mean"),
        "model_mean": overall.get("model_mean"),
        "relative_score_by_category": {k: v["relative_score"] for k, v in stats.items()},
        "mean_scores_by_category": {
            k: {"reference": v["reference_mean"], "model": v["model_mean"], "n": v["n"]}
            for k, v in stats.items()
        },
        "judge_unparsed": sum(1 for p in pairs if p == [-1, -1]),
        "judge_errors": sum(1 for p in pairs if p is None),
    }


def _with_judgments(samples: list[dict], names: list[str], raws: dict, key: str, values: dict) -> list[dict]:
    """Each sample with its judge's raw output and parsed ``key``; with two judges, each by name."""
    if len(names) == 1:
        n = names[0]
        return [s | {"judge_output": raws[n][i], key: values[n][i]} for i, s in enumerate(samples)]
    return [s | {"judge_output": {n: raws[n][i] for n in names}, key: {n: values[n][i] for n in names}}
            for i, s in enumerate(samples)]  # fmt: skip


def llava_bench(samples: list[dict], judge, cache: JudgeCache) -> tuple[list[dict], dict]:
    """``samples``: {id, question (or question_text), answer (the model's), reference, category,
    context (captions text), boxes (COCO, else None)}. Returns the samples with ``judge_output``
    and ``scores`` ([reference, model]; per judge name with two judges) and the results."""
    clients = _clients(judge)
    names = _labels(clients)
    prompts = []
    for s in samples:
        if s.get("context") is None:
            raise ValueError(f"LLaVA-Bench sample {s.get('id')!r} has no context (captions) for the judge")
        prompts.append(llava_prompt(s.get("question_text", s["question"]), s["reference"], s["answer"],
                                    s["context"], s.get("boxes"), s.get("category", "all")))  # fmt: skip
    raws = {n: [] for n in names}
    pairs = {n: [] for n in names}
    for prompt in prompts:
        for n, c in zip(names, clients, strict=True):
            raw = ask(
                c, cache, LLAVA_BENCH_VERSION, llava_messages(prompt), LLAVA_TEMPERATURE, LLAVA_MAX_TOKENS, n
            )
            raws[n].append(raw)
            pairs[n].append(parse_score(raw) if raw is not None else None)
    out = _with_judgments(samples, names, raws, "scores", pairs)
    per = {n: _llava_summary(samples, pairs[n]) for n in names}
    res = dict(per[names[0]])
    res |= {"judge_prompt_version": LLAVA_BENCH_VERSION, "judge_temperature": LLAVA_TEMPERATURE}
    if len(names) > 1:
        res["judges"] = per
        a, b = names[0], names[1]
        both = [(x[1], y[1]) for x, y in zip(pairs[a], pairs[b], strict=True) if _ok(x) and _ok(y)]
        res["judge_agreement"] = {
            "judges": [a, b],
            **score_agreement([x for x, _ in both], [y for _, y in both]),
        }
    return out, res


def _ok(p) -> bool:
    return p is not None and p != [-1, -1]


# ----------------------------------------------------------------------------- OwlEval


def image_data_uri(image: Path | bytes) -> str:
    """A ``data:`` URI of the image: the file's own bytes when it is PNG / JPEG / GIF / WebP,
    otherwise re-encoded as PNG."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    else:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def owl_prompt(question: str, answer: str, reference: str | None = None) -> str:
    ref = f"[Reference answer]\n{reference}\n\n[End of reference answer]\n\n" if reference else ""
    rule = OWL_RULE + ("\n" + OWL_REFERENCE_NOTE if reference else "")
    return f"[Question]\n{question}\n\n{ref}[Assistant's answer]\n{answer}\n\n[End of assistant's answer]\n\n[System]\n{rule}\n"


def owl_messages(image_uri: str, prompt: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": prompt}]
    return [{"role": "system", "content": OWL_SYSTEM}, {"role": "user", "content": content}]


def parse_grade(text: str | None) -> str | None:
    """The grade letter at the start of the first non-empty line ("B", "(B)", "**B**", "Grade: B",
    "B: acceptable..."), else None."""
    if not text:
        return None
    line = next((x for x in text.splitlines() if x.strip()), "").strip().strip("*#` ")
    m = re.match(r"(?:(?i:grade|rating)\s*[:\-]?\s*)?[\(\[]?([ABCD])(?![A-Za-z])", line)
    return m.group(1) if m else None


def _owl_image(s: dict):
    img = s.get("image")
    if isinstance(img, bytes) or img is None:
        return img
    from modalign.data.images import resolve_image_path

    root = s.get("image_root")
    return resolve_image_path(root, img, str(s.get("id"))) if root is not None else Path(img)


def _owl_summary(grades: list[str | None], raws: list[str | None]) -> dict:
    counts = {g: 0 for g in GRADES}
    for g in grades:
        if g:
            counts[g] += 1
    n = sum(counts.values())
    return {"grades": counts, "grade_fractions": {k: v / n for k, v in counts.items()} if n else None,
            "judge_unparsed": sum(1 for g, r in zip(grades, raws, strict=True) if g is None and r is not None),
            "judge_errors": sum(1 for r in raws if r is None)}  # fmt: skip


def owleval(samples: list[dict], judge, cache: JudgeCache) -> tuple[list[dict], dict]:
    """``samples``: {id, question (or question_text), answer, image (a path under ``image_root``,
    or bytes), reference (optional)}; returns per-sample grades and the A-D distribution."""
    clients = _clients(judge)
    names = _labels(clients)
    raws = {n: [] for n in names}
    grades = {n: [] for n in names}
    for s in samples:
        img = _owl_image(s)
        if img is None:
            raise ValueError(f"OwlEval sample {s.get('id')!r} has no image for the judge")
        msgs = owl_messages(image_data_uri(img), owl_prompt(s.get("question_text", s["question"]), s["answer"],
                                                             s.get("reference")))  # fmt: skip
        for n, c in zip(names, clients, strict=True):
            raw = ask(c, cache, OWL_VERSION, msgs, OWL_TEMPERATURE, OWL_MAX_TOKENS, n)
            raws[n].append(raw)
            grades[n].append(parse_grade(raw))
    out = _with_judgments(samples, names, raws, "grade", grades)
    per = {n: _owl_summary(grades[n], raws[n]) for n in names}
    res = dict(per[names[0]]) | {"judge_prompt_version": OWL_VERSION}
    if len(names) > 1:
        res["judges"] = per
        a, b = names[0], names[1]
        both = [(x, y) for x, y in zip(grades[a], grades[b], strict=True) if x and y]
        res["judge_agreement"] = {
            "judges": [a, b],
            **grade_agreement([x for x, _ in both], [y for _, y in both]),
        }
    return out, res


# ----------------------------------------------------------------------------- agreement


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r; None with fewer than two pairs or a constant series."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _ranks(x: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 2 else None


def score_agreement(x: list[float], y: list[float]) -> dict:
    """Two judges' scores of the same answers: Pearson, Spearman, mean absolute difference."""
    n = len(x)
    return {"n": n, "pearson": pearson(x, y), "spearman": spearman(x, y),
            "mean_abs_diff": sum(abs(a - b) for a, b in zip(x, y, strict=True)) / n if n else None}  # fmt: skip


def cohen_kappa(x: list[str], y: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels; None when chance agreement is 1 (one label only)."""
    n = len(x)
    if n == 0:
        return None
    po = sum(a == b for a, b in zip(x, y, strict=True)) / n
    labels = set(x) | set(y)
    pe = sum((x.count(k) / n) * (y.count(k) / n) for k in labels)
    return (po - pe) / (1 - pe) if pe < 1 else None


def grade_agreement(x: list[str], y: list[str]) -> dict:
    n = len(x)
    agree = sum(a == b for a, b in zip(x, y, strict=True))
    return {"n": n, "exact_agreement": agree / n if n else None, "cohen_kappa": cohen_kappa(x, y)}

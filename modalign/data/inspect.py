"""``modalign data inspect``: what a data file will give the trainer, before training on it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from modalign.data.conversation import IGNORE_INDEX, BadSample, Template
from modalign.data.datasets import Conversation, SampleProcessor, TextSample, load_samples
from modalign.data.tokenizer import Tokenizer

GREEN, DIM, RESET = "\033[32;1m", "\033[2m", "\033[0m"


def histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    if not values:
        return ["(no samples)"]
    lo, hi = min(values), max(values)
    step = max((hi - lo) / bins, 1)
    counts = Counter(min(int((v - lo) / step), bins - 1) for v in values)
    top = max(counts.values())
    lines = []
    for b in range(bins):
        a = int(lo + b * step)
        n = counts.get(b, 0)
        lines.append(f"{a:>7} - {int(a + step):<7} {'#' * round(width * n / top):<{width}} {n}")
    return lines


def colour_sample(
    tok: Tokenizer, ids: list[int], labels: list[int], image_token_id: int | None, color=True
) -> str:
    """The sample's text with trained tokens highlighted (``[[...]]`` without colour)."""
    out, run, trained = [], [], None

    def flush():
        if run:
            text = tok.decode(run)
            if trained:
                out.append(f"{GREEN}{text}{RESET}" if color else f"[[{text}]]")
            else:
                out.append(f"{DIM}{text}{RESET}" if color else text)

    images = 0
    for i, (t, lab) in enumerate(zip(ids, labels, strict=True)):
        if t == image_token_id:
            if i == 0 or ids[i - 1] != image_token_id:
                flush()
                run, trained = [], None
                images += 1
                out.append(f"<image {images}>")
            continue
        tr = lab != IGNORE_INDEX
        if tr != trained:
            flush()
            run, trained = [], tr
        run.append(t)
    flush()
    return "".join(out)


def inspect_file(
    path: str | Path,
    tok: Tokenizer,
    template: Template,
    image_root: str | Path | None,
    image_processor,
    image_token_id: int | None,
    image_tokens: int,
    max_length: int | None,
    color: bool = True,
    show: int = 0,
) -> tuple[dict, str]:
    """Process every sample; return a report dict and its text rendering."""
    proc = SampleProcessor(
        tok, template, image_root, image_processor, image_token_id, image_tokens, max_length
    )
    samples = load_samples(path)
    per_source, lengths, rejected = Counter(), [], []
    trained = total = images = 0
    first = None
    for s in samples:
        try:
            ex = proc(s)
        except BadSample as e:
            rejected.append((e.sample_id or "?", e.reason, str(e)))
            continue
        kind = (
            "text"
            if isinstance(s, TextSample)
            else ("text-only chat" if isinstance(s, Conversation) and not s.images else "multimodal")
        )
        per_source[kind] += 1
        lengths.append(len(ex))
        trained += sum(1 for x in ex.labels if x != IGNORE_INDEX)
        total += len(ex)
        images += len(ex.pixel_values)
        if len(lengths) == show + 1:
            first = ex
    report = {
        "file": str(path),
        "samples": len(samples),
        "usable": len(lengths),
        "by_kind": dict(per_source),
        "images": images,
        "tokens": total,
        "supervised_tokens": trained,
        "supervised_fraction": trained / total if total else 0.0,
        "rejected": [{"id": i, "reason": r, "message": m} for i, r, m in rejected],
        "rejected_by_reason": dict(Counter(r for _, r, _ in rejected)),
    }
    lines = [
        f"{path}: {len(samples)} samples, {len(lengths)} usable, {len(rejected)} rejected",
        "by kind: " + ", ".join(f"{k} {v}" for k, v in per_source.items()),
        f"tokens: {total} ({images} images), supervised: {trained} ({report['supervised_fraction']:.1%})",
        "length histogram (tokens):",
        *histogram(lengths),
    ]
    if rejected:
        lines.append("rejected samples:")
        lines += [f"  {i}: [{r}] {m}" for i, r, m in rejected]
    if first is not None:
        lines.append(f"sample {first.id} (trained tokens {'highlighted' if color else 'in [[ ]]'}):")
        lines.append(colour_sample(tok, first.input_ids, first.labels, image_token_id, color))
    return report, "\n".join(lines)

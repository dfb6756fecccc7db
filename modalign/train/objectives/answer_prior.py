"""Training against a question-only answer prior (product of experts), an option of the lm objective.

A data set whose answers follow its questions' words teaches a model to answer from the words
rather than from the image: when a colour never occurs with a shape in training, "What colour is
the <shape>?" teaches the model to rule that colour out before it looks. Debiasing by a product of
experts (Clark et al. 2019, "Don't Take the Easy Way Out"; the VQA-CP line of work) trains the
model's logits plus a fixed bias: the log-probability a question-only model gives each answer.
What that prior explains, the model need not learn, so its own logits keep the evidence from the
image. The bias is used in training only; the saved model answers alone.

Here the question-only model is the stage's own answer frequencies: for each prompt (the messages
before a single-turn sample's answer) seen at least ``min_count`` times, how often each first
answer token follows it. Prompts whose answers share a first token form one answer type (colour
words, places, yes/no, ...), and a prompt's bias is its answer distribution relative to its type's,
on the type's answers only (0 on every other token): the model still learns what kind of answer a
question takes, and not which answers of that kind its words made likely in the training data.
The table is a pure function of the stage's data, so resumed and distributed runs build the same.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch

from modalign.data.conversation import IGNORE_INDEX, BadSample, Conversation

FLOOR = 1e-4  # an answer a prompt never had: log(FLOOR) less its type's frequency


def _sources(dataset) -> list:
    return list(getattr(dataset, "datasets", [dataset]))


def _prompt(s) -> tuple | None:
    """A single-turn conversation's prompt (every message before its one answer) and answer."""
    if not isinstance(s, Conversation) or not s.messages or s.messages[-1].role != "assistant":
        return None
    if sum(m.role == "assistant" for m in s.messages) != 1:
        return None
    return tuple((m.role, m.content) for m in s.messages[:-1]), s.messages[-1].content


class AnswerPrior:
    """``bias(ids)``: [B, V] log-prior rows for a batch's sample ids (zeros where none applies)."""

    def __init__(self, rows: torch.Tensor, row_of: dict[str, int], types: list[list[int]]):
        self.rows, self.row_of, self.types = rows, row_of, types
        self.zero = torch.zeros(rows.shape[1])

    @classmethod
    def from_dataset(cls, dataset, vocab_size: int, min_count: int = 20, weight: float = 1.0) -> AnswerPrior:
        answers: dict[tuple, Counter] = defaultdict(Counter)
        first_at: dict[tuple, tuple] = {}  # (prompt, answer) -> (source, index) of its first sample
        prompt_of: dict[str, tuple | None] = {}
        sources = _sources(dataset)
        for k, src in enumerate(sources):
            for i, s in enumerate(src.samples):
                pa = _prompt(s)
                # a sample id used twice (in one source or two) with two prompts, or once with a
                # prompt and once without one (several turns), gets no prior: both take the id's row
                p, sid = None if pa is None else pa[0], getattr(s, "id", None)  # a BadSample: none
                if sid is not None:
                    prompt_of[sid] = p if prompt_of.get(sid, p) == p else None
                if pa is None:
                    continue
                answers[pa[0]][pa[1]] += 1
                first_at.setdefault(pa, (k, i))
        # each frequent prompt's first answer tokens, read from one rendered sample per answer
        counts: dict[tuple, Counter] = {}
        for p, by_answer in answers.items():
            if sum(by_answer.values()) < min_count:
                continue
            c = Counter()
            for a, n in by_answer.items():
                k, i = first_at[(p, a)]
                src = sources[k]
                try:
                    labels = src.processor.tokens(src.samples[i]).labels
                except BadSample:
                    continue
                first = next((t for t in labels if t != IGNORE_INDEX), None)
                if first is not None:
                    c[int(first)] += n
            if sum(c.values()) >= min_count:
                counts[p] = c
        prompts = list(counts)
        # answer types: prompts linked by a shared first answer token (union-find)
        parent = list(range(len(prompts)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        owner: dict[int, int] = {}
        for j, p in enumerate(prompts):
            for t in counts[p]:
                if t in owner:
                    parent[find(j)] = find(owner[t])
                else:
                    owner[t] = j
        type_counts: dict[int, Counter] = defaultdict(Counter)
        for j, p in enumerate(prompts):
            type_counts[find(j)].update(counts[p])
        rows = torch.zeros(len(prompts), vocab_size)
        for j, p in enumerate(prompts):
            tc, c = type_counts[find(j)], counts[p]
            n, nt = sum(c.values()), sum(tc.values())
            for t, k in tc.items():
                if t >= vocab_size:
                    raise ValueError(f"answer token {t} is outside the model's vocabulary ({vocab_size})")
                rows[j, t] = weight * (math.log(max(c.get(t, 0) / n, FLOOR)) - math.log(k / nt))
        index = {p: j for j, p in enumerate(prompts)}
        row_of = {sid: index[p] for sid, p in prompt_of.items() if p in index}
        types = [sorted(tc) for tc in type_counts.values()]
        return cls(rows, row_of, types)

    def bias(self, ids: list[str]) -> torch.Tensor:
        return torch.stack([self.rows[self.row_of[i]] if i in self.row_of else self.zero for i in ids])

    def describe(self) -> str:
        return (
            f"answer prior over {self.rows.shape[0]} prompts in {len(self.types)} answer types "
            f"({len(self.row_of)} samples)"
        )

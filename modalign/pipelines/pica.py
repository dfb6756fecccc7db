"""PICa (Yang et al. 2022): a frozen LLM answers a visual question from a caption of the image,
prompted with in-context examples chosen by their similarity to the question and the image.

The prompt, as the paper's code writes it (most similar example first):

    Please answer the question according to the above context.
    ===
    Context: <caption of example 1>
    ===
    Q: <question 1>
    A: <answer 1>

    ===
    ...
    Context: <caption of the test image>
    ===
    Q: <question>
    A:

The LLM completes greedily (at most 5 tokens, up to a newline). Multi-query ensembling: with
``n_ensemble`` k, the k * n_shot most similar examples make k prompts (the first n_shot, the
next n_shot, ...) and the answer whose tokens have the highest summed log-probability wins (an
empty answer only when every prompt gave one; an LLM that returns no log-probabilities: the most
frequent answer, the first on ties). Answers are
cleaned as the paper's code cleans them (``clean_answer``).

Examples are chosen by ``metric``: ``question`` (cosine similarity of question embeddings),
``imagequestion`` (that plus the image embeddings' similarity; the paper's default) or ``random``.
The embeddings are any unit vectors given with the examples (``embed_texts`` /
``embed_images`` make them with a modalign model: the LLM's mean last hidden state, the vision
tower's mean feature; the paper used CLIP ViT-B/16's).

The LLM is a ``Completer``: ``EndpointCompleter`` (an OpenAI-compatible chat endpoint, the
prompt as one user message, log-probabilities requested) or ``LocalCompleter`` (a modalign
model, the prompt as raw text after BOS, as a base LM reads it).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

HEADER = "Please answer the question according to the above context.\n===\n"
METRICS = ("random", "question", "imagequestion")


@dataclass
class Shot:
    """A training example: its image's caption, the question and its answer, and unit-vector
    embeddings of the question and the image (needed by the similarity metrics)."""

    caption: str
    question: str
    answer: str
    q_vec: torch.Tensor | None = None
    i_vec: torch.Tensor | None = None


def build_prompt(shots: Sequence[Shot], caption: str, question: str) -> str:
    """PICa's prompt for ``question`` about an image captioned ``caption``."""
    out = [HEADER]
    for s in shots:
        out.append(f"Context: {s.caption}\n===\n")
        out.append(f"Q: {s.question}\nA: {s.answer}\n\n===\n")
    out.append(f"Context: {caption}\n===\n")
    out.append(f"Q: {question}\nA:")
    return "".join(out)


def clean_answer(text: str) -> str:
    """The paper's cleaning: drop '.' and ',', lower-case, drop the words a / an / the / to."""
    words = text.replace(".", "").replace(",", "").lower().split(" ")
    return " ".join(w for w in words if w not in {"a", "an", "the", "to", ""})


class Completer(Protocol):
    def complete(self, prompt: str, max_tokens: int = 5) -> tuple[str, float | None]:
        """(completion up to the first newline, summed log-probability of its tokens or None)."""
        ...


@dataclass
class EndpointCompleter:
    """An OpenAI-compatible chat endpoint (``LLMClient``): greedy, stop at a newline, token
    log-probabilities requested (``logprobs: true``); where the endpoint returns none, None."""

    client: object  # modalign.llm_client.LLMClient
    calls: int = 0
    tokens: int = 0  # prompt and completion tokens, as the endpoint's usage reports them

    def complete(self, prompt: str, max_tokens: int = 5) -> tuple[str, float | None]:
        self.calls += 1
        doc = self.client.chat([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens,
                               extra={"stop": ["\n"], "logprobs": True}, raw=True)  # fmt: skip
        self.tokens += int((doc.get("usage") or {}).get("total_tokens") or 0)
        choice = doc["choices"][0]
        text = (choice["message"].get("content") or "").split("\n")[0]
        content = (choice.get("logprobs") or {}).get("content")
        if content is None:
            return text.strip(), None
        total = 0.0
        for t in content:
            if "\n" in t.get("token", ""):
                break
            total += float(t["logprob"])
        return text.strip(), total


class LocalCompleter:
    """A modalign model as the frozen LLM: the prompt as raw text after BOS, greedy decoding up
    to a newline or a special token (EOS, an end of turn), the chosen tokens' log-probabilities
    summed."""

    def __init__(self, model, tok):
        self.model, self.tok = model.eval(), tok
        self.stops = set(getattr(tok, "special_ids", ()) or ())
        self.calls = self.tokens = 0  # tokens: prompt (with BOS) and completion

    @torch.no_grad()
    def complete(self, prompt: str, max_tokens: int = 5) -> tuple[str, float | None]:
        self.calls += 1
        ids = ([self.tok.bos_id] if self.tok.bos_id is not None else []) + self.tok.encode(prompt)
        dev = next(self.model.parameters()).device
        x = torch.tensor([ids], device=dev)
        out, total = [], 0.0
        for _ in range(max_tokens):
            logp = self.model(x).logits[0, -1].float().log_softmax(-1)
            t = int(logp.argmax())
            if t == self.tok.eos_id or t in self.stops or "\n" in self.tok.decode([t]):
                break
            out.append(t)
            total += float(logp[t])
            x = torch.cat([x, torch.tensor([[t]], device=dev)], dim=1)
        self.tokens += len(ids) + len(out)
        return self.tok.decode(out).strip(), total


@dataclass
class PICaAnswer:
    answer: str
    candidates: list[str] = field(default_factory=list)  # each prompt's cleaned answer
    logprobs: list[float | None] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


class PICa:
    def __init__(self, completer: Completer, shots: Sequence[Shot], n_shot: int = 16, n_ensemble: int = 1,
                 metric: str = "imagequestion", seed: int = 0):  # fmt: skip
        if metric not in METRICS:
            raise ValueError(f"PICa metric {metric!r}: expected one of {', '.join(METRICS)}")
        if n_shot < 0 or n_ensemble < 1:
            raise ValueError(f"PICa needs n_shot >= 0 and n_ensemble >= 1, got {n_shot} and {n_ensemble}")
        if n_shot * n_ensemble > len(shots):
            raise ValueError(f"PICa: {n_shot} shots x {n_ensemble} prompts need {n_shot * n_ensemble} examples, "
                             f"{len(shots)} given")  # fmt: skip
        need = {"question": ("q_vec",), "imagequestion": ("q_vec", "i_vec")}.get(metric, ())
        for k in need:
            missing = [i for i, s in enumerate(shots) if getattr(s, k) is None]
            if missing:
                raise ValueError(f"PICa metric {metric}: example {missing[0]} has no {k}")
        self.completer, self.shots, self.metric = completer, list(shots), metric
        self.n_shot, self.n_ensemble = n_shot, n_ensemble
        self.rng = random.Random(seed)
        if need:
            self.q = torch.stack([s.q_vec.float() for s in self.shots])
            self.i = torch.stack([s.i_vec.float() for s in self.shots]) if "i_vec" in need else None

    def select(self, q_vec: torch.Tensor | None = None, i_vec: torch.Tensor | None = None) -> list[int]:
        """Indices of the n_shot x n_ensemble examples for a question, most similar first."""
        n = self.n_shot * self.n_ensemble
        if self.metric == "random":
            return self.rng.sample(range(len(self.shots)), n)
        if q_vec is None or (self.metric == "imagequestion" and i_vec is None):
            raise ValueError(f"PICa metric {self.metric}: the question needs its q_vec (and i_vec)")
        sim = self.q @ q_vec.float()
        if self.i is not None:
            sim = sim + self.i @ i_vec.float()
        return torch.sort(sim, descending=True, stable=True).indices[:n].tolist()

    def answer(self, question: str, caption: str, q_vec=None, i_vec=None) -> PICaAnswer:
        chosen = self.select(q_vec, i_vec)
        out = PICaAnswer("")
        for k in range(self.n_ensemble):
            shots = [self.shots[j] for j in chosen[k * self.n_shot : (k + 1) * self.n_shot]]
            prompt = build_prompt(shots, caption, question)
            text, lp = self.completer.complete(prompt)
            out.prompts.append(prompt)
            out.candidates.append(clean_answer(text))
            out.logprobs.append(lp)
        if all(lp is not None for lp in out.logprobs):
            # an empty completion sums no log-probabilities (0, the highest): it never wins over an answer
            def score(i):
                return (out.logprobs[i] if out.candidates[i] else float("-inf"), -i)

            out.answer = out.candidates[max(range(len(out.candidates)), key=score)]
        else:
            # the most frequent answer (the first on ties); an empty one only when every prompt gave one
            said = [c for c in out.candidates if c] or out.candidates
            counts = Counter(said)
            out.answer = max(said, key=lambda c: (counts[c], -said.index(c)))
        return out


@torch.no_grad()
def embed_texts(model, tok, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit vectors of ``texts``: the LLM's last hidden states averaged over each text's tokens."""
    from modalign.data.collate import _pad

    out = []
    dev = next(model.parameters()).device
    pad = tok.pad_id or 0
    for i in range(0, len(texts), batch_size):
        rows = [tok.encode(t) or [pad] for t in texts[i : i + batch_size]]
        ids, mask = _pad(rows, pad, False).to(dev), _pad([[1] * len(r) for r in rows], 0, False).to(dev)
        out.append(torch.nn.functional.normalize(model.llm.mean_hidden(ids, mask).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def embed_images(model, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unit vectors of images [N, 3, S, S]: the vision tower's features averaged over the tokens."""
    dev = next(model.parameters()).device
    out = [model.vision(pixel_values[i : i + batch_size].to(dev)).float().mean(1).cpu()
           for i in range(0, len(pixel_values), batch_size)]  # fmt: skip
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)

"""Img2LLM (Guo et al. 2023, "From Images to Textual Prompts"): a frozen LLM answers a visual
question zero-shot, prompted with captions of the image and synthetic question-answer exemplars
made from those captions, so that no training example is needed.

1. Answer candidates from the captions: each caption's content words (nouns, verbs, adjectives,
   adverbs, numbers) and short noun phrases (fewer than 4 words), ranked by how often they occur
   over all captions (first occurrence first on ties), the top ``n_answers`` kept, ``yes`` last.
2. A question for each candidate (``QuestionGenerator``): the paper's T5 question generator reads
   ``"answer: <answer>.  context: <captions>."``; ``TemplateQuestions`` writes the paper's rule
   questions by the candidate's part of speech; ``LLMQuestions`` asks a completer.
3. Contexts: ``n_captions`` tries walking the candidates from the least frequent (``yes``
   first, wrapping round), each adding the first caption holding it that is not taken yet.
4. The prompt, as the authors' code writes it:

       Please reason the answer of the questions according to the given contexts.
       Contexts:<caption 1>.<caption 2>.
       Question:<question for "yes">
       Answer:yes
       Question:Is this a toilet?
       Answer:no
       Question:<synthetic question 1>
       Answer:<answer 1>
       ...
       Question:<the question>
       Answer:

   Captions are capitalised and end with a full stop; they are joined without a separator, as
   in the authors' code. The yes and no exemplars come only with a question generator that makes
   a question for "yes" (the authors' neural one; not their rule questions). Exemplars whose
   answer has 5 words or more are left out. The frozen
   LLM completes greedily; the answer is cut at the first full stop or newline, lower-cased.

Parts of speech: spaCy's ``en_core_web_sm`` where it is installed (the paper's tagger), else
``rule_tags``: a small closed-class lexicon (determiners, prepositions, pronouns, auxiliaries,
number words, common colour and size adjectives) and suffix rules (-ly adverbs, -ing/-ed verbs),
everything else a noun. Noun phrases without spaCy: runs of adjectives and numbers ending in a
noun.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from modalign.pipelines.pica import Completer

HEADER = "Please reason the answer of the questions according to the given contexts.\n"
NEGATIVE = ("Is this a toilet?", "no")  # the authors' fixed "no" exemplar
CONTENT_POS = ("NOUN", "VERB", "ADJ", "ADV", "NUM")
# the authors' rule questions, by the part of speech of the answer's last word (none for numbers)
TEMPLATES = {
    "NOUN": ["What item is this in this picture?", "What item is that in this picture?"],
    "VERB": ["What action is being done in this picture?", "Why is this item doing in this picture?",
             "Which action is being taken in this picture?", "What action is item doing in this picture?",
             "What action is item performing in this picture?"],
    "ADJ": ["How to describe one item in this picture?", "What is item's ADJ TYPE in this picture?",
            "What is the ADJ TYPE in this picture?"],
}  # fmt: skip

_CLOSED = {
    "DET": "a an the this that these those each every some any no another",
    "ADP": "at in on of to from by with without under over above below near beside between behind "
    "into onto across along around through for about against among",
    "PRON": "it its they them their he she his her we our you your i me my there here which who what",
    "AUX": "is are was were be been being am has have had do does did can could will would shall should may might",
    "CCONJ": "and or but nor so yet",
    "NUM": "zero one two three four five six seven eight nine ten eleven twelve several many few",
    "ADJ": "small large big little tiny huge tall short long wide narrow red orange yellow green blue purple "
    "pink brown black white grey gray dark light bright round square old new young empty full other same",
}
_LEXICON = {w: tag for tag, words in _CLOSED.items() for w in words.split()}
_WORD = re.compile(r"[A-Za-z0-9']+")


def rule_tags(text: str) -> list[tuple[str, str]]:
    """(word, part of speech) for each word of ``text``: the lexicon, then suffixes, else NOUN."""
    out = []
    for w in _WORD.findall(text):
        low = w.lower()
        if low in _LEXICON:
            tag = _LEXICON[low]
        elif low.isdigit():
            tag = "NUM"
        elif low.endswith("ly") and len(low) > 4:
            tag = "ADV"
        elif (low.endswith("ing") or low.endswith("ed")) and len(low) > 5:
            tag = "VERB"
        else:
            tag = "NOUN"
        out.append((w, tag))
    return out


def _rule_phrases(tags: list[tuple[str, str]]) -> list[str]:
    """Noun phrases: runs of adjectives / numbers ending in a noun (fewer than 4 words)."""
    out, run = [], []
    for w, t in tags:
        if t in ("ADJ", "NUM"):
            run.append(w)
        elif t == "NOUN":
            if run and len(run) + 1 < 4:
                out.append(" ".join([*run, w]))
            run = []
        else:
            run = []
    return out


def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception:  # spaCy or its English model absent
        return None


class Tagger:
    """Content words and short noun phrases of a caption, with parts of speech."""

    def __init__(self, use_spacy: bool | None = None):
        self.nlp = _spacy() if use_spacy in (None, True) else None
        if use_spacy and self.nlp is None:
            raise ValueError(
                "Img2LLM: spaCy's en_core_web_sm is not installed (pip install spacy and the model)"
            )

    def candidates(self, caption: str) -> list[tuple[str, str]]:
        """(candidate, part of speech of its last word) in the caption's order: content words,
        then named entities (spaCy), then noun phrases of fewer than 4 words."""
        text = caption.strip().strip(".")
        if self.nlp is not None:
            doc = self.nlp(text)
            out = [(t.text, t.pos_) for t in doc if t.pos_ in CONTENT_POS]
            out += [(e.text, doc[e.end - 1].pos_) for e in doc.ents if e.text not in [c for c, _ in out]]
            out += [(c.text, c.root.pos_) for c in doc.noun_chunks if len(c.text.split()) < 4]
            return out
        tags = rule_tags(text)
        out = [(w, t) for w, t in tags if t in CONTENT_POS]
        return out + [(p, "NOUN") for p in _rule_phrases(tags)]


def answer_candidates(captions: Sequence[str], tagger: Tagger, n_answers: int = 30):
    """(ranked candidates each ending with ".", "yes." last; lower-cased candidate -> caption ids;
    candidate -> part of speech), as the authors rank them: by count over all captions."""
    found, where, pos = [], {}, {}
    for i, cap in enumerate(captions):
        for c, p in tagger.candidates(cap):
            found.append(c)
            where.setdefault(c.lower(), [])
            if i not in where[c.lower()]:
                where[c.lower()].append(i)
            pos.setdefault(c, p)
    counts = {c: found.count(c) for c in found}
    ranked = sorted(dict.fromkeys(found), key=lambda c: -counts[c])  # stable: first seen first on ties
    out = [c + "." for c in ranked[:n_answers]] + ["yes."]
    return out, where, {c + ".": pos.get(c, "X") for c in ranked[:n_answers]}


def pick_contexts(answers: Sequence[str], where: dict, n_captions: int) -> list[int]:
    """Caption ids for the contexts: the candidates walked from the last (``yes``) backwards, each
    adding the first caption holding it that is not taken yet (caption 0 for one in none)."""
    used: list[int] = []
    for k in range(n_captions if answers else 0):  # as many tries as captions wanted, as the authors do
        ans = answers[len(answers) - 1 - (k % len(answers))].rstrip(".").lower()
        new = next((i for i in where.get(ans, [0]) if i not in used), None)
        if new is not None:
            used.append(new)
    return used


def format_caption(caption: str) -> str:
    c = caption.strip().rstrip(".")
    return (c[:1].upper() + c[1:].lower() if c else c) + "."


def build_prompt(captions: Sequence[str], exemplars: Sequence[tuple[str, str]], question: str,
                 yes_question: str | None = None, negative: tuple[str, str] | None = NEGATIVE) -> str:  # fmt: skip
    """Img2LLM's prompt (module docstring); ``exemplars`` are (question, answer) pairs. The yes and
    the fixed no exemplar come first, and only with a question for "yes" (the authors write
    neither with their rule questions)."""
    task = ""
    if yes_question is not None:
        task += f"Question:{yes_question}\nAnswer:yes\n"
        if negative is not None:
            task += f"Question:{negative[0]}\nAnswer:{negative[1]}\n"
    task += "".join(f"Question:{q}\nAnswer:{a.lower()}\n" for q, a in exemplars if len(a.split()) < 5)
    contexts = "".join(format_caption(c) for c in captions)
    return f"{HEADER}Contexts:{contexts}\n{task}Question:{question}\nAnswer:"


def clean_answer(text: str) -> str:
    """The answer up to the first full stop or newline, lower-cased."""
    return re.split(r"[.\n]", text, maxsplit=1)[0].strip().lower()


def qg_input(answer: str, captions: Sequence[str]) -> str:
    """The paper's question generator's input (T5): the answer (with its full stop) and every
    caption, concatenated."""
    return "answer: %s  context: %s." % (answer, "".join(captions))  # noqa: UP031 - the format itself


class QuestionGenerator:
    def __call__(self, answer: str, pos: str, captions: Sequence[str]) -> str | None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class TemplateQuestions(QuestionGenerator):
    """The authors' rule questions, one drawn at random from the list for the answer's part of
    speech (none for numbers or other parts of speech: that candidate makes no exemplar)."""

    seed: int = 0

    def __post_init__(self):
        import random

        self.rng = random.Random(self.seed)

    def __call__(self, answer, pos, captions):
        options = TEMPLATES.get(pos)
        return self.rng.choice(options) if options else None


@dataclass
class LLMQuestions(QuestionGenerator):
    """A question generator behind a completer (e.g. a served QG model, or an instruction-tuned LLM
    reading the paper's T5 input): the completion up to the newline is the question."""

    completer: Completer
    max_tokens: int = 30

    def __call__(self, answer, pos, captions):
        text, _ = self.completer.complete(
            qg_input(answer, captions) + "\nquestion:", max_tokens=self.max_tokens
        )
        return text.strip() or None


@dataclass
class Img2LLMAnswer:
    answer: str
    prompt: str
    exemplars: list[tuple[str, str]] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)


class Img2LLM:
    def __init__(self, completer: Completer, questions: QuestionGenerator | Callable | None = None,
                 n_answers: int = 30, n_captions: int = 30, tagger: Tagger | None = None,
                 negative: tuple[str, str] | None = NEGATIVE, max_tokens: int = 10):  # fmt: skip
        if n_answers < 1 or n_captions < 1:
            raise ValueError(
                f"Img2LLM needs n_answers >= 1 and n_captions >= 1, got {n_answers}, {n_captions}"
            )
        self.completer, self.questions = completer, questions or TemplateQuestions()
        self.n_answers, self.n_captions, self.negative = n_answers, n_captions, negative
        self.tagger = tagger or Tagger()
        self.max_tokens = max_tokens

    def exemplars(self, captions: Sequence[str]) -> tuple[list[tuple[str, str]], str | None, list[int]]:
        """(synthetic (question, answer) pairs, the question for "yes", the context caption ids)."""
        answers, where, pos = answer_candidates(captions, self.tagger, self.n_answers)
        pairs, yes_q = [], None
        for a in answers:
            q = self.questions(a, pos.get(a, "X"), captions)
            if a == "yes.":
                yes_q = q
            elif q:
                pairs.append((q[:1].upper() + q[1:], a[:-1]))
        return pairs, yes_q, pick_contexts(answers, where, self.n_captions)

    def answer(self, question: str, captions: Sequence[str]) -> Img2LLMAnswer:
        if not captions:
            raise ValueError("Img2LLM needs at least one caption of the image")
        pairs, yes_q, ids = self.exemplars(captions)
        contexts = [captions[i] for i in ids]
        prompt = build_prompt(contexts, pairs, question, yes_q, self.negative)
        text, _ = self.completer.complete(prompt, max_tokens=self.max_tokens)
        return Img2LLMAnswer(clean_answer(text), prompt, pairs, contexts)

"""The field's metrics, written from their official definitions.

- VQA accuracy: the official script's answer normalisation (punctuation, number words, articles,
  contractions), applied only where the human answers differ, and min(#matching humans / 3, 1),
  averaged over the ten leave-one-out subsets.
- exact match (TextVQA/GQA-style single answers) after that normalisation, always applied.
- multiple choice: option-letter extraction and MMBench's circular evaluation.
- POPE: free-form answers read as the POPE script reads them; accuracy, precision, recall, F1
  and yes-ratio.
- MME: answers read as MME's calculation.py reads them; accuracy and accuracy+ (both questions
  of an image right) per subtask; perception and cognition scores (sum of (acc + acc+) x 100).
- BLEU-4 (corpus level, brevity penalty) and CIDEr-D (n = 1..4, sigma 6, clipped, x10) over
  coco-caption's PTB tokenization.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict

log = logging.getLogger("modalign.eval")

# --------------------------------------------------------------------------- VQA normalisation

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """A short answer for exact match: trimmed, lower-cased, a trailing full stop dropped."""
    return text.strip().lower().rstrip(".").strip()


def _vqa_spaces(answer: str) -> str:
    """Line breaks and tabs as spaces, both ends stripped: all the official VQA script does to
    every answer before it decides whether to normalise."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa(answer: str) -> str:
    """The VQA script's full normalisation: ``_vqa_spaces``, then ``processPunctuation`` and
    ``processDigitArticle`` (lower case, number words to digits, articles dropped, contractions
    given their apostrophe)."""
    return _digits_articles(_punctuation(_vqa_spaces(answer)))


def evalai_answer(reply: str) -> str:
    """A reply as VQAv2 answers are submitted and scored in the field: the EvalAI answer processor
    LLaVA's ``convert_vqav2_for_submission.py`` applies before upload and lmms-eval's ``vqav2``
    task before scoring (lower case; commas and question marks dropped; "'s" split off; then the
    VQA normalisation, ``normalize_vqa``)."""
    word = reply.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa(word)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy against (usually ten) human answers, as the official script computes it
    (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, ``VQAEval.evaluate``
    since its 2021 fix "Fixed processing answers bug"):

    1. line breaks and tabs become spaces and both ends are stripped, in the prediction and in
       every human answer;
    2. only when the human answers are not all the same are they and the prediction normalised
       (``processPunctuation`` then ``processDigitArticle``: ``normalize_vqa``); when they all
       agree, the stripped strings are compared as they are, so case, punctuation, number words
       and articles count ("Yes", "yes." or "the yes" against ten "yes" score 0);
    3. for each human answer left out in turn, min(1, matching other answers / 3); the accuracy
       is the mean of these.

    The prediction is scored as given; the ``vqa`` benchmark gives it ``evalai_answer(reply)``,
    the string the field submits (so "Yes" against ten "yes" scores 1 there, as on EvalAI)."""
    gts = [_vqa_spaces(a) for a in answers]
    pred = _vqa_spaces(prediction)
    if len(set(gts)) > 1:
        gts = [_digits_articles(_punctuation(a)) for a in gts]
        pred = _digits_articles(_punctuation(pred))
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(scores) / len(scores) if scores else 0.0


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_vqa(prediction) == normalize_vqa(answer))


# --------------------------------------------------------------------------- multiple choice

_LETTER = re.compile(r"(?:^|[\s(\[])([A-Z])(?:[).\]:,]|\s|$)")


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a reply picks: a leading/isolated letter ("B", "(B)", "B.", "Answer: B"),
    else the option whose text the reply contains (the longest match), else None."""
    t = text.strip()
    m = re.match(r"^\(?([A-Z])(?:[).:,\]]|\s|$)", t)
    if m and m.group(1) in options:
        return m.group(1)
    m = re.search(r"(?i:answer)(?: (?i:is))?[:\s]*\(?([A-Z])\b", t)  # "the answer is a dog": no letter
    if m and m.group(1) in options:
        return m.group(1)
    letters = [x for x in _LETTER.findall(t) if x in options]
    if len(set(letters)) == 1:
        return letters[0]
    low = t.lower()
    hits = [(len(v), k) for k, v in options.items() if v and v.lower() in low]
    return max(hits)[1] if hits else None


def circular_options(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """MMBench circular evaluation: the k rotations of the options and the answer letter in each."""
    letters = sorted(options)
    texts = [options[k] for k in letters]
    gold = texts[letters.index(answer)]
    out = []
    for r in range(len(letters)):
        rot = texts[r:] + texts[:r]
        out.append((dict(zip(letters, rot, strict=True)), letters[rot.index(gold)]))
    return out


# --------------------------------------------------------------------------- POPE / MME


def pope_answer(text: str) -> str:
    """A free-form answer to a POPE question as the POPE evaluation script reads it: keep the
    first sentence (the text before the first "."), drop commas, split on spaces; "no" if a
    word is exactly "No", "not" or "no", otherwise "yes" (so an answer that names neither is a
    "yes", and "NO!" is a "yes" too: the script is case-sensitive)."""
    first = text.split(".")[0].replace(",", "")
    return "no" if {"No", "not", "no"} & set(first.split(" ")) else "yes"


def mme_answer(text: str) -> str:
    """A free-form answer to an MME question as MME's ``calculation.py`` reads it (lower-cased):
    "yes" / "no" when it is exactly that, else the first four characters decide ("yes" in them,
    then "no" in them), else "other", which is wrong for either label."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """``predictions``: "yes" / "no" (free-form answers read by :func:`pope_answer` first).
    Positive class is "yes"."""
    tp = fp = tn = fn = 0
    for p, y in zip(predictions, labels, strict=True):
        if p not in ("yes", "no"):
            raise ValueError(
                f"POPE prediction {p!r} is not yes/no: read free-form answers with pope_answer()"
            )
        if p == "yes" and y == "yes":
            tp += 1
        elif p == "yes":
            fp += 1
        elif y == "no":
            tn += 1
        else:
            fn += 1
    n = max(tp + fp + tn + fn, 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}  # fmt: skip


MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(records: list[dict]) -> dict:
    """``records``: {"subtask", "image", "prediction" (yes/no/None), "answer"}."""
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_task[r["subtask"]][r["image"]].append(r["prediction"] == r["answer"].lower())
    out = {}
    for task, images in by_task.items():
        flat = [x for v in images.values() for x in v]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        out[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": 100 * (acc + acc_plus)}
    perception = sum(v["score"] for k, v in out.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in out.items() if k in MME_COGNITION)
    # what the totals leave out or count on one question (the official script refuses them):
    # subtasks missing, names outside MME's fourteen, images without their two questions
    missing = [k for k in (*MME_PERCEPTION, *MME_COGNITION) if k not in out]
    unknown = sorted(k for k in out if k not in MME_PERCEPTION and k not in MME_COGNITION)
    partial = sum(len(v) != 2 for images in by_task.values() for v in images.values())
    if missing or unknown or partial:
        log.warning("MME totals: subtasks missing %s, not MME's %s, %d image(s) without two questions",
                    missing, unknown, partial)  # fmt: skip
    return {"subtasks": out, "perception": perception, "cognition": cognition, "missing_subtasks": missing,
            "unknown_subtasks": unknown, "images_without_two_questions": partial}  # fmt: skip


# --------------------------------------------------------------------------- captioning


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


# coco-caption tokenizes with Stanford's PTBTokenizer (``-preserveLines -lowerCase``) and then
# drops these tokens. The bracket escapes are lower-cased before that filter, so "-lrb-" stays.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                             "-", "--", "...", ";"])  # fmt: skip
_PTB_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
# words whose final period belongs to them (PTB keeps "mr." and "p.m." whole)
_PTB_ABBREV = frozenset(
    """mr mrs ms dr prof st jr sr vs etc inc ltd co corp mt ave rd blvd dept est fig gen gov
    capt col lt sgt rev hon messrs mme mlle jan feb mar apr jun jul aug sep sept oct nov dec""".split()
)
_PTB_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                    "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}  # fmt: skip
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
_PTB_PIECE = re.compile(
    r"""\d+(?:[.,:/]\d+)+          # numbers: 3.5  1,000  5:30  3/4
      | (?:[^\W\d_]\.){2,}         # acronyms: u.s.  p.m.
      | (?:[@#](?=[^\W\d_]))?\w+(?:[-']\w+)*  # words, hyphenated, clitics, o'clock, @home, #tag
      | \.\.\.|--                   # ellipsis, dash
      | [?!]+                      # "?!" is one token
      | \S                         # any other symbol alone
    """,
    re.VERBOSE,
)


def _ptb_word(tok: str) -> list[str]:
    """Split one word into PTB tokens: "isn't" -> "is n't", "cannot" -> "can not"."""
    low = tok.lower()
    if low in _PTB_SPLIT_WORDS:
        a, _ = _PTB_SPLIT_WORDS[low]
        return [tok[: len(a)], tok[len(a) :]]
    m = _PTB_CLITIC.match(tok)
    if m and "'" not in m.group(1):
        return [m.group(1), m.group(2)]
    return [tok]


def ptb_tokens(text: str) -> list[str]:
    """A caption as coco-caption's evaluation tokenizes it: Stanford PTBTokenizer rules on one
    line (clitics split: "man's" -> "man 's", "isn't" -> "is n't"; hyphenated words, numbers and
    abbreviations whole; brackets escaped), lower-cased, then its punctuation list removed.
    Checked token for token against the Java tokenizer pycocoevalcap ships (tests/eval)."""
    out: list[str] = []
    chunks = text.split()
    for ci, chunk in enumerate(chunks):
        pieces = _PTB_PIECE.findall(chunk)
        number_next = ci + 1 < len(chunks) and chunks[ci + 1][:1].isdigit()
        for i, p in enumerate(pieces):
            last = i + 1 == len(pieces)
            if (
                p == "."
                and i
                and (
                    pieces[i - 1].lower() in _PTB_ABBREV
                    or re.fullmatch(r"[^\W\d_]", pieces[i - 1])
                    or (pieces[i - 1].lower() == "no" and last and number_next)
                )
            ):
                out[-1] += "."  # "mr.", an initial and "no. 5" keep their period
            elif p == "'" and not last and pieces[i + 1].lower() in ("tis", "twas"):
                out.append("'t")  # "'tis" -> "'t is"
                pieces[i + 1] = pieces[i + 1][1:]
            else:
                out.extend(_ptb_word(p))
    toks = [_PTB_BRACKETS.get(t, t).lower() for t in out]
    return [t for t in toks if t not in PTB_PUNCTUATION and t != '"']


def caption_tokens(text: str) -> list[str]:
    """The tokens BLEU / CIDEr count: :func:`ptb_tokens`."""
    return ptb_tokens(text)


def bleu4(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 with the closest-reference brevity penalty (as coco-caption)."""
    match, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        c = caption_tokens(cand)
        rs = [caption_tokens(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            cn = _ngrams(c, n)
            mx: Counter = Counter()
            for r in rs:
                mx |= _ngrams(r, n)
            match[n - 1] += sum(min(v, mx[g]) for g, v in cn.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    logs = [math.log((m + 1e-15) / (t + 1e-9)) for m, t in zip(match, total, strict=True)]
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
    return bp * math.exp(sum(logs) / 4)


def cider_d(candidates: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D: tf-idf n-gram cosine (n = 1..4) with a length penalty and clipping, x10."""
    refs_tok = [[caption_tokens(r) for r in refs] for refs in references]
    cands_tok = [caption_tokens(c) for c in candidates]
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for n in range(1, 5) for g in _ngrams(r, n)})
    log_n = math.log(float(len(references)))

    def vec(words):
        vs, norms = [], []
        for n in range(1, 5):
            tf = _ngrams(words, n)
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in tf.items()}
            vs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vs, norms, len(words)

    scores = []
    for cand, refs in zip(cands_tok, refs_tok, strict=True):
        cv, cn, cl = vec(cand)
        acc = [0.0] * 4
        for r in refs:
            rv, rn, rl = vec(r)
            for n in range(4):
                val = sum(min(cv[n][g], rv[n][g]) * rv[n][g] for g in cv[n] if g in rv[n])
                if cn[n] and rn[n]:
                    val /= cn[n] * rn[n]
                else:
                    val = 0.0
                acc[n] += val * math.exp(-((cl - rl) ** 2) / (2 * sigma**2))
        scores.append(sum(acc) / 4 / len(refs) * 10)
    return sum(scores) / len(scores)

"""Metrics against hand-checked cases of the official definitions and, for captioning, against
pycocoevalcap (an independent implementation)."""

import pytest

from modalign.eval.metrics import (
    bleu4,
    caption_tokens,
    cider_d,
    circular_options,
    exact_match,
    extract_choice,
    mme_answer,
    mme_scores,
    normalize_vqa,
    pope_answer,
    pope_metrics,
    ptb_tokens,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw,norm",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("a red car", "red car"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("yes!", "yes"),
        ("hot-dog", "hot dog"),
        ("3.5", "3.5"),
        ("  Ten\tdogs ", "10 dogs"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize_vqa(raw) == norm


def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    # matching 3 humans: subsets that drop one of them see 2 matches (2/3), the others see 3 (1.0)
    assert vqa_accuracy("two", answers) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("four", answers) == 0.0
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert exact_match("The Dog", "dog") == 1.0 and exact_match("cat", "dog") == 0.0


# The official script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py,
# VQAEval.evaluate): line breaks / tabs to spaces and strip, every answer; then, only if the human
# answers are not all the same, processPunctuation + processDigitArticle on each of them and on the
# prediction; then the mean over the leave-one-out subsets of min(1, matches / 3).
@pytest.mark.parametrize(
    "prediction,answers",
    [
        # ten identical answers: nothing is normalised, so each of these differs from every human
        # answer: 0 matches in every subset, 0 (the full normalisation made them equal: 9 matches, 1)
        ("yes.", ["yes"] * 10),  # punctuation
        ("Yes", ["yes"] * 10),  # case
        ("two", ["2"] * 10),  # a number word
        ("2", ["two"] * 10),  # a digit against the humans' number word
        ("a dog", ["dog"] * 10),  # an article
        ("t shirt", ["t-shirt"] * 10),  # the humans' own punctuation is kept
        # "all the same" is decided after the stripping: " yes\t" is "yes", so these are ten "yes"
        # and "Yes" is compared as it is: 0 (decided before it, the answers differ: normalised, 1)
        ("Yes", ["yes"] * 9 + [" yes\t"]),
    ],
)
def test_vqa_accuracy_leaves_ten_identical_answers_unnormalised(prediction, answers):
    assert vqa_accuracy(prediction, answers) == 0.0


def test_vqa_accuracy_normalises_answers_that_differ():
    # the same strings as ten identical answers: 9 matches in every subset, min(1, 9/3) = 1;
    # line breaks, tabs and the ends are still stripped
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # answers that differ: all normalised. "two" x 4, "2" x 3, "three" x 3 become "2" x 7, "3" x 3;
    # "2", "two" and "Two." (period stripped, lower-cased) become "2": 6 or 7 matches in every
    # subset, so 1 each
    differ = ["two"] * 4 + ["2"] * 3 + ["three"] * 3
    assert vqa_accuracy("2", differ) == vqa_accuracy("two", differ) == vqa_accuracy("Two.", differ) == 1.0
    # a digit word among differing answers: "two" becomes "2", the rest "x"; the prediction "2"
    # matches 1 other answer in the 9 subsets that keep "two" (1/3) and 0 in the one that drops it:
    # 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("2", ["two"] + ["x"] * 9) == pytest.approx(0.3)
    # articles among differing answers: "a dog", "a dog", "the dog" become "dog" x 3 (the rest
    # "cat"); the 3 subsets without one of them see 2 matches (2/3), the other 7 see 3 (1):
    # (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("dog", ["a dog"] * 2 + ["the dog"] + ["cat"] * 7) == pytest.approx(0.9)
    # exact match, a separate scorer, normalises both sides always
    assert exact_match("Yes.", "yes") == 1.0


def test_the_vqa_benchmark_scores_the_reply_the_field_submits():
    """The ``vqa`` benchmark passes a reply through EvalAI's answer processor (as LLaVA uploads it
    and lmms-eval scores it), then the official rule: "Yes" against ten "yes" is "yes": 1, where the
    raw reply scores 0; "Two." against ten "2" is "2": 1; "two" against ten "two" becomes "2", which
    no unnormalised human answer equals: 0, as EvalAI scores LLaVA's uploads."""
    from modalign.eval.benchmarks.vqa import score

    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0 and score({}, None, ["yes"] * 10, "Yes") == {
        "answer": "yes",
        "score": 1.0,
    }
    assert score({}, None, ["2"] * 10, "Two.")["score"] == 1.0
    assert score({}, None, ["two"] * 10, "two")["score"] == 0.0


def test_choice_extraction_and_circular():
    opts = {"A": "red", "B": "blue", "C": "green"}
    assert extract_choice("B", opts) == "B"
    assert extract_choice("(C) green", opts) == "C"
    assert extract_choice("The answer is A.", opts) == "A"
    assert extract_choice("I think it is blue", opts) == "B"
    assert extract_choice("no idea", opts) is None
    rot = circular_options(opts, "B")
    assert rot[0] == (opts, "B")
    assert rot[1] == ({"A": "blue", "B": "green", "C": "red"}, "A")
    assert rot[2] == ({"A": "green", "B": "red", "C": "blue"}, "C")


def test_pope_confusion_matrix():
    preds = ["Yes", "Yes, there is.", "No", "There is no dog.", "yes", "I cannot tell"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    m = pope_metrics([pope_answer(p) for p in preds], labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4) and m["f1"] == pytest.approx(3 / 4)
    assert m["yes_ratio"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="pope_answer"):
        pope_metrics(["maybe"], ["yes"])


@pytest.mark.parametrize(
    "text,want",
    [
        ("There is a cat in the image.", "yes"),  # names neither: the script says yes
        ("No, there is no cat.", "no"),
        ("No.", "no"),
        ("no", "no"),
        ("There is not a cat.", "no"),
        ("Yes. There is no other animal.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # case-sensitive, as the script
        ("No!", "yes"),  # "No!" is not the word "No"
        ("Nothing like that, no", "no"),  # the comma is dropped first
        ("There is a dog but nobody else.", "yes"),
    ],
)
def test_pope_answer_follows_the_official_script(text, want):
    assert pope_answer(text) == want


@pytest.mark.parametrize(
    "text,want",
    [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No, it is not.", "no"), ("Nope", "no"),
     ("The answer is yes", "other"), ("I don't know", "other"), ("yes.", "yes")],
)  # fmt: skip
def test_mme_answer_follows_calculation_py(text, want):
    assert mme_answer(text) == want


def test_mme_accuracy_plus_and_scores():
    recs = [
        {"subtask": "color", "image": "1", "prediction": "yes", "answer": "Yes"},
        {"subtask": "color", "image": "1", "prediction": "no", "answer": "No"},
        {"subtask": "color", "image": "2", "prediction": "yes", "answer": "Yes"},
        {"subtask": "color", "image": "2", "prediction": "yes", "answer": "No"},
        {"subtask": "code_reasoning", "image": "3", "prediction": "no", "answer": "Yes"},
        {"subtask": "code_reasoning", "image": "3", "prediction": "no", "answer": "No"},
    ]
    s = mme_scores(recs)
    assert s["subtasks"]["color"] == {"accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0}
    assert s["perception"] == 125.0 and s["cognition"] == 50.0


# captions a PTB tokenizer treats differently from a split on punctuation: hyphens, clitics,
# abbreviations, numbers, brackets, quotes, "?!"
PTB_CASES = [
    "A black-and-white photo of a man's dog.",
    "The colour of the theatre isn't grey; it's 3.5 m wide!",
    'Two dogs (brown) play -- with a "frisbee" at 5:30 p.m. in the U.S.',
    "it's a cat's toy, don't you think?",
    "A man ... walking  down the   street.",
    "cannot gonna wanna I'm we'll they've she'd",
    "a 10-year-old boy's shirt",
    "e-mail @home #tag #1 $5 50% a&b",
    "A sign reading 'STOP' at the corner",
    "He said `hi'",
    "a [red] {blue} shape",
    "co-operate re-enter x-ray T-shirt",
    "well-known 'quoted' ``double'' \"x\"",
    "mr. smith and dr. jones etc.",
    "a dog's... ",
    "café naïve résumé",
    "3/4 of a pie, 1,000 people",
    "... leading dots",
    "what's up?!",
    "U.K. colour favour centre",
    "'tis o'clock",
    "wow!! really?? no way!?",
    "A dog. A cat. Two birds.",
    "The dogs' bowls are red.",
    "Can't won't shouldn't ain't",
    "a man with a hat on his head - sitting on a bench",
    "the letter b. and vitamin c. Dr.. mr.?",
    "there is no. the answer is no, a st. bernard, fig. 3, vol. 2, sign no. 5",
    'a sign that says "no parking" on a pole',
    "A black-and-white cat sitting on a red-and-white striped blanket.",
    "A double-decker bus parked next to a well-kept lawn.",
]


def _java_ptb():
    pytest.importorskip("pycocoevalcap")
    import shutil

    if shutil.which("java") is None:
        pytest.skip("java (a headless JRE) is needed to run coco-caption's PTBTokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer()


def test_ptb_tokens_equal_coco_captions_java_tokenizer():
    import random

    rng = random.Random(0)
    words = (
        "a the man woman dog's cat isn't it's two 3 3.5 1,000 red-and-white well-known U.S. p.m. mr. Dr. "
        "don't can't (big) [small] \"quoted\" 'single' sitting on bench near table with pizza and; , . ! ? "
        "-- - ... : 10-year-old o'clock won't they're we've I'd 50% $20 e-mail #1 they'll people's cannot"
    ).split()
    fuzz = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + rng.choice([".", "!", "", " ."])
            for _ in range(300)]  # fmt: skip
    caps = PTB_CASES + fuzz
    java = _java_ptb().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    for i, c in enumerate(caps):
        assert " ".join(ptb_tokens(c)) == java[i][0], c
    assert caption_tokens("A black-and-white dog's bowl.") == ["a", "black-and-white", "dog", "'s", "bowl"]


def test_bleu_and_cider_match_coco_caption_on_raw_captions():
    """The whole coco-caption pipeline (Java PTB tokenization, then Bleu / Cider) on captions
    with hyphens, clitics and punctuation, against modalign's metrics on the raw strings."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = [
        ["A black-and-white photo of a red circle.", "There's a red circle in the top-left corner.",
         "A red, round shape (top left)."],
        ["Two blue squares side-by-side.", "A pair of blue squares; they're side by side.", "Two squares that are blue!"],
        ["A green star and a yellow hexagon.", "Green star next to a yellow hexagon", "a star and a hexagon..."],
        ["The word \"cat\" in the middle.", "Text reading 'cat' at the center.", "cat written in the center"],
        ["A man's black-and-white dog.", "The dog isn't black-and-white, it's grey.", "A well-kept dog"],
    ]  # fmt: skip
    cands = ["A red circle at the top-left.", "Two blue squares side-by-side.", "A green star and a hexagon.",
             "A cat.", "A man's black-and-white dog, well-kept."]  # fmt: skip
    tok = _java_ptb()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
    want_bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    want_cider = Cider().compute_score(gts, res)[0]
    assert bleu4(cands, refs) == pytest.approx(want_bleu, abs=1e-6)
    assert cider_d(cands, refs) == pytest.approx(want_cider, abs=1e-6)

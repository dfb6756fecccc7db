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
    mme_scores,
    normalize_vqa,
    pope_metrics,
    vqa_accuracy,
    yes_no,
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
    preds = ["yes", "yes", "no", "no", "yes", "maybe"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    m = pope_metrics([yes_no(p) for p in preds], labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(3 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4) and m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert yes_no("Yes, there is.") == "yes" and yes_no("There is no dog") == "no"


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


def test_bleu_and_cider_match_pycocoevalcap():
    pycoco = pytest.importorskip("pycocoevalcap")  # noqa: F841
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = [
        [
            "a red circle at the top left",
            "there is a red circle in the top left corner",
            "red round shape top left",
        ],
        ["two blue squares", "a pair of blue squares side by side", "two squares that are blue"],
        ["a green star and a yellow hexagon", "green star next to a yellow hexagon", "a star and a hexagon"],
        ["the word cat in the middle", "text reading cat at the center", "cat written in the center"],
    ]
    cands = [
        "a red circle at the top",
        "two blue squares side by side",
        "a green star and a hexagon",
        "a cat",
    ]
    gts = {i: [" ".join(caption_tokens(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(caption_tokens(c))] for i, c in enumerate(cands)}
    want_bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    want_cider = Cider().compute_score(gts, res)[0]
    assert bleu4(cands, refs) == pytest.approx(want_bleu, abs=1e-6)
    assert cider_d(cands, refs) == pytest.approx(want_cider, abs=1e-6)

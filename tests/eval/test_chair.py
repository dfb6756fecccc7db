"""CHAIR against hand-worked cases of the paper's definitions and its COCO rules, and inside the
caption benchmark (COCO captions + instance annotations)."""

import json

import pytest

from modalign.eval import chair as C
from modalign.eval.benchmarks import get


def test_chair_on_a_hand_worked_corpus():
    caps = [
        "A man riding a motor bike past two dogs.",  # person, motorcycle, dog: dog hallucinated
        "Two cats sleeping on a sofa.",  # cat, couch: both true
        "A plate with a hot dog and a fork.",  # hot dog, fork: fork hallucinated (not a dog)
        "An empty street.",  # no object mentioned
    ]
    truths = [{"person", "motorcycle"}, {"cat", "couch", "remote"}, {"hot dog"}, {"car"}]
    r = C.chair(caps, truths)
    # mentions: 3 + 2 + 2 + 0 = 7, hallucinated: dog, fork = 2; captions with one: 2 of 4
    assert r["object_mentions"] == 7
    assert r["chair_i"] == pytest.approx(2 / 7)
    assert r["chair_s"] == pytest.approx(2 / 4)
    # recall: found person, motorcycle | cat, couch | hot dog = 5 of 2 + 3 + 1 + 1 = 7
    assert r["chair_recall"] == pytest.approx(5 / 7)


def test_every_mention_counts_for_chair_i():
    r = C.chair(["a dog, another dog and a third dog with a cat"], [{"cat"}])
    assert (r["object_mentions"], r["chair_i"], r["chair_s"]) == (4, 3 / 4, 1.0)


@pytest.mark.parametrize(
    "caption,want",
    [
        ("a baby elephant with its mother", ["elephant", "person"]),  # "baby" is not a person here
        ("the seat of the toilet is up", ["toilet"]),  # a toilet's seat is not a chair
        ("a toilet seat", ["toilet"]),
        ("a passenger jet on the runway", ["airplane"]),  # not a person
        ("two hot dogs and a teddy bear", ["hot dog", "teddy bear"]),  # not a dog, not a bear
        ("children playing with knives and wine glasses", ["person", "knife", "wine glass"]),
        ("a man in a bow tie", ["person", "tie"]),
        ("buses and a fire hydrant near the traffic lights", ["bus", "fire hydrant", "traffic light"]),
        ("a person holding a cell phone and skis", ["person", "cell phone", "skis"]),
        ("this is a glass of water", []),  # "this", "is", "glass" are no objects (and not singularised away)
    ],
)
def test_coco_rules(caption, want):
    assert [c for _, c in C.caption_objects(caption)] == want


def test_singular_by_rule():
    pairs = {"dogs": "dog", "ponies": "pony", "benches": "bench", "boxes": "box", "knives": "knife",
             "women": "woman", "bus": "bus", "glass": "glass", "skis": "skis", "tomatoes": "tomato"}  # fmt: skip
    assert {w: C.singular(w) for w in pairs} == pairs


def test_the_papers_synonyms_file_format(tmp_path):
    f = tmp_path / "synonyms.txt"
    f.write_text("person, girl, boy, man\ndog, puppy\ncell phone, mobile phone, phone\n\n")
    syn = C.load_synonyms(f)
    assert [c for _, c in C.caption_objects("a girl with a puppy on a mobile phone", syn)] == [
        "person", "dog", "cell phone"]  # fmt: skip
    assert C.caption_objects("a cat", syn) == []
    f.write_text("dog, puppy\ndog, hound\n")
    with pytest.raises(ValueError, match="listed twice"):
        C.load_synonyms(f)


def test_ground_truth_takes_annotations_and_reference_mentions():
    gt = C.ground_truth(["dog", "dining table"], ["A puppy under a table next to a woman."])
    assert gt == {"dog", "dining table", "person"}
    with pytest.raises(ValueError, match="'spaceship'"):
        C.ground_truth(["spaceship"])


def test_caption_benchmark_scores_chair_from_coco_instances(tmp_path):
    caps = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A dog on a couch."},
                            {"image_id": 2, "caption": "A plate of food."}]}  # fmt: skip
    inst = {"categories": [{"id": 18, "name": "dog"}, {"id": 51, "name": "bowl"}, {"id": 63, "name": "couch"}],
            "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 51}]}  # fmt: skip
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    b = get("caption")
    recs = b.read(tmp_path / "caps.json", tmp_path / "inst.json")
    assert [r["objects"] for r in recs] == [["dog"], ["bowl"]]
    answers = ["a dog and a cat on a sofa", "a bowl of soup on a table"]
    samples = [
        {"gold": r["gold"]} | b.score(r, None, r["gold"], a) for r, a in zip(recs, answers, strict=True)
    ]
    res = b.aggregate(samples, False)
    # image 1 truth {dog, couch (from the reference)}: cat hallucinated; image 2 truth {bowl}: table hallucinated
    assert samples[0]["chair"]["hallucinated"] == ["cat"] and samples[1]["chair"]["hallucinated"] == [
        "dining table"
    ]
    assert res["chair_s"] == 1.0 and res["chair_i"] == pytest.approx(2 / 5)
    assert res["chair_recall"] == pytest.approx(3 / 3)
    with pytest.raises(ValueError, match="not COCO instance annotations"):
        b.read(tmp_path / "caps.json", tmp_path / "caps.json")

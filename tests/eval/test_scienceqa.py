"""ScienceQA in the MM-CoT formats: prompts and targets (hand-written expected strings following
ScienceQA's base_prompt.py / MM-CoT's utils_prompt.py), the official answer extraction and its
seeded random fallback, the eight group accuracies, the two-stage QCMG files, the training data
writer, and evaluate() end to end on the tiny model."""

import json

import pytest
from PIL import Image

from modalign.data import scienceqa as sqa_data
from modalign.data.datasets import load_samples
from modalign.eval import benchmarks
from modalign.eval.benchmarks import scienceqa as sqa
from modalign.eval.run import evaluate
from modalign.infer.chat import ChatModel

PROBLEMS = {
    "1": {"question": "Which animal is a mammal?", "choices": ["frog", "dog", "snake"], "answer": 1,
          "hint": "Look at the picture.", "image": "image.png", "split": "test", "subject": "natural science",
          "grade": "grade2", "lecture": "Mammals have fur.\nBirds have feathers.",
          "solution": "A dog has fur.  So it is a mammal."},
    "2": {"question": "Will these magnets attract or repel?", "choices": ["attract", "repel"], "answer": 0,
          "hint": "", "image": "image.png", "split": "test", "subject": "natural science", "grade": "grade8",
          "lecture": "Magnets can pull or push.", "solution": "Like poles repel."},
    "3": {"question": "Which state is farthest north?", "choices": ["Texas", "Utah", "Iowa", "Ohio"],
          "answer": 3, "hint": "Figure: four states.", "image": None, "split": "test",
          "subject": "social science", "grade": "grade5", "lecture": "North is up.", "solution": "Ohio is."},
    "4": {"question": "What is the capital of France?", "choices": ["Rome", "Paris"], "answer": 1,
          "hint": "This map shows Europe.", "image": "image.png", "split": "test", "subject": "social science",
          "grade": "grade10", "lecture": "", "solution": "Paris is the capital."},
    "5": {"question": "Which word is a noun?", "choices": ["run", "cat"], "answer": 1, "hint": "", "image": None,
          "split": "test", "subject": "language science", "grade": "grade3", "lecture": "A noun names a thing.",
          "solution": "Cat is a noun."},
    "6": {"question": "Which word comes last in the dictionary?", "choices": ["ant", "bee", "cow", "dog", "eel"],
          "answer": 4, "hint": "", "image": None, "split": "test", "subject": "language science",
          "grade": "grade11", "lecture": "", "solution": ""},
    "7": {"question": "Which is a solid?", "choices": ["milk", "rock"], "answer": 1, "hint": "Select the best.",
          "image": "image.png", "split": "train", "subject": "natural science", "grade": "grade4",
          "lecture": "Solids keep their shape.", "solution": "A rock is a solid."},
    "8": {"question": "Is ice cold?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
          "split": "val", "subject": "natural science", "grade": "grade1", "lecture": "", "solution": "Yes."},
}  # fmt: skip

# model outputs for the six test problems, worked by hand against the official rules
OUTPUTS = {
    "1": "The answer is B.",  # B, right
    "2": "Like poles repel. The answer is B.",  # B, wrong (gold A)
    "3": "Answer: Ohio is. The answer is D. ",  # D, right
    "4": "I do not know",  # FAILED -> draw 1 of random.Random(10) over 2 choices: 0 (A), wrong
    "5": "The answer is A. The answer is A.",  # two matches: FAILED -> draw 2: 1 (B), right
    "6": "The answer is F.",  # F is no choice -> draw 3 over 5 choices: 3 (D), wrong (gold E)
}


@pytest.fixture
def problems(tmp_path):
    f = tmp_path / "problems.json"
    f.write_text(json.dumps(PROBLEMS))
    return f


def test_prompts_and_outputs_in_the_official_formats():
    p1, p2, p6 = PROBLEMS["1"], PROBLEMS["2"], PROBLEMS["6"]
    qcm1 = "Question: Which animal is a mammal?\nContext: Look at the picture.\nOptions: (A) frog (B) dog (C) snake\n"
    assert sqa.prompt(p1, "QCM-A") == qcm1 + "Answer:"
    assert sqa.prompt(p1, "QCM-LEA") == qcm1 + "Answer:"  # ScienceQA's test example ends so in every format
    assert sqa.prompt(p1, "QCM-LE") == qcm1 + "Solution:"  # MM-CoT stage 1
    assert sqa.prompt(p2, "QCM-A") == (
        "Question: Will these magnets attract or repel?\nContext: N/A\nOptions: (A) attract (B) repel\nAnswer:"
    )
    # newlines in lecture / solution become the two characters \n; double spaces one
    assert sqa.output_text(p1, "QCM-A") == "Answer: The answer is B."
    assert sqa.output_text(p1, "QCM-LEA") == (
        "Answer: Mammals have fur.\\nBirds have feathers. A dog has fur. So it is a mammal. The answer is B."
    )
    assert sqa.output_text(p1, "QCM-LE") == (
        "Solution: Mammals have fur.\\nBirds have feathers. A dog has fur. So it is a mammal.."
    )
    assert sqa.target(p1, "QCM-A") == "The answer is B."
    assert sqa.target(p1, "QCM-LEA") == (
        "Mammals have fur.\\nBirds have feathers. A dog has fur. So it is a mammal. The answer is B."
    )
    assert (
        sqa.target(p1, "QCM-LE")
        == "Mammals have fur.\\nBirds have feathers. A dog has fur. So it is a mammal.."
    )
    # empty lecture and solution: three spaces, of which one pair is replaced (the scripts' rule)
    assert sqa.output_text(p6, "QCM-LEA") == "Answer:  The answer is E."
    # QCMG: the gold rationale, or a generated one
    assert sqa.prompt(p1, "QCMG-A") == (
        qcm1 + "Solution: Mammals have fur.\\nBirds have feathers. A dog has fur. So it is a mammal.\nAnswer:"
    )
    assert sqa.prompt(p1, "QCMG-A", rationale="Dogs have fur.") == qcm1 + "Solution: Dogs have fur.\nAnswer:"
    assert sqa.context_text(p1 | {"caption": "A dog."}, use_caption=True) == "Look at the picture. A dog."
    assert sqa.context_text(p2 | {"caption": "Two magnets."}) == "N/A"
    with pytest.raises(ValueError, match="unknown ScienceQA format"):
        sqa.prompt(p1, "QCM-ELA")


def test_answer_extraction_as_run_gpt3():
    assert sqa.extract("The answer is B.") == "B"
    assert sqa.extract("Answer: lecture... The answer is C. Done") == "C"
    assert sqa.extract("The answer is C") == "FAILED"  # the pattern needs one more character
    assert sqa.extract("The answer is B\n") == "FAILED"  # stripped first
    assert sqa.extract("The answer is A. The answer is B.") == "FAILED"  # more than one match
    assert sqa.extract("the answer is B.") == "FAILED"
    assert sqa.extract("The answer is (B).") == "FAILED"  # MM-CoT's parenthesised letters do not match
    assert sqa.extract("The answer is Z!") == "Z"  # a letter, even one that is no choice


def test_split_selection(problems, tmp_path):
    read = benchmarks.get("scienceqa").read
    recs = read(problems)
    assert [r["id"] for r in recs] == ["1", "2", "3", "4", "5", "6"]  # split "test", file order
    assert recs[0]["image"] == "test/1/image.png" and recs[2]["image"] is None
    assert [r["gold"] for r in recs] == ["B", "A", "D", "B", "B", "E"]
    assert recs[0]["category"] == "natural science" and "options" not in recs[0]
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(["8", 7]))
    assert [r["id"] for r in read(problems, ids)] == ["8", "7"]
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["7"], "val": ["8"], "test": ["6", "1"]}))
    assert [r["id"] for r in read(problems)] == ["6", "1"]  # found beside problems.json, in its order
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "99"]}))
    with pytest.raises(ValueError, match="1 id.s. not in problems.json, e.g. '99'"):
        read(problems)
    bad = tmp_path / "sub" / "bad.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"9": {"question": "q", "choices": ["a", "b"], "answer": 2, "split": "test"}}))
    with pytest.raises(ValueError, match="bad.json problem 9: answer 2 is not an index"):
        read(bad)


def _samples(task, path):
    """What evaluate() keeps per sample, for the hand-written outputs."""
    b = benchmarks.get(task)
    return [{"id": r["id"], "category": r["category"], "gold": r["gold"]} | b.score(r, None, r["gold"], OUTPUTS[r["id"]])
            for r in b.read(path, None)]  # fmt: skip


def test_scores_groups_and_seeded_fallback(problems):
    samples = _samples("scienceqa-cot", problems)
    assert [s["answer"] for s in samples] == ["B", "B", "D", None, None, None]  # fallbacks still open
    assert [s["groups"] for s in samples] == [
        ["NAT", "TXT", "IMG", "G1-6"], ["NAT", "IMG", "G7-12"], ["SOC", "TXT", "G1-6"],
        ["SOC", "TXT", "IMG", "G7-12"], ["LAN", "NO", "G1-6"], ["LAN", "NO", "G7-12"],
    ]  # fmt: skip
    res = benchmarks.get("scienceqa-cot").aggregate(samples, False)
    assert [s["answer"] for s in samples] == ["B", "B", "D", "A", "B", "D"]
    assert [s["score"] for s in samples] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert [s["extracted"] for s in samples][3:] == ["FAILED", "FAILED", "F"]
    assert res["accuracy_by_group"] == pytest.approx(
        {
            "NAT": 0.5,
            "SOC": 0.5,
            "LAN": 0.5,
            "TXT": 2 / 3,
            "IMG": 1 / 3,
            "NO": 0.5,
            "G1-6": 1.0,
            "G7-12": 0.0,
            "Avg": 0.5,
        }  # fmt: skip
    )
    assert res["accuracy"] == 0.5 and res["failed_extractions"] == 2 and res["random_fallbacks"] == 3
    assert res["group_sizes"] == {
        "NAT": 2,
        "SOC": 2,
        "LAN": 2,
        "TXT": 3,
        "IMG": 3,
        "NO": 2,
        "G1-6": 3,
        "G7-12": 3,
    }
    assert res["accuracy_by_category"] == {
        "language science": 0.5,
        "natural science": 0.5,
        "social science": 0.5,
    }
    # the draws are those of the sample order, so aggregating again changes nothing
    assert benchmarks.get("scienceqa-cot").aggregate(samples, False) == res


def test_two_stages(problems, tmp_path):
    le = benchmarks.get("scienceqa-le")
    recs = le.read(problems)
    assert recs[0]["question"].endswith("Options: (A) frog (B) dog (C) snake\nSolution:")
    assert recs[4]["gold"] == "A noun names a thing. Cat is a noun."  # the reference rationale
    assert le.score(recs[0], None, recs[0]["gold"], " Solution: Dogs have fur.\n") == {
        "answer": "Dogs have fur.", "score": None}  # fmt: skip
    assert le.aggregate([{"score": None}], False) == {}
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "3", "raw": "Solution: Ohio is north.  "}) + "\n"
                       + json.dumps({"id": "1", "raw": "Dogs have fur."}) + "\n")  # fmt: skip
    out = tmp_path / "stage2" / "qcmg.json"
    assert sqa.build_stage2(problems, samples, out) == 2
    doc = json.loads(out.read_text())
    assert (
        list(doc) == ["3", "1"] and doc["3"]["rationale"] == "Ohio is north." and doc["3"]["split"] == "test"
    )
    recs = benchmarks.get("scienceqa-qcmg").read(out)
    assert [r["id"] for r in recs] == ["3", "1"] and recs[1]["image"] == "test/1/image.png"
    assert recs[0]["question"] == (
        "Question: Which state is farthest north?\nContext: Figure: four states.\n"
        "Options: (A) Texas (B) Utah (C) Iowa (D) Ohio\nSolution: Ohio is north.\nAnswer:"
    )
    assert recs[0]["gold"] == "D"
    with pytest.raises(ValueError, match="problems.json problem 1: no 'rationale'"):
        benchmarks.get("scienceqa-qcmg").read(problems)
    samples.write_text(json.dumps({"id": "42", "raw": "x"}) + "\n")
    with pytest.raises(ValueError, match="samples.jsonl:1: problem '42' is not in problems.json"):
        sqa.build_stage2(problems, samples, out)


def test_training_data_writer(problems, tmp_path):
    out = tmp_path / "train.json"
    assert sqa_data.main(["train", str(problems), str(out)]) == 0  # QCM-LEA, split train
    assert json.loads(out.read_text()) == [{
        "id": "7", "image": "train/7/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\nQuestion: Which is a solid?\nContext: Select the best.\n"
                                       "Options: (A) milk (B) rock\nAnswer:"},
            {"from": "gpt", "value": "Solids keep their shape. A rock is a solid. The answer is B."}]}]  # fmt: skip
    n = sqa_data.write_training_data(problems, tmp_path / "a.json", "QCM-A", split="test")
    recs = json.loads((tmp_path / "a.json").read_text())
    assert n == 6 and "image" not in recs[2]
    assert recs[2]["conversations"] == [
        {"from": "human", "value": "Question: Which state is farthest north?\nContext: Figure: four states.\n"
                                   "Options: (A) Texas (B) Utah (C) Iowa (D) Ohio\nAnswer:"},
        {"from": "gpt", "value": "The answer is D."}]  # fmt: skip
    loaded = load_samples(tmp_path / "a.json")  # modalign reads it as LLaVA JSON
    assert len(loaded) == 6 and loaded[0].images == ["test/1/image.png"] and loaded[2].images == []
    # MM-CoT stage 2 training: the gold rationale, or stage-1 outputs
    sqa_data.write_training_data(problems, tmp_path / "g.json", "QCMG-A", split="train")
    human = json.loads((tmp_path / "g.json").read_text())[0]["conversations"][0]["value"]
    assert human.endswith(
        "Options: (A) milk (B) rock\nSolution: Solids keep their shape. A rock is a solid.\nAnswer:"
    )
    stage1 = tmp_path / "s1.jsonl"
    stage1.write_text(json.dumps({"id": "7", "raw": "Solution: Rocks are hard."}) + "\n")
    sqa_data.main(
        ["train", str(problems), str(tmp_path / "g2.json"), "--format", "QCMG-A", "--rationales", str(stage1)]
    )
    conv = json.loads((tmp_path / "g2.json").read_text())[0]["conversations"]
    assert conv[0]["value"].endswith("(B) rock\nSolution: Rocks are hard.\nAnswer:")
    assert conv[1]["value"] == "The answer is B."


def test_evaluate_end_to_end(tiny_model, problems, tmp_path):
    for pid in ("1", "2", "4"):
        (tmp_path / "test" / pid).mkdir(parents=True)
        Image.new("RGB", (24, 24), (0, 128, 255)).save(tmp_path / "test" / pid / "image.png")
    cm = ChatModel.load(tiny_model)
    res = evaluate(cm, "scienceqa-cot", problems, None, tmp_path / "cot", progress=False, max_new_tokens=6)
    assert res["samples"] == 6 and res["skipped"] == 0 and res["prompt_version"] == "scienceqa-cot-v1"
    assert list(res["accuracy_by_group"]) == [*sqa.GROUPS, "Avg"]
    assert res["accuracy_by_group"]["Avg"] == res["accuracy"]
    written = json.loads((tmp_path / "cot" / "results.json").read_text())
    assert written["accuracy_by_group"] == res["accuracy_by_group"]
    rows = [json.loads(line) for line in (tmp_path / "cot" / "samples.jsonl").read_text().splitlines()]
    assert all(r["answer"] in "ABCDE"[: len(PROBLEMS[r["id"]]["choices"])] for r in rows)  # fallbacks drawn
    # the two MM-CoT stages
    evaluate(cm, "scienceqa-le", problems, None, tmp_path / "le", progress=False, max_new_tokens=6)
    assert sqa.build_stage2(problems, tmp_path / "le" / "samples.jsonl", tmp_path / "qcmg.json") == 6
    res = evaluate(cm, "scienceqa-qcmg", tmp_path / "qcmg.json", tmp_path, tmp_path / "qcmg", progress=False,
                   max_new_tokens=4)  # fmt: skip
    assert res["samples"] == 6 and res["accuracy_by_group"]["Avg"] is not None

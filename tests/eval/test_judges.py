"""LLM judges against a scripted OpenAI-compatible server on loopback: the official LLaVA-Bench
review request and score parsing, the relative score, the OwlEval multimodal grader (the image as
an image_url data URI), the cache, and agreement between two judges."""

import base64
import json

import pytest
from PIL import Image

from modalign.eval import judge as J
from modalign.eval.benchmarks import get
from modalign.llm_client import LLMClient
from tests.fake_llm import FakeLLM

WILD_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the "
    "helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall "
    "score on a scale of 1 to 10, where a higher score indicates better overall performance.\nPlease first "
    "output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. "
    "The two scores are separated by a space.\nIn the subsequent line, please provide a comprehensive "
    "explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the "
    "responses were presented does not affect your judgment."
)
COCO_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with five descriptive sentences describing the same image and the "
    "bounding box coordinates of each object in the scene. These coordinates are in the form of bounding boxes, "
    "represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These values correspond to the "
    "top left x, top left y, bottom right x, and bottom right y. \nPlease rate the helpfulness, relevance, "
    "accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to "
    "10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented "
    "does not affect your judgment."
)
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(task, data, references=None, answers=None, root=None):
    """Judge rows as ``modalign eval`` builds them from the benchmark's records and ``score``."""
    b = get(task)
    out = []
    for i, r in enumerate(b.read(data, references)):
        s = {"id": r["id"], "category": r["category"], "prompt": r["question"], "gold": r["gold"]}
        s |= b.score(r, None, r["gold"], (answers or {}).get(r["id"], f" model answer {i} "))
        out.append({"id": s["id"], "question": s["prompt"], "answer": s["answer"], "reference": s["gold"],
                    "category": s["category"], "image_root": root} | s["judge_input"])  # fmt: skip
    return out


@pytest.fixture
def coco_bench(tmp_path):
    """LLaVA-Bench-COCO files: questions, GPT-4 answers, captions + boxes."""
    q = _write_jsonl(tmp_path / "qa90_questions.jsonl", [
        {"question_id": 0, "image": "000000441147.jpg", "text": "What colour are the suitcases?", "category": "conv"},
        {"question_id": 1, "image": "000000441147.jpg", "text": "Describe the image.", "category": "detail"},
    ])  # fmt: skip
    a = _write_jsonl(tmp_path / "qa90_gpt4_answer.jsonl", [
        {"question_id": 0, "text": "Black and brown."}, {"question_id": 1, "text": "Two suitcases."}])  # fmt: skip
    _write_jsonl(tmp_path / "caps_boxes_coco2014_val_80.jsonl", [
        {"id": "000000441147", "image": "000000441147.jpg", "captions": ["Two suitcases.", "Old luggage."],
         "instances": [{"category": "suitcase", "bbox": [0.1, 0.2, 0.5, 0.75]},
                       {"category": "suitcase", "bbox": [0.5, 0.25, 0.9, 0.7]}]}])  # fmt: skip
    return q, a


def test_llava_bench_coco_request_is_the_official_one(coco_bench):
    q, a = coco_bench
    rows = _rows("llava-bench", q, a, answers={0: "They are black."})
    with FakeLLM(lambda body: "7 5\nfine") as fake:
        out, res = J.llava_bench(rows, LLMClient(fake.url, "gpt-4-0314"), J.JudgeCache(None))
        body = fake.requests[0]
    expected = (
        "[Context]\nTwo suitcases.\nOld luggage.\n\n"
        "suitcase: [0.1, 0.2, 0.5, 0.75]\nsuitcase: [0.5, 0.25, 0.9, 0.7]\n\n"
        "[Question]\nWhat colour are the suitcases?\n\n"
        "[Assistant 1]\nBlack and brown.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nThey are black.\n\n[End of Assistant 2]\n\n"
        f"[System]\n{COCO_RULE}\n\n"
    )
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": expected}]
    assert body["model"] == "gpt-4-0314" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
    assert out[0]["scores"] == [7.0, 5.0] and out[0]["judge_output"] == "7 5\nfine"
    assert res["relative_score"] == pytest.approx(100 * 5 / 7) and res["judge_unparsed"] == 0


def test_llava_bench_in_the_wild_folder_layout(tmp_path):
    _write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 3, "image": "001.jpg", "text": "What is odd here?", "category": "complex"}])  # fmt: skip
    _write_jsonl(tmp_path / "answers_gpt4.jsonl", [{"question_id": 3, "text": "A man irons on a taxi."}])
    _write_jsonl(tmp_path / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A man ironing."}])
    rows = _rows(
        "llava-bench", tmp_path, None, answers={3: "Ironing."}
    )  # the folder: answers_gpt4.jsonl found
    with FakeLLM(lambda body: "9 4") as fake:
        J.llava_bench(rows, LLMClient(fake.url, "j"), J.JudgeCache(None))
        user = fake.requests[0]["messages"][1]["content"]
    assert user == (
        "[Context]\nA man ironing.\n\n[Question]\nWhat is odd here?\n\n"
        "[Assistant 1]\nA man irons on a taxi.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nIroning.\n\n[End of Assistant 2]\n\n"
        f"[System]\n{WILD_RULE}\n\n"
    )


def test_llava_bench_needs_context_and_known_categories(tmp_path):
    q = _write_jsonl(
        tmp_path / "q.jsonl", [{"question_id": 0, "image": "x.jpg", "text": "?", "category": "conv"}]
    )
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "ref"}])
    with pytest.raises(ValueError, match="context.jsonl"):
        get("llava-bench").read(q, a)
    _write_jsonl(tmp_path / "context.jsonl", [{"image": "y.jpg", "caption": "c"}])
    with pytest.raises(ValueError, match="no context for image 'x.jpg'"):
        get("llava-bench").read(q, a)
    _write_jsonl(tmp_path / "context.jsonl", [{"image": "x.jpg", "caption": ["c1", "c2"]}])
    assert get("llava-bench").read(q, a)[0]["context"] == "c1\nc2"
    _write_jsonl(
        tmp_path / "q.jsonl", [{"question_id": 0, "image": "x.jpg", "text": "?", "category": "math"}]
    )
    with pytest.raises(ValueError, match="no judge rule for category 'math'"):
        get("llava-bench").read(q, a)


def test_parse_score_as_the_official_script():
    assert J.parse_score("8 6\nAssistant 1 is more detailed.") == [8.0, 6.0]
    assert J.parse_score("7.5 9") == [7.5, 9.0]
    assert J.parse_score("8,6\n") == [8.0, 6.0]  # a comma reads as a space
    # anything but exactly two single-space-separated floats on the first line fails as [-1, -1]
    for bad in ("8, 6", "8  6", "8 6 ", "Scores: 8 6", "8/10 6/10", "8", "", "\n8 6", "eight six"):
        assert J.parse_score(bad) == [-1, -1], bad


def test_relative_score_arithmetic_keeps_failed_pairs_like_the_official_summary(coco_bench, tmp_path):
    q = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": "000000441147.jpg", "text": f"q{i}", "category": c}
        for i, c in enumerate(["conv", "conv", "detail", "detail"])])  # fmt: skip
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": f"r{i}"} for i in range(4)])
    (tmp_path / "caps_boxes_coco2014_val_80.jsonl").write_text(coco_bench[0].with_name(
        "caps_boxes_coco2014_val_80.jsonl").read_text())  # fmt: skip
    replies = {"q0": "8 6", "q1": "10 9", "q2": "6 3", "q3": "no numbers here"}

    def reply(body):
        user = body["messages"][1]["content"]
        return next(v for k, v in replies.items() if f"[Question]\n{k}\n" in user)

    with FakeLLM(reply) as fake:
        out, res = J.llava_bench(_rows("llava-bench", q, a), LLMClient(fake.url, "j"), J.JudgeCache(None))
    assert [o["scores"] for o in out] == [[8, 6], [10, 9], [6, 3], [-1, -1]]
    # conv: means 9 / 7.5 -> 83.33; detail: (6 - 1) / 2 = 2.5 and (3 - 1) / 2 = 1 -> 40;
    # all: 23 / 4 = 5.75 and 17 / 4 = 4.25 -> 73.91
    assert res["relative_score_by_category"]["conv"] == pytest.approx(250 / 3)
    assert res["relative_score_by_category"]["detail"] == pytest.approx(40.0)
    assert res["relative_score"] == pytest.approx(100 * 17 / 23)
    assert res["reference_mean"] == pytest.approx(5.75) and res["model_mean"] == pytest.approx(4.25)
    assert res["mean_scores_by_category"]["conv"] == {"reference": 9.0, "model": 7.5, "n": 2}
    assert res["judge_unparsed"] == 1 and res["judge_errors"] == 0


def test_owleval_judge_sees_the_image_and_the_reference(tmp_path):
    Image.new("RGB", (8, 6), (0, 128, 255)).save(tmp_path / "1.jpg", format="JPEG")
    (tmp_path / "cases").mkdir()
    Image.new("RGB", (5, 5), (255, 0, 0)).save(tmp_path / "cases" / "2.png")
    q = _write_jsonl(tmp_path / "questions.jsonl", [
        {"image": "1.jpg", "question_id": 1, "question": "What is funny?", "category": ["single_turn"]},
        {"image": "cases/2.png", "question_id": 2, "question": "Which colour?", "reference": "Red.",
         "category": ["multi_turn"]}])  # fmt: skip
    rows = _rows("owleval", q, answers={1: "A cat.", 2: "Blue."}, root=tmp_path)
    assert rows[0]["category"] == "single_turn"
    with FakeLLM(lambda body: ["A\ncorrect", "**C**: wrong colour"][len(fake.requests) - 1]) as fake:
        out, res = J.owleval(rows, LLMClient(fake.url, "gpt-4o"), J.JudgeCache(None))
    for body, f in zip(fake.requests, ["1.jpg", "cases/2.png"], strict=True):
        system, user = body["messages"]
        assert system["role"] == "system" and user["role"] == "user"
        (img,) = [p for p in user["content"] if p["type"] == "image_url"]
        head, b64 = img["image_url"]["url"].split(",", 1)
        assert head == ("data:image/jpeg;base64" if f.endswith("jpg") else "data:image/png;base64")
        assert base64.b64decode(b64) == (tmp_path / f).read_bytes()
    texts = [
        "".join(p["text"] for p in b["messages"][1]["content"] if p["type"] == "text") for b in fake.requests
    ]
    assert "[Question]\nWhat is funny?" in texts[0] and "[Assistant's answer]\nA cat." in texts[0]
    assert "Reference" not in texts[0] and "[Reference answer]\nRed." in texts[1]
    for letter in "ABCD":
        assert f"\n{letter}: " in texts[0]  # the four-level scale
    assert [o["grade"] for o in out] == ["A", "C"]
    assert res["grades"] == {"A": 1, "B": 0, "C": 1, "D": 0} and res["grade_fractions"]["A"] == 0.5


def test_parse_grade():
    for text, g in [("B\nminor issues", "B"), ("(A) correct", "A"), ("**D**", "D"), ("Grade: C", "C"),
                    ("\n  B: acceptable", "B"), ("Answer is fine", None), ("", None), (None, None),
                    ("E", None), ("Rating-A", "A")]:  # fmt: skip
        assert J.parse_grade(text) == g, text


def test_cache_makes_a_rerun_free(coco_bench, tmp_path):
    q, a = coco_bench
    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")
    o = _write_jsonl(tmp_path / "owl.jsonl", [{"image": "i.png", "question_id": 1, "question": "?"}])
    cache = tmp_path / "cache" / "judge.jsonl"
    with FakeLLM(lambda body: "B" if isinstance(body["messages"][1]["content"], list) else "8 6") as fake:
        first = J.llava_bench(_rows("llava-bench", q, a), LLMClient(fake.url, "j"), J.JudgeCache(cache))
        J.owleval(_rows("owleval", o, root=tmp_path), LLMClient(fake.url, "j"), J.JudgeCache(cache))
        assert len(fake.requests) == 3
        c = J.JudgeCache(cache)  # a fresh process: read back from disk
        client = LLMClient(fake.url, "j")
        again = J.llava_bench(_rows("llava-bench", q, a), client, c)
        J.owleval(_rows("owleval", o, root=tmp_path), client, c)
        assert len(fake.requests) == 3 and client.usage.requests == 0 and c.hits == 3
        assert again == first
        # another judge model, a changed answer or a changed image is a new request
        J.llava_bench(_rows("llava-bench", q, a), LLMClient(fake.url, "other"), c)
        J.llava_bench(_rows("llava-bench", q, a, answers={0: "changed"}), client, c)
        Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "i.png")
        J.owleval(_rows("owleval", o, root=tmp_path), client, c)
        assert len(fake.requests) == 3 + 2 + 1 + 1
    recs = [json.loads(line) for line in cache.read_text().splitlines()]
    assert {r["version"] for r in recs} == {J.LLAVA_BENCH_VERSION, J.OWL_VERSION} and recs[0]["model"] == "j"


def test_failed_requests_are_not_scored_or_cached(coco_bench, tmp_path):
    q, a = coco_bench
    with FakeLLM(lambda body: "8 6", fail_first=100) as fake:
        client = LLMClient(fake.url, "j", max_retries=1, backoff_s=0.001)
        out, res = J.llava_bench(_rows("llava-bench", q, a), client, J.JudgeCache(tmp_path / "c.jsonl"))
    assert [o["scores"] for o in out] == [None, None] and res["judge_errors"] == 2
    assert res["relative_score"] is None and not (tmp_path / "c.jsonl").exists()


def test_agreement_figures_on_hand_worked_numbers():
    x, y = [6, 9, 3, 5], [7, 8, 2, 7]
    # means 5.75 and 6: Sxy = 17, Sxx = 18.75, Syy = 22 -> r = 17 / sqrt(412.5)
    assert J.pearson(x, y) == pytest.approx(17 / 412.5**0.5)
    # ranks [3, 4, 1, 2] and [2.5, 4, 1, 2.5] -> 4.5 / sqrt(5 * 4.5)
    assert J.spearman(x, y) == pytest.approx(4.5 / 22.5**0.5)
    assert J.score_agreement(x, y)["mean_abs_diff"] == pytest.approx(1.25)
    assert J.pearson([1, 1], [2, 3]) is None and J.pearson([1], [1]) is None
    # observed 4/6; chance (2*1 + 2*3 + 1*2 + 1*0) / 36 = 10/36 -> kappa = (24 - 10) / (36 - 10) = 7/13
    g1, g2 = list("AABBCD"), list("ABBBCC")
    assert J.cohen_kappa(g1, g2) == pytest.approx(7 / 13)
    assert J.grade_agreement(g1, g2) == {
        "n": 6,
        "exact_agreement": pytest.approx(4 / 6),
        "cohen_kappa": pytest.approx(7 / 13),
    }
    assert J.cohen_kappa(["A", "A"], ["A", "A"]) is None


def test_two_judges_both_judge_every_sample(coco_bench, tmp_path):
    q, a = coco_bench
    q = _write_jsonl(tmp_path / "q4.jsonl", [
        {"question_id": i, "image": "000000441147.jpg", "text": f"q{i}", "category": "conv"} for i in range(5)])  # fmt: skip
    a = _write_jsonl(tmp_path / "a4.jsonl", [{"question_id": i, "text": f"r{i}"} for i in range(5)])
    # judge 1 gives the model 6 9 3 5 (and fails to parse on q4), judge 2 gives 7 8 2 7 (and 1 on q4)
    s1 = {"q0": "8 6", "q1": "8 9", "q2": "8 3", "q3": "8 5", "q4": "?"}
    s2 = {"q0": "9 7", "q1": "9 8", "q2": "9 2", "q3": "9 7", "q4": "9 1"}

    def reply(body):
        key = body["messages"][1]["content"].split("[Question]\n")[1].split("\n")[0]
        return (s1 if body["model"] == "judge-a" else s2)[key]

    with FakeLLM(reply) as fake:
        panel = J.JudgePanel([LLMClient(fake.url, "judge-a"), LLMClient(fake.url, "judge-b")])
        out, res = J.llava_bench(_rows("llava-bench", q, a), panel, J.JudgeCache(None))
        assert len(fake.requests) == 10 and panel.usage.requests == 10 and panel.model == "judge-a + judge-b"
    assert out[0]["scores"] == {"judge-a": [8, 6], "judge-b": [9, 7]}
    assert set(out[4]["judge_output"]) == {"judge-a", "judge-b"}
    agr = res["judge_agreement"]
    assert agr["judges"] == ["judge-a", "judge-b"] and agr["n"] == 4
    assert agr["pearson"] == pytest.approx(17 / 412.5**0.5) and agr["mean_abs_diff"] == pytest.approx(1.25)
    assert res["judges"]["judge-b"]["relative_score"] == pytest.approx(100 * 25 / 45)
    assert res["relative_score"] == res["judges"]["judge-a"]["relative_score"]

    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")
    o = _write_jsonl(
        tmp_path / "owl.jsonl", [{"image": "i.png", "question_id": i, "question": f"w{i}"} for i in range(6)]
    )
    g1, g2 = "AABBCD", "ABBBCC"

    def grade(body):  # each sample is put to the first judge, then to the second
        i = int(body["messages"][1]["content"][1]["text"].split("[Question]\nw")[1][0])
        return (g1 if len(fake.requests) % 2 == 1 else g2)[i] + "\nbecause"

    with FakeLLM(grade) as fake:
        # two judges of one model name (say, at two endpoints) are told apart as "same" and "same#2"
        panel = J.JudgePanel([LLMClient(fake.url, "same"), LLMClient(fake.url, "same")])
        out, res = J.owleval(_rows("owleval", o, root=tmp_path), panel, J.JudgeCache(None))
    assert out[5]["grade"] == {"same": "D", "same#2": "C"}
    assert res["grades"] == {"A": 2, "B": 2, "C": 1, "D": 1}
    assert res["judges"]["same#2"]["grades"] == {"A": 1, "B": 3, "C": 2, "D": 0}
    assert res["judge_agreement"]["cohen_kappa"] == pytest.approx(7 / 13)
    assert res["judge_agreement"]["exact_agreement"] == pytest.approx(4 / 6)


def test_cli_two_judges_end_to_end(tiny_model, tmp_path, capsys):
    """``modalign eval`` with two judges: the image reaches the OwlEval judge from ``--images``,
    both judges' outputs land in samples.jsonl, and the results carry their agreement."""
    from modalign.cli import main

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    q = _write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": i, "image": "red.png", "text": f"q{i}", "category": ["conv", "detail", "complex"][i % 3]}
        for i in range(3)])  # fmt: skip
    refs = _write_jsonl(
        tmp_path / "answers_gpt4.jsonl", [{"question_id": i, "text": f"r{i}"} for i in range(3)]
    )
    _write_jsonl(tmp_path / "context.jsonl", [{"image": "red.png", "caption": "A red square."}])
    owl = _write_jsonl(
        tmp_path / "owl.jsonl", [{"image": "red.png", "question_id": 1, "question": "Colour?"}]
    )
    llava = {"a": ["8 6", "8 7", "8 2"], "b": ["9 5", "9 6", "9 1"]}

    def reply(body):
        content = body["messages"][1]["content"]
        if isinstance(content, list):
            return {"a": "A", "b": "B"}[body["model"]]
        return llava[body["model"]][int(content.split("[Question]\nq")[1][0])]

    with FakeLLM(reply) as fake:
        common = ["--model", str(tiny_model), "--max-new-tokens", "3", "--judge-cache", str(tmp_path / "c.jsonl"),
                  "--judge-endpoint", fake.url, "--judge-model", "a", "--judge-model", "b"]  # fmt: skip
        assert main(["eval", "--task", "llava-bench", "--data", str(q), "--references", str(refs),
                     "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "lb"), *common]) == 0  # fmt: skip
        assert main(["eval", "--task", "owleval", "--data", str(owl), "--images", str(tmp_path / "imgs"),
                     "--out", str(tmp_path / "owl"), *common]) == 0  # fmt: skip
        assert len(fake.requests) == 2 * 3 + 2
        url = fake.requests[-1]["messages"][1]["content"][0]["image_url"]["url"]
        assert base64.b64decode(url.split(",", 1)[1]) == (tmp_path / "imgs" / "red.png").read_bytes()
        assert "[Context]\nA red square.\n\n[Question]\nq0\n\n" in fake.requests[0]["messages"][1]["content"]
    res = json.loads((tmp_path / "lb" / "results.json").read_text())
    assert res["judge_model"] == "a + b" and res["judge_requests"] == 6
    assert res["relative_score"] == pytest.approx(100 * 5 / 8)
    assert res["judge_agreement"]["pearson"] == pytest.approx(1.0) and res["judge_agreement"]["n"] == 3
    assert res["judge_agreement"]["mean_abs_diff"] == pytest.approx(1.0)
    sample = json.loads((tmp_path / "lb" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["judge"] == {"a": [8.0, 6.0], "b": [9.0, 5.0]} and sample["judge_output"]["b"] == "9 5"
    assert sample["judge_input"]["context"] == "A red square."
    res = json.loads((tmp_path / "owl" / "results.json").read_text())
    assert res["grades"] == {"A": 1, "B": 0, "C": 0, "D": 0} and res["judges"]["b"]["grades"]["B"] == 1
    assert res["judge_agreement"]["exact_agreement"] == 0.0
    bad = ["eval", "--task", "owleval", "--data", str(owl), "--out", str(tmp_path / "x"), "--model", str(tiny_model),
           *["--judge-endpoint", "http://127.0.0.1:9/v1"] * 3]  # fmt: skip
    assert main(bad) == 2 and "once, or twice for two judges" in capsys.readouterr().err

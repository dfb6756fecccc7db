"""modalign eval: benchmark files in their public formats, outputs, bad input, judges, and the
command line (ShapesWorld's own benchmark is tested in tests/shapesworld)."""

import base64
import io
import json

import pytest
from PIL import Image

from modalign.cli import main
from modalign.eval import benchmarks
from modalign.eval.run import evaluate
from modalign.infer.chat import ChatModel


def samples_of(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def read_records(task, path, references=None):
    return benchmarks.get(task).read(path, references)


@pytest.fixture(scope="module")
def setup(world, tiny_model, tmp_path_factory):
    """A folder with the tiny model (``model``), its ShapesWorld data (``sw``) and a red image."""
    d = tmp_path_factory.mktemp("ev")
    (d / "model").symlink_to(tiny_model)
    (d / "sw").symlink_to(world)
    Image.new("RGB", (50, 40), (255, 0, 0)).save(d / "red.png")
    return d


def test_formats_metrics_and_missing_images(setup, tmp_path):
    d = setup
    cm = ChatModel.load(d / "model")
    (tmp_path / "red.png").write_bytes((d / "red.png").read_bytes())
    pope = tmp_path / "pope.jsonl"
    pope.write_text("\n".join(json.dumps({"question_id": i, "image": "red.png" if i != 3 else "gone.png",
                                          "text": "Is there a dog?", "label": ["yes", "no"][i % 2]}) for i in range(5)))  # fmt: skip
    res = evaluate(cm, "pope", pope, None, tmp_path / "pope", progress=False, max_new_tokens=3)
    assert res["samples"] == 4 and res["skipped"] == 1 and res["skipped_by_reason"] == {"missing image": 1}
    assert res["tp"] + res["fp"] + res["tn"] + res["fn"] == 4
    # what reaches the metric: each kept record's gold label and the model's parsed raw answer
    from modalign.eval import metrics as M

    got = samples_of(tmp_path / "pope")
    assert [x["id"] for x in got] == [0, 1, 2, 4] and [x["gold"] for x in got] == ["yes", "no", "yes", "yes"]
    assert all(x["answer"] == M.pope_answer(x["raw"]) for x in got)
    want = M.pope_metrics([M.pope_answer(x["raw"]) for x in got], [x["gold"] for x in got])
    assert {k: res[k] for k in want} == want
    assert res["accuracy"] == sum(x["answer"] == x["gold"] for x in got) / 4
    with pytest.raises(Exception, match="gone.png"):
        evaluate(
            cm, "pope", pope, None, tmp_path / "p2", progress=False, bad_samples="error", max_new_tokens=2
        )
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(buf, format="PNG")
    tsv = tmp_path / "mmb.tsv"
    img = base64.b64encode(buf.getvalue()).decode()
    tsv.write_text("index\tquestion\tA\tB\tC\tanswer\tcategory\timage\n"
                   f"0\tWhat colour?\tred\tblue\tgreen\tB\tcolour\t{img}\n")  # fmt: skip
    res = evaluate(cm, "mc", tsv, None, tmp_path / "mmb", circular=True, progress=False, max_new_tokens=3)
    assert res["samples"] == 3
    got = samples_of(tmp_path / "mmb")  # each rotation of the options, its gold letter moving with blue
    rotations = [(x["prompt"], x["gold"]) for x in got]
    assert len(set(rotations)) == 3 and all(f"{g}. blue" in t for t, g in rotations)
    assert res["circular_accuracy"] == float(all(x["score"] == 1.0 for x in got))
    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps([{"id": 1, "image": "red.png", "captions": ["a red image", "red"]}]))
    res = evaluate(cm, "caption", cap, None, tmp_path / "cap", progress=False, max_new_tokens=4)
    (x,) = samples_of(tmp_path / "cap")
    assert x["gold"] == ["a red image", "red"]
    assert res["bleu4"] == M.bleu4([x["answer"]], [x["gold"]]) and res["cider"] == M.cider_d(
        [x["answer"]], [x["gold"]]
    )


def test_bad_benchmark_files_name_the_record(tmp_path):
    f = tmp_path / "v.json"
    f.write_text(
        json.dumps(
            [{"image": "a.png", "question": "q", "answers": ["x"] * 10}, {"image": "b.png", "answers": []}]
        )
    )
    with pytest.raises(ValueError, match=r"v.json record 1: missing field\(s\) question"):
        read_records("vqa", f)
    t = tmp_path / "m.tsv"
    t.write_text("index\tquestion\tA\tB\tanswer\n7\tq\tx\ty\tE\n")
    with pytest.raises(ValueError, match=r"m.tsv:2: answer key 'E' is not one of the options"):
        read_records("mc", t)
    sq = tmp_path / "s.json"
    sq.write_text(json.dumps([{"question": "q", "choices": ["a", "b"], "answer": 5}]))
    with pytest.raises(ValueError, match="answer 5 is not an index"):
        read_records("mc", sq)


def test_cli_eval_and_compare(setup, tmp_path, capsys):
    d = setup
    args = ["eval", "--model", str(d / "model"), "--task", "shapes", "--data", str(d / "sw" / "eval.json"),
            "--limit", "10", "--out", str(tmp_path / "a")]  # fmt: skip
    assert main(args) == 0
    assert (
        main(
            ["eval", "--compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "a" / "results.json")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("results.json") == 2 and "| run" in out
    # the table's cells are the run's figures: its accuracy, and each question type's
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    got = samples_of(tmp_path / "a")
    assert len(got) == 10 and res["accuracy"] == sum(x["score"] for x in got) / 10
    header, _, row, _ = [line for line in out.splitlines() if line.startswith("|")]
    cells = dict(
        zip(
            [c.strip() for c in header.split("|")[1:-1]],
            [c.strip() for c in row.split("|")[1:-1]],
            strict=True,
        )
    )
    assert cells["accuracy"] == f"{res['accuracy']:.4f}"
    for cat, acc in res["accuracy_by_category"].items():
        assert cells[cat] == f"{acc:.1%}"


def test_llm_judge_llava_bench_and_owleval_with_cache(setup, tmp_path):
    from modalign.llm_client import LLMClient
    from tests.fake_llm import FakeLLM

    d = setup
    (tmp_path / "red.png").write_bytes((d / "red.png").read_bytes())
    q = tmp_path / "questions.jsonl"
    q.write_text("\n".join(json.dumps({"question_id": i, "image": "red.png", "text": f"Describe {i}",
                                       "category": ["conv", "detail"][i % 2]}) for i in range(4)))  # fmt: skip
    refs = tmp_path / "answers.jsonl"
    refs.write_text("\n".join(json.dumps({"question_id": i, "text": f"reference {i}"}) for i in range(4)))
    (tmp_path / "context.jsonl").write_text(
        json.dumps({"image": "red.png", "caption": "A red square."}) + "\n"
    )

    def reply(body):
        user = body["messages"][-1]["content"]
        if "[Assistant 1]" in user:
            return "8 6\nAssistant 1 is better." if "Describe 3" not in user else "unparsable"
        return "B\nminor issues"

    cm = ChatModel.load(d / "model")
    cache = tmp_path / "cache.jsonl"
    with FakeLLM(reply, fail_first=1) as fake:
        judge = LLMClient(fake.url, "judge-1", backoff_s=0.01)
        res = evaluate(cm, "llava-bench", q, None, tmp_path / "lb", judge=judge, references=refs, judge_cache=cache,
                       progress=False, max_new_tokens=4)  # fmt: skip
        assert res["judge_retries"] == 1 and res["judge_unparsed"] == 1
        # the unparsable review counts as [-1, -1], as in LLaVA's summarize_gpt_review.py
        assert res["relative_score"] == pytest.approx(100 * 17 / 23)
        assert res["relative_score_by_category"]["conv"] == pytest.approx(75.0)
        n = len(fake.requests)
        again = evaluate(cm, "llava-bench", q, None, tmp_path / "lb2", judge=LLMClient(fake.url, "judge-1"),
                         references=refs, judge_cache=cache, progress=False, max_new_tokens=4)  # fmt: skip
        assert len(fake.requests) == n and again["judge_cache_hits"] == 4  # re-run costs nothing
        sample = json.loads((tmp_path / "lb" / "samples.jsonl").read_text().splitlines()[0])
        assert sample["judge_output"].startswith("8 6") and sample["judge"] == [8.0, 6.0]
        o = tmp_path / "owl.json"
        o.write_text(json.dumps([{"id": i, "image": "red.png", "question": f"what {i}?"} for i in range(3)]))
        res = evaluate(cm, "owleval", o, None, tmp_path / "owl", judge=LLMClient(fake.url, "judge-1"),
                       judge_cache=cache, progress=False, max_new_tokens=4)  # fmt: skip
        assert res["grades"] == {"A": 0, "B": 3, "C": 0, "D": 0}


def test_official_layouts(setup, tmp_path):
    d = setup
    img = Image.new("RGB", (20, 20), (0, 255, 0))
    # VQAv2: questions + annotations files, COCO image names
    img.save(tmp_path / "COCO_val2014_000000000042.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What colour?", "question_id": 420}]}))  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "answer_type": "other", "answers": [{"answer": "green"}] * 10}]}))  # fmt: skip
    recs = read_records("vqa", tmp_path / "q.json", tmp_path / "a.json")
    assert recs[0]["image"] == "COCO_val2014_000000000042.jpg" and recs[0]["gold"] == ["green"] * 10
    # ScienceQA problems.json (text-only problems are skipped)
    (tmp_path / "test" / "7").mkdir(parents=True)
    img.save(tmp_path / "test" / "7" / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps({
        "7": {"question": "Which?", "choices": ["x", "y"], "answer": 1, "image": "image.png", "split": "test",
              "subject": "natural science", "hint": ""},
        "8": {"question": "No image", "choices": ["x", "y"], "answer": 0, "image": None}}))  # fmt: skip
    recs = read_records("mc", tmp_path / "problems.json")
    assert [r["gold"] for r in recs] == ["B"] and recs[0]["image"] == "test/7/image.png"
    # MME release folders
    sub = tmp_path / "mme" / "color"
    (sub / "images").mkdir(parents=True)
    (sub / "questions_answers_YN").mkdir()
    img.save(sub / "images" / "001.jpg")
    (sub / "questions_answers_YN" / "001.txt").write_text("Is it green?\tYes\nIs it red?\tNo\n")
    cm = ChatModel.load(d / "model")
    res = evaluate(cm, "mme", tmp_path / "mme", None, tmp_path / "mme_out", progress=False, max_new_tokens=2)
    assert res["samples"] == 2 and set(res["subtasks"]) == {"color"}
    from modalign.eval import metrics as M

    got = samples_of(tmp_path / "mme_out")
    assert [x["gold"] for x in got] == ["Yes", "No"]
    # one image: MME's accuracy+ counts its two questions as a pair
    assert {x["image"] for x in got} == {"color/images/001.jpg"}
    want = M.mme_scores([{"subtask": "color", "image": x["image"], "prediction": M.mme_answer(x["raw"]),
                          "answer": x["gold"]} for x in got])  # fmt: skip
    assert res["perception"] == want["perception"] and res["subtasks"] == want["subtasks"]
    # COCO captions annotations
    (tmp_path / "caps.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "COCO_val2014_000000000042.jpg"}],
                                                    "annotations": [{"image_id": 1, "caption": "a green square"},
                                                                    {"image_id": 1, "caption": "green"}]}))  # fmt: skip
    assert read_records("caption", tmp_path / "caps.json")[0]["gold"] == ["a green square", "green"]


def test_readers_follow_the_official_scripts_and_refuse_what_would_score_wrong(tmp_path):
    from modalign.eval import metrics as M

    # MMBench: the hint before the question (LLaVA's and VLMEvalKit's inference); "nan" is no
    # hint; a circular set's rotated copies (index + k x 1e6) are left out, --circular rotates
    t = tmp_path / "mmb.tsv"
    t.write_text("index\tquestion\thint\tA\tB\tanswer\n"
                 "3\tWhich is red?\tThe ball is red.\tball\tsky\tA\n"
                 "4\tWhich is blue?\tnan\tball\tsky\tB\n"
                 "1000003\tWhich is red?\tThe ball is red.\tsky\tball\tB\n")  # fmt: skip
    recs = read_records("mc", t)
    assert [(r["id"], r["question"]) for r in recs] == [("3", "The ball is red.\nWhich is red?"),
                                                        ("4", "Which is blue?")]  # fmt: skip
    # rows without ids are told apart by their place; an id given twice is refused
    rows = [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 3
    (tmp_path / "mc.json").write_text(json.dumps(rows))
    assert len({r["id"] for r in read_records("mc", tmp_path / "mc.json")}) == 3
    samples = [
        {"id": r["id"], "score": s} for r in read_records("mc", tmp_path / "mc.json") for s in (1.0, 1.0)
    ]
    samples[-1]["score"] = 0.0  # one rotation of the last question wrong
    assert benchmarks.get("mc").aggregate(samples, True)["circular_accuracy"] == 2 / 3
    (tmp_path / "dup.json").write_text(json.dumps([dict(rows[0], id=7), dict(rows[0], id=7)]))
    with pytest.raises(ValueError, match="question id 7 is given to more than one question"):
        read_records("mc", tmp_path / "dup.json")
    # "a" the article is no option letter; "answer is B" is
    assert M.extract_choice("The answer is a dog.", {"A": "cat", "B": "dog"}) == "B"
    assert M.extract_choice("The answer is B.", {"A": "cat", "B": "dog"}) == "B"
    # gold fields of the wrong shape (a string was read character by character)
    cases = [("caption", {"image": "a.png", "captions": "a dog"}, "captions must be a list"),
             ("vqa", {"image": "a.png", "question": "q", "answers": "cat"}, "answers must be a list"),
             ("vqa", {"image": "a.png", "question": "q", "answers": ["cat"]}, "answers must be a list of at least 2"),
             ("exact", {"image": "a.png", "question": "q", "answer": ["cat", "dog"]}, "answer must be a string")]  # fmt: skip
    for task, row, msg in cases:
        (tmp_path / "b.json").write_text(json.dumps([row]))
        with pytest.raises(ValueError, match=f"b.json record 0: {msg}"):
            read_records(task, tmp_path / "b.json")
    # MME totals say what they leave out
    got = M.mme_scores([{"subtask": "color", "image": "1", "prediction": "yes", "answer": "Yes"},
                        {"subtask": "ocr", "image": "2", "prediction": "yes", "answer": "Yes"}])  # fmt: skip
    assert got["unknown_subtasks"] == ["ocr"] and "OCR" in got["missing_subtasks"]
    assert len(got["missing_subtasks"]) == 13 and got["images_without_two_questions"] == 2


def test_an_evaluation_with_no_image_found_fails_instead_of_scoring_zero(setup, tmp_path):
    cm = ChatModel.load(setup / "model")
    pope = tmp_path / "pope.jsonl"
    pope.write_text("\n".join(json.dumps({"question_id": i, "image": "gone.png", "text": "Is there a dog?",
                                          "label": "yes"}) for i in range(3)))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"no pope question could be asked: all 3 skipped \(missing image: 3\)"
    ):
        evaluate(cm, "pope", pope, None, tmp_path / "out", progress=False, max_new_tokens=2)

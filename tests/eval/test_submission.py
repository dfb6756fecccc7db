"""Leaderboard files next to samples.jsonl: VQAv2's EvalAI JSON, MME's per-subtask txt, the MMBench
submission (.tsv, .xlsx with openpyxl) and LLaVA-Bench's answers JSONL, checked line for line."""

import base64
import importlib.util
import io
import json

import pytest
from PIL import Image

from modalign.eval import submission
from modalign.eval.metrics import evalai_answer
from modalign.eval.run import evaluate, write_outputs
from modalign.infer.chat import ChatModel

HAS_OPENPYXL = importlib.util.find_spec("openpyxl") is not None
MME_SUFFIX = "\nPlease answer yes or no."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def results_for(task, data="", model=""):
    return {"task": task, "data": str(data), "data_sha256": "0" * 64, "prompt_version": f"{task}-v1",
            "samples": 0, "skipped": 0, "accuracy_by_category": {}, "model": str(model)}  # fmt: skip


def test_vqav2_json(tmp_path):
    samples = [
        {"id": 262148000, "category": "number", "prompt": "q", "raw": " Two dogs\n", "gold": ["2"] * 10},
        {"id": "17", "category": "yes/no", "prompt": "q", "raw": "yes", "gold": ["yes"] * 10},
        {"id": 5, "category": "other", "prompt": "q", "raw": "a\tred\r\nball.", "gold": ["red"] * 10},
        {
            "id": 6,
            "category": "other",
            "prompt": "q",
            "raw": "The man's hat, isn't it?",
            "gold": ["hat"] * 10,
        },
    ]
    write_outputs(tmp_path, samples, [], results_for("vqa"))
    # as LLaVA's converter uploads them (EvalAI's answer processor): lower case, commas and
    # question marks dropped, "'s" split off, number words to digits, articles and the full stop
    # dropped, contractions given their apostrophe
    assert json.loads((tmp_path / "vqav2_submission.json").read_text()) == [
        {"question_id": 262148000, "answer": "2 dogs"},
        {"question_id": 17, "answer": "yes"},
        {"question_id": 5, "answer": "red ball"},
        {"question_id": 6, "answer": "man 's hat isn't it"},
    ]
    assert "`vqav2_submission.json`" in (tmp_path / "report.md").read_text()


def test_mme_txt_per_subtask_with_each_images_questions_together(tmp_path):
    def s(sub, image, q, gold, raw):
        return {"id": f"{sub}/{q}", "category": sub, "image": image, "prompt": q + MME_SUFFIX, "raw": raw,
                "gold": gold, "answer": raw.lower()[:3], "score": 1.0}  # fmt: skip

    samples = [
        s("artwork", "artwork/images/10002.jpg", "Is this artwork created by Ma Yuan? Please answer yes or no.",
          "Yes", "Yes"),
        s("count", "count/000000006040.jpg", "Are there two trains in the image? Please answer yes or no.", "No",
          "No, there is one.\nOnly one."),
        s("artwork", "artwork/images/10049.jpg", "Is this artwork displayed in Louvre? Please answer yes or no.",
          "No", "no"),
        s("artwork", "artwork/images/10002.jpg", "Is this artwork created by Monet? Please answer yes or no.",
          "No", "Yes\tit is"),
    ]  # fmt: skip
    write_outputs(tmp_path, samples, [], results_for("mme"))
    d = tmp_path / "mme_results"
    assert sorted(p.name for p in d.iterdir()) == ["artwork.txt", "count.txt"]
    assert (d / "artwork.txt").read_text() == (
        "10002.jpg\tIs this artwork created by Ma Yuan? Please answer yes or no.\tYes\tYes\n"
        "10002.jpg\tIs this artwork created by Monet? Please answer yes or no.\tNo\tYes it is\n"
        "10049.jpg\tIs this artwork displayed in Louvre? Please answer yes or no.\tNo\tno\n"
    )
    assert (d / "count.txt").read_text() == (
        "000000006040.jpg\tAre there two trains in the image? Please answer yes or no.\tNo\t"
        "No, there is one. Only one.\n"
    )


def mmbench_tsv(path, image_b64=""):
    path.write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\tsplit\timage\n"
        f"10\tWhat colour is it?\tLook closely.\tred\tblue\tgreen\t\tB\tcolor\tattribute\tdev\t{image_b64}\n"
        f"1000011\tWhich shape?\t\tcircle\tsquare\t\t\tA\tshape\tattribute\tdev\t{image_b64}\n"
        f"12\tWhich letter?\t\tx\ty\t\t\tA\tother\tother\tdev\t{image_b64}\n"
    )
    return path


def mc_sample(i, options, raw, answer):
    return {"id": i, "category": "c", "prompt": "q" + MC_SUFFIX, "raw": raw, "gold": "A", "answer": answer,
            "score": 0.0, "options": options}  # fmt: skip


MMB_SAMPLES = [
    # --circular: three rotations of question 10; the unrotated one carries the prediction
    mc_sample("10", {"A": "blue", "B": "green", "C": "red"}, "C", "C"),
    mc_sample("10", {"A": "red", "B": "blue", "C": "green"}, "B.", "B"),
    mc_sample("10", {"A": "green", "B": "red", "C": "blue"}, "A", "A"),
    mc_sample("1000011", {"A": "circle", "B": "square"}, "I cannot tell", None),
]
MMB_ROWS = [
    ["index", "question", "hint", "A", "B", "C", "D", "answer", "prediction", "category", "l2-category"],
    ["10", "What colour is it?", "Look closely.", "red", "blue", "green", "", "B", "B", "color", "attribute"],
    ["1000011", "Which shape?", "", "circle", "square", "", "", "A", "", "shape", "attribute"],
]


def test_mmbench_tsv(tmp_path):
    data = mmbench_tsv(tmp_path / "mmbench_dev_en.tsv")
    out = tmp_path / "out"
    write_outputs(out, MMB_SAMPLES, [], results_for("mc", data))
    assert (out / "mmbench_submission.tsv").read_text() == "".join("\t".join(r) + "\n" for r in MMB_ROWS)
    # .xlsx only where openpyxl is installed (lmms-eval and most pandas setups have it)
    assert (out / "mmbench_submission.xlsx").exists() == HAS_OPENPYXL
    # multiple choice from other formats (ScienceQA, JSON lists) has no leaderboard file
    other = tmp_path / "sqa.json"
    other.write_text("[]")
    write_outputs(tmp_path / "sqa", MMB_SAMPLES, [], results_for("mc", other))
    assert not list((tmp_path / "sqa").glob("mmbench_submission*"))


@pytest.mark.skipif(not HAS_OPENPYXL, reason="openpyxl is not installed: the .xlsx is not written without it")
def test_mmbench_xlsx_reads_back(tmp_path):
    from openpyxl import load_workbook

    data = mmbench_tsv(tmp_path / "mmbench_dev_en.tsv")
    paths = submission.mmbench(tmp_path, MMB_SAMPLES, results_for("mc", data))
    assert [p.name for p in paths] == ["mmbench_submission.tsv", "mmbench_submission.xlsx"]
    ws = load_workbook(tmp_path / "mmbench_submission.xlsx").active
    got = [[c if c is not None else "" for c in row] for row in ws.iter_rows(values_only=True)]
    want = [MMB_ROWS[0]] + [[int(r[0]), *r[1:]] for r in MMB_ROWS[1:]]  # the index as a number
    assert got == want


def test_llava_bench_answers_jsonl(tmp_path):
    samples = [
        {"id": 0, "category": "conv", "prompt": "What is unusual about this image?", "raw": " A man irons.\n",
         "gold": "ref", "answer": "A man irons.", "score": None},
        {"id": 1, "category": "detail", "prompt": "Describe the image.", "raw": "A taxi.", "gold": "ref",
         "answer": "A taxi.", "score": None},
    ]  # fmt: skip
    write_outputs(tmp_path, samples, [], results_for("llava-bench", model="/ckpt/llava-tiny"))
    rows = [json.loads(x) for x in (tmp_path / "llava_bench_answers.jsonl").read_text().splitlines()]
    ids = [r.pop("answer_id") for r in rows]
    assert rows == [
        {"question_id": 0, "prompt": "What is unusual about this image?", "text": "A man irons.",
         "model_id": "llava-tiny", "metadata": {}},
        {"question_id": 1, "prompt": "Describe the image.", "text": "A taxi.", "model_id": "llava-tiny",
         "metadata": {}},
    ]  # fmt: skip
    assert all(len(i) == 22 for i in ids) and ids[0] != ids[1]
    write_outputs(tmp_path / "again", samples, [], results_for("llava-bench", model="/ckpt/llava-tiny"))
    again = [json.loads(x)["answer_id"] for x in (tmp_path / "again" / "llava_bench_answers.jsonl").open()]
    assert again == ids  # stable across runs


def test_benchmarks_without_a_leaderboard_file_write_none(tmp_path):
    samples = [{"id": 1, "category": "all", "prompt": "q", "raw": "yes", "gold": "yes", "answer": "yes",
                "score": 1.0}]  # fmt: skip
    write_outputs(tmp_path, samples, [], results_for("pope"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json", "samples.jsonl"]


def test_evaluate_writes_the_files_from_real_records(world, tiny_model, tmp_path):
    """Records read from each benchmark's file, answered by the tiny model, written by ``evaluate``."""
    cm = ChatModel.load(tiny_model)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")

    def samples(out):
        return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]

    def line(raw):
        return raw.replace("\n", " ").replace("\t", " ")

    mme = tmp_path / "mme.jsonl"
    qs = [("color", "red.png", "Is the image red? Please answer yes or no.", "Yes"),
          ("color", "blue.png", "Is the image red? Please answer yes or no.", "No"),
          ("color", "red.png", "Is the image blue? Please answer yes or no.", "No"),
          ("color", "blue.png", "Is the image blue? Please answer yes or no.", "Yes")]  # fmt: skip
    mme.write_text("".join(json.dumps(dict(zip(("subtask", "image", "question", "answer"), q, strict=True))) + "\n"
                           for q in qs))  # fmt: skip
    evaluate(cm, "mme", mme, None, tmp_path / "mme", progress=False, max_new_tokens=4)
    raw = {(s["image"], s["prompt"]): s["raw"] for s in samples(tmp_path / "mme")}
    order = [qs[0], qs[2], qs[1], qs[3]]  # each image's two questions together
    assert (tmp_path / "mme" / "mme_results" / "color.txt").read_text() == "".join(
        f"{img}\t{q}\t{gold}\t{line(raw[(img, q + MME_SUFFIX)])}\n" for _, img, q, gold in order
    )

    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("".join(json.dumps({"question_id": qid, "image": "red.png", "question": "What colour?",
                                       "answers": ["red"] * 10}) + "\n" for qid in (4001, 4002)))  # fmt: skip
    evaluate(cm, "vqa", vqa, None, tmp_path / "vqa", progress=False, max_new_tokens=4)
    got = json.loads((tmp_path / "vqa" / "vqav2_submission.json").read_text())
    assert got == [
        {"question_id": s["id"], "answer": evalai_answer(s["raw"])} for s in samples(tmp_path / "vqa")
    ]
    assert [g["question_id"] for g in got] == [4001, 4002]

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(buf, format="PNG")
    tsv = mmbench_tsv(tmp_path / "mmb.tsv", base64.b64encode(buf.getvalue()).decode())
    evaluate(cm, "mc", tsv, None, tmp_path / "mmb", circular=True, progress=False, max_new_tokens=3)
    ss = samples(tmp_path / "mmb")
    assert len(ss) == 3 + 2 + 2  # every rotation of the three questions
    first = {s["id"]: s["answer"] or "" for s in ss[::-1]}  # the first sample of each question: unrotated
    rows = [r.split("\t") for r in (tmp_path / "mmb" / "mmbench_submission.tsv").read_text().splitlines()]
    assert rows == [
        MMB_ROWS[0],
        ["10", "What colour is it?", "Look closely.", "red", "blue", "green", "", "B", first["10"], "color",
         "attribute"],
        ["1000011", "Which shape?", "", "circle", "square", "", "", "A", first["1000011"], "shape", "attribute"],
        ["12", "Which letter?", "", "x", "y", "", "", "A", first["12"], "other", "other"],
    ]  # fmt: skip

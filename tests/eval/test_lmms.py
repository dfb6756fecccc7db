"""lmms-eval's ``--model modalign``: the model class against lmms-eval's own base class and
``Instance``s, and the ``lmms-eval`` command end to end (entry-point registration, a local task on
generated ShapesWorld data, offline), each answer checked against modalign's own engine / a plain
forward pass. Skipped where lmms-eval is not installed (``pip install modalign[lmms]``)."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval (and its dependencies) not installed")
from lmms_eval.api.instance import Instance  # noqa: E402

from modalign.data.conversation import IMAGE_MARK, Message  # noqa: E402
from modalign.eval.lmms import ModalignLMM, manifest  # noqa: E402
from modalign.infer.chat import ChatModel, user_message  # noqa: E402

N_DOCS = 6
UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""
GEN_TASK = """task: modalign_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_TASK = """task: modalign_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: choices
doc_to_target: target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def docs(world):
    """Held-out ShapesWorld questions with two choices each (the answer and a distractor)."""
    out = []
    for r in json.loads((world / "eval.json").read_text())[:N_DOCS]:
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        other = "purple" if r["answer"] != "purple" else "green"
        choices = [r["answer"], other] if len(out) % 2 == 0 else [other, r["answer"]]
        out.append({"id": r["id"], "image": str(world / r["image"]), "question": q, "answer": r["answer"],
                    "choices": choices, "target": choices.index(r["answer"])})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def cm(tiny_model):
    return ChatModel.load(tiny_model)


@pytest.fixture(scope="module")
def lm(tiny_model, docs):
    m = ModalignLMM(pretrained=str(tiny_model), batch_size="4", progress="false")
    m.task_dict = {"t": {"test": docs}}
    return m


def visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def req(kind, args, doc_id=0):
    return Instance(
        request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}
    )


def engine_reply(cm, text, images, max_new_tokens, stop=()):
    """What modalign's own generation answers (greedy), as ``modalign generate`` would."""
    res = cm.reply(
        [user_message(text, len(images))], images, cm.params(max_new_tokens=max_new_tokens, stop=list(stop))
    )
    return res.text.strip()


@torch.inference_mode()
def forward_loss(cm, text, images, reply):
    """Mean NLL of the reply's tokens after the generation prompt, and whether each is the argmax:
    the model's own loss on (prompt ids + reply ids), pixels spliced by ``MLLM.forward``."""
    p = cm.prompt([user_message(text, len(images))], images)
    cont = cm.tok.encode(reply)
    ids = torch.tensor([p.input_ids + cont])
    labels = torch.full_like(ids, -100)
    labels[0, -len(cont) :] = torch.tensor(cont)
    pixels = torch.stack(p.pixel_values) if p.pixel_values else None
    out = cm.model(ids, pixel_values=pixels, labels=labels)
    greedy = bool((out.logits[0, -len(cont) - 1 : -1].argmax(-1) == torch.tensor(cont)).all())
    return float(out.loss), greedy


def test_generate_until_matches_the_engine(lm, cm, docs):
    gen = {"max_new_tokens": 5, "until": ["\n"], "do_sample": False, "temperature": 0}
    reqs = [
        req("generate_until", (d["question"], dict(gen), visual, i, "t", "test"), i)
        for i, d in enumerate(docs)
    ]
    reqs.append(
        req("generate_until", ("Say something.", {"max_new_tokens": 3}, lambda d: [], 0, "t", "test"))
    )
    got = lm.generate_until(reqs)
    want = [engine_reply(cm, d["question"], [d["image"]], 5, ["\n"]) for d in docs]
    assert got == [*want, engine_reply(cm, "Say something.", [], 3)]
    lm.batch_size = 1  # one at a time: the same answers
    try:
        assert lm.generate_until(reqs) == got
    finally:
        lm.batch_size = 4
    # an <image> mark in the context places the image there
    marked = req(
        "generate_until", ("Look: <image> " + docs[0]["question"], dict(gen), visual, 0, "t", "test")
    )
    p = cm.prompt([Message("user", f"Look: {IMAGE_MARK} " + docs[0]["question"])], [docs[0]["image"]])
    assert lm.generate_until([marked]) == [
        cm.engine.generate([p], cm.params(max_new_tokens=5, stop=["\n"]))[0].text.strip()
    ]


def test_loglikelihood_is_the_models_loss(lm, cm, docs):
    reqs, want = [], []
    for i, d in enumerate(docs):
        for c in d["choices"]:
            reqs.append(req("loglikelihood", (d["question"], " " + c, visual, i, "t", "test"), i))
            want.append(forward_loss(cm, d["question"], [d["image"]], c))
    got = [r.text if hasattr(r, "text") else r for r in lm.loglikelihood(reqs)]
    assert [g for _, g in got] == [g for _, g in want]
    assert [x for x, _ in got] == pytest.approx([x for x, _ in want], abs=1e-4)
    # a target given as the task's doc_to_target, and an unconditional (two-argument) request
    (nll, _), (nll2, _) = [
        r.text if hasattr(r, "text") else r
        for r in lm.loglikelihood([req("loglikelihood", ("Q?", lambda doc: doc["answer"], None, 0, "t", "test")),
                                   req("loglikelihood", ("", docs[0]["answer"]))])
    ]  # fmt: skip
    assert nll == pytest.approx(forward_loss(cm, "Q?", [], docs[0]["answer"])[0], abs=1e-4)
    assert nll2 == pytest.approx(forward_loss(cm, "", [], docs[0]["answer"])[0], abs=1e-4)


def test_multi_round_follows_doc_to_text(lm, cm, docs):
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return None, f"Again: {doc['question']}", False, previous_output, {"round": round_idx}

    args = (docs[1]["question"], {"max_new_tokens": 4}, visual, doc_to_text, 1, "t", "test")
    [rounds] = lm.generate_until_multi_round([req("generate_until_multi_round", args, 1)])
    first = engine_reply(cm, docs[1]["question"], [docs[1]["image"]], 4)
    assert rounds == [first, engine_reply(cm, f"Again: {docs[1]['question']}", [docs[1]["image"]], 4)]
    assert seen == [(1, [first], None), (2, rounds, {"round": 1})]


def test_unsupported_requests_say_why(lm, docs):
    video = req("generate_until", ("q", {}, lambda d: ["/data/clip.mp4"], 0, "t", "test"))
    with pytest.raises(ValueError, match="take images; this task gave a str '/data/clip.mp4'"):
        lm.generate_until([video])
    beams = req("generate_until", ("q", {"num_beams": 3}, visual, 0, "t", "test"))
    with pytest.raises(ValueError, match="beam search"):
        lm.generate_until([beams])
    with pytest.raises(ValueError, match="unknown model_args for modalign: conv_template"):
        ModalignLMM(pretrained="unused", conv_template="vicuna")


def test_registered_as_an_entry_point():
    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "modalign"]
    assert eps, "modalign's lmms_eval.models entry point is missing: reinstall modalign (pip install -e .)"
    assert eps[0].load() is manifest
    from lmms_eval.models import get_model

    assert get_model("modalign") is ModalignLMM


def test_lmms_eval_cli_runs_a_local_task(tmp_path, tiny_model, cm, docs):
    """``python -m lmms_eval --model modalign`` on local tasks (generation and multiple choice),
    offline; every logged answer equals modalign's own, every choice score the model's loss."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "shapes.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "modalign_gen.yaml").write_text(GEN_TASK.format(data=data))
    (tasks / "modalign_mc.yaml").write_text(MC_TASK.format(data=data))
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "modalign",
           "--model_args", f"pretrained={tiny_model},progress=false", "--tasks", "modalign_gen,modalign_mc",
           "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples",
           "--batch_size", "4", "--verbosity", "WARNING"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [res_file] = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(res_file.read_text())["results"]
    logged = {t: [json.loads(x) for x in next((tmp_path / "out").rglob(f"*_samples_{t}.jsonl")).open()]
              for t in ("modalign_gen", "modalign_mc")}  # fmt: skip

    gen = sorted(logged["modalign_gen"], key=lambda s: s["doc_id"])
    want = [engine_reply(cm, d["question"], [d["image"]], 5, ["\n"]) for d in docs]
    assert [s["filtered_resps"] for s in gen] == want
    assert results["modalign_gen"]["exact_match,none"] == pytest.approx(
        sum(w == d["answer"] for w, d in zip(want, docs, strict=True)) / N_DOCS
    )

    mc = sorted(logged["modalign_mc"], key=lambda s: s["doc_id"])
    acc = 0
    for s, d in zip(mc, docs, strict=True):
        scores = [forward_loss(cm, d["question"], [d["image"]], c) for c in d["choices"]]
        got = [(float(x), str(g) == "True") for x, g in s["filtered_resps"]]
        assert [g for _, g in got] == [g for _, g in scores]
        assert [x for x, _ in got] == pytest.approx([x for x, _ in scores], abs=1e-4)
        pick = min(range(len(scores)), key=lambda k: scores[k][0])  # lmms-eval takes the smallest loss
        assert s["acc"] == float(pick == d["target"])
        acc += pick == d["target"]
    assert results["modalign_mc"]["acc,none"] == pytest.approx(acc / N_DOCS)

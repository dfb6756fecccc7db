"""The frozen-LLM pipelines in miniature: ``run_pipelines`` trains what they read (captioner,
matching model, the agent's tool-tuned controller, a few steps each), answers the held-out
questions about two images with each pipeline, and scores the trained LLaVA on the same ones."""

import json

import pytest

from modalign.pipelines.img2llm import HEADER as IMG2LLM_HEADER
from modalign.pipelines.pica import HEADER as PICA_HEADER
from modalign.pipelines.run import load_questions
from modalign.shapesworld.pipelines import agent_chats, heldout_subset, run_pipelines
from tests.tiny import tiny_quickstart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipes")
    tiny_quickstart(out)
    parts = ["captioner.stages.caption.stop.max_steps=2", "itm.stages.qformer.stop.max_steps=2",
             "agent-llm.stages.tools.stop.max_steps=2", "agent-llm.stages.tools.data.batch_size=2"]  # fmt: skip
    rows = run_pipelines(["pica", "img2llm", "pnp-vqa", "agent"], out, images=2, progress=False, sets=parts)
    return out, rows


def test_every_pipeline_answers_the_same_questions_with_its_cost(run):
    out, rows = run
    questions = heldout_subset(out / "data", 2)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["pica", "img2llm", "pnp-vqa", "agent", "llava"]
    for name in ("pica", "img2llm", "pnp-vqa", "agent"):
        r = by[name]
        assert r["questions"] == len(questions)
        assert (
            r["llm_calls"] >= len(questions)
            and r["llm_tokens"] > r["llm_calls"]
            and r["seconds_per_question"] > 0
        )
        samples = [
            json.loads(x) for x in (out / "pipelines" / f"{name}_samples.jsonl").read_text().splitlines()
        ]
        assert [s["id"] for s in samples] == [q["id"] for q in questions]
        # the row's accuracy is its samples' exact matches against the questions' answers
        from modalign.eval.metrics import normalize_answer

        right = [
            normalize_answer(s["prediction"]) == normalize_answer(q["answer"])
            for s, q in zip(samples, questions, strict=True)
        ]
        assert r["heldout_accuracy"] == pytest.approx(sum(right) / len(right))
    assert by["pica"]["llm_calls"] == 3 * len(questions)  # 3 prompts a question
    first = lambda n: json.loads((out / "pipelines" / f"{n}_samples.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first("pica")["prompt"].startswith(PICA_HEADER) and first("pica")["prompt"].count("\nA: ") == 2
    assert first("img2llm")["prompt"].startswith(IMG2LLM_HEADER)
    assert (
        first("pnp-vqa")["prompt"].startswith("A picture shows ") and len(first("pnp-vqa")["patches"][0]) == 3
    )
    assert first("agent")["steps"] and by["agent"]["caption_calls"] <= by["agent"]["llm_calls"]
    # the trained method on the same questions, from its own evaluation
    llava = [json.loads(x) for x in (out / "llava" / "eval_samples.jsonl").read_text().splitlines()]
    ids = {q["id"] for q in questions}
    want = sum(s["correct"] for s in llava if s["id"] in ids) / len(ids)
    assert by["llava"]["heldout_accuracy"] == pytest.approx(want)
    assert json.loads((out / "pipelines" / "comparison.json").read_text()) == json.loads(json.dumps(rows))
    assert (out / "pipelines" / "comparison.png").stat().st_size > 10_000


def test_agent_chats_are_written_as_serve_writes_them(run):
    out, _ = run
    recs = [r for r in load_questions(out / "data" / "instruct.json") if r["answer"]]
    chats = agent_chats(recs, 50, seed=0, swap=0.5)
    q = {r["id"]: r for r in recs}
    swapped = 0
    for c in chats:
        rec = q[c["id"][len("agent-") :]]
        conv = c["conversations"]
        assert [t["from"] for t in conv] == ["system", "human", "gpt", "human", "gpt"]
        assert "# Tools" in conv[0]["value"] and '"name": "vqa"' in conv[0]["value"]
        assert conv[1]["value"] == f"{rec['question']}\n(images: image_1)"
        call = json.loads(conv[2]["value"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        assert call == {"name": "vqa", "arguments": {"image": "image_1", "question": rec["question"]}}
        said = conv[3]["value"].removeprefix("<tool_response>\n").removesuffix("\n</tool_response>")
        assert conv[4]["value"] == said  # the answer is the tool's
        swapped += said != rec["answer"]
    assert 0 < swapped < len(chats)

"""Instruction-data synthesis against a scripted OpenAI-compatible server on 127.0.0.1: the output
loads with the LLaVA loader, retries happen (429, timeout), malformed replies are counted and not
written, and a run killed halfway and restarted produces every image exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from modalign.data.datasets import load_samples
from modalign.data.synthesize import synthesize
from modalign.llm_client import LLMClient
from modalign.shapesworld import data as shapes
from tests.fake_llm import FakeLLM


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("sw")
    shapes.generate(d, num_train=30, num_eval=2, seed=1, num_text=2)
    return d


def reply(body):
    ctx = body["messages"][-1]["content"]
    if "triangle" in ctx.split("\n")[0]:
        return "I cannot help with that."  # malformed: no Q/A turns
    return "Question:\nHow many shapes are there?\nAnswer:\nThere are a few shapes.\n===\nQuestion:\nWhat is at the top?\nAnswer:\nA shape."


def test_synthesis_retries_rejects_and_loads(scenes, tmp_path):
    anns = [json.loads(x) for x in (scenes / "scenes.jsonl").read_text().splitlines()]
    bad = sum("triangle" in a["captions"][0].split("\n")[0] for a in anns)
    assert 0 < bad < len(anns)
    with FakeLLM(reply, fail_first=2, stall_on={5}, stall_s=1.5) as fake:
        client = LLMClient(fake.url, "gen", timeout_s=0.5, backoff_s=0.01, max_retries=4)
        out = tmp_path / "conv.json"
        s = synthesize(scenes / "scenes.jsonl", "conversation", client, out, concurrency=4, progress=False)
    assert s["retries"] >= 3 and {"429", "timeout"} <= set(s["retry_reasons"])
    assert s["rejected"] == {"no question/answer": bad} and s["accepted"] == len(anns) - bad == s["written"]
    samples = load_samples(out)
    assert len(samples) == len(anns) - bad and all(len(x.images) == 1 for x in samples)
    assert samples[0].messages[1].content == "There are a few shapes."
    rejected = [json.loads(x) for x in (tmp_path / "conv.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == bad and all(r["reply"] == "I cannot help with that." for r in rejected)
    assert s["prompt_tokens"] > 0 and s["requests"] >= len(anns)


def test_killed_run_resumes_every_image_exactly_once(scenes, tmp_path):
    out = tmp_path / "conv.json"
    partial = tmp_path / "conv.partial.jsonl"
    with FakeLLM(lambda body: (time.sleep(0.15), reply(body))[1]) as fake:
        cmd = [sys.executable, "-m", "modalign.cli", "data", "synthesize", "--annotations", str(scenes / "scenes.jsonl"),
               "--kind", "conversation", "--endpoint", fake.url, "--model", "gen", "--out", str(out),
               "--concurrency", "2", "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while (not partial.exists() or len(partial.read_text().splitlines()) < 5) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        first = len(partial.read_text().splitlines())
        assert 5 <= first < 30 and not out.exists()
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    anns = [json.loads(x) for x in (scenes / "scenes.jsonl").read_text().splitlines()]
    bad = sum("triangle" in a["captions"][0].split("\n")[0] for a in anns)
    ids = [r["id"] for r in json.loads(out.read_text())]
    assert len(ids) == len(set(ids)) == len(anns) - bad
    rejected = [json.loads(x)["id"] for x in (tmp_path / "conv.rejected.jsonl").read_text().splitlines()]
    assert sorted(ids + rejected) == sorted(a["id"] for a in anns)


def test_parse_kinds_and_coco_annotations(tmp_path):
    from modalign.data.synthesize import Rejected, context, parse_reply, read_annotations

    ann = {"id": "7", "captions": ["a cat"], "objects": [{"category": "cat", "bbox": [0.1, 0.2, 0.5, 0.9]}]}
    turns = parse_reply("detail", "The picture shows a small grey cat sitting on the left side.", ann)
    assert turns[0]["value"].startswith("<image>\n") and turns[1]["value"].startswith("The picture")
    r = parse_reply("reasoning", "Question: Why?\nAnswer: Because it is sunny.\nQuestion: x\nAnswer: y", ann)
    assert len(r) == 2 and r[1]["value"] == "Because it is sunny."
    for kind, text, reason in [("detail", "too short", "too short"), ("conversation", "", "empty reply"),
                               ("detail", "Question: a\nAnswer: b c d e f g h i j", "wrong format")]:  # fmt: skip
        with pytest.raises(Rejected) as e:
            parse_reply(kind, text, ann)
        assert e.value.reason == reason
    assert context(ann) == "a cat\ncat: [0.100, 0.200, 0.500, 0.900]"
    coco = {"images": [{"id": 1, "file_name": "1.jpg", "width": 200, "height": 100}],
            "categories": [{"id": 3, "name": "dog"}],
            "annotations": [{"image_id": 1, "category_id": 3, "bbox": [20, 10, 100, 50]}]}  # fmt: skip
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    (tmp_path / "caps.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog"}]}))
    anns = read_annotations(tmp_path / "inst.json", tmp_path / "caps.json")
    assert anns == [{"id": "1", "image": "1.jpg", "captions": ["a dog"],
                     "objects": [{"category": "dog", "bbox": [0.1, 0.1, 0.6, 0.6]}]}]  # fmt: skip
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"id": 1, "image": "a", "objects": [{"category": "x", "bbox": [0, 0, 2, 1]}]})
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:1: objects\[0\].bbox must be 4 numbers in \[0, 1\]"):
        read_annotations(tmp_path / "bad.jsonl")


def test_bad_bodies_cut_replies_placeholders_and_torn_resumes(scenes, tmp_path):
    """A 200 whose body is cut short is retried (it ended the run), a reply cut at max_tokens and
    one that writes <image> are rejected (they were written, the second failing to load), a
    resume after a line torn by a crash keeps every record (the next one was appended to the torn
    line and lost), and a resume into another kind's output is refused."""
    anns = [json.loads(x) for x in (scenes / "scenes.jsonl").read_text().splitlines()][:6]
    (tmp_path / "six.jsonl").write_text("".join(json.dumps(a) + "\n" for a in anns))
    first = {a["captions"][0]: k for k, a in enumerate(anns)}
    seen = set()

    def script(body):
        k = next(v for c, v in first.items() if body["messages"][-1]["content"].startswith(c))
        if k == 0 and k not in seen:
            seen.add(k)
            return b'{"choices": [{"message": {"content": "Question: x'
        if k == 1:
            return {"content": "Question: What is it?\nAnswer: The square is bl", "finish_reason": "length"}
        if k == 2:
            return "Question: What is in the <image>?\nAnswer: Shapes."
        return "Question: How many shapes?\nAnswer: A few."

    out = tmp_path / "c.json"
    with FakeLLM(script) as fake:
        client = LLMClient(fake.url, "gen", backoff_s=0.01, max_retries=2)
        s = synthesize(tmp_path / "six.jsonl", "conversation", client, out, concurrency=1, progress=False)
    assert s["retry_reasons"].get("malformed body") == 1 and s["failed_requests"] == 0
    assert s["rejected"] == {"truncated": 1, "image placeholder": 1} and s["accepted"] == 4
    assert sorted(x.id for x in load_samples(out)) == sorted(anns[k]["id"] for k in (0, 3, 4, 5))
    # a crash tore the last line of the partial file: the redone record is kept, with the others
    partial = tmp_path / "c.partial.jsonl"
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    with FakeLLM(script) as fake:
        s = synthesize(
            tmp_path / "six.jsonl", "conversation", LLMClient(fake.url, "gen"), out, progress=False
        )
    assert s["already_done"] == 5 and s["accepted"] == 1 and s["written"] == 4
    with pytest.raises(
        ValueError, match="holds 4 record\\(s\\) of kind 'conversation'.*this run makes 'detail'"
    ):
        synthesize(
            tmp_path / "six.jsonl", "detail", LLMClient("http://127.0.0.1:9/v1", "gen"), out, progress=False
        )


def test_the_client_does_not_wait_after_its_last_attempt():
    with FakeLLM(lambda body: b"not json") as fake:
        client = LLMClient(fake.url, "gen", backoff_s=5.0, max_retries=0)
        t = time.monotonic()
        with pytest.raises(Exception, match="gave up after 1 attempts"):
            client.chat([{"role": "user", "content": "hi"}])
        assert time.monotonic() - t < 2.5

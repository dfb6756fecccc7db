"""ShapesWorld: deterministic, answers correct against the scene, unseen pairs held out."""

import json

import pytest

from modalign import MLLM
from modalign.data.datasets import load_samples
from modalign.data.tokenizer import Tokenizer
from modalign.eval.run import evaluate
from modalign.infer.chat import ChatModel
from modalign.shapesworld import benchmark  # noqa: F401  (registers the "shapes" task)
from modalign.shapesworld import data as shapes
from modalign.shapesworld.data import POSITIONS, Scene
from modalign.shapesworld.evaluate import evaluate_shapes


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    """300 training scenes: enough for the data set's statistics."""
    out = tmp_path_factory.mktemp("sw")
    shapes.generate(out, num_train=300, num_eval=60, seed=3, num_text=100)
    return out


def question_of(turn: str) -> str:
    """A first user turn without its image placeholder (before or after the question)."""
    return turn.removeprefix("<image>\n").removesuffix("\n<image>")


# the LLaVA-JSON conversation files (stage 1, stage 2 and its curriculum, held-out questions)
TRAINING_FILES = [
    "captions.json",
    "instruct.json",
    "instruct_basic.json",
    "instruct_ground.json",
    "instruct_ground_relation.json",
    "eval.json",
]


def test_deterministic_for_a_seed(big_world, tmp_path):
    shapes.generate(tmp_path, num_train=300, num_eval=60, seed=3, num_text=100)
    # shapes.FILES (what the quickstart checks before reusing a data set) is exactly what is written
    assert {p.name for p in tmp_path.iterdir() if p.is_file()} == set(shapes.FILES)
    for name in [*TRAINING_FILES, "text.jsonl", "scenes.jsonl"]:
        assert (big_world / name).read_bytes() == (tmp_path / name).read_bytes(), name
    for img in ["images/train_00007.png", "images/eval_00011.png"]:
        assert (big_world / img).read_bytes() == (tmp_path / img).read_bytes()
    other = tmp_path / "other"
    shapes.generate(other, num_train=30, num_eval=6, seed=4, num_text=10)
    assert (
        json.loads((other / "captions.json").read_text())[0]
        != json.loads((big_world / "captions.json").read_text())[0]
    )


def referred(objs, words: list[str]) -> list:
    """The objects a reference names: "red star" (colour and shape), "star", "red object"."""
    if len(words) == 2 and words[1] != "object":
        return [o for o in objs if o.colour == words[0] and o.shape == words[1]]
    if len(words) == 2:
        return [o for o in objs if o.colour == words[0]]
    return [o for o in objs if o.shape == words[0]]


def answer(scene: Scene, q: str) -> str:
    """An independent reading of the question against the scene description."""
    objs = scene.objects
    words = q.rstrip("?").split()
    if q.startswith("What colour is the"):
        return next(o.colour for o in objs if o.shape == words[-1])
    if q.startswith("What shape is the"):
        return next(o.shape for o in objs if o.colour == words[4])
    if q.startswith("How many"):
        return shapes.NUMBERS[len(objs)]
    if q.startswith("Where is the"):
        (o,) = referred(objs, words[3:])  # exactly one object fits the reference
        return POSITIONS[o.cell]
    if q.startswith("Is there a"):
        return "yes" if any(o.colour == words[3] and o.shape == words[4] for o in objs) else "no"
    if q.startswith("What word"):
        return scene.word
    if q.startswith("Is the"):
        a = next(o for o in objs if o.colour == words[2] and o.shape == words[3])
        rel = " ".join(words[4:-3])
        b = next(o for o in objs if o.colour == words[-2] and o.shape == words[-1])
        (ra, ca), (rb, cb) = a.row_col, b.row_col
        return (
            "yes"
            if {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]
            else "no"
        )
    raise AssertionError(q)


# the question type (eval.json's "type", each training record's "type") of a question's words
TYPE_OF = (("What colour is the", "colour"), ("What shape is the", "shape"), ("Where is the", "position"),
           ("How many shapes", "count"), ("What word", "read"), ("Is there a", "exist"), ("Is the ", "relation"),
           ("Describe the image.", "describe"))  # fmt: skip


def type_of(question: str) -> str:
    return next(t for prefix, t in TYPE_OF if question.startswith(prefix))


def test_answers_match_the_scenes(big_world):
    evals = json.loads((big_world / "eval.json").read_text())
    assert {e["type"] for e in evals} == set(shapes.QUESTION_TYPES)
    for e in evals:
        q = question_of(e["conversations"][0]["value"])
        assert answer(Scene.from_dict(e["scene"]), q) == e["answer"] == e["conversations"][1]["value"]
        assert e["type"] == type_of(q)
    scenes = {
        json.loads(line)["id"]: json.loads(line)
        for line in (big_world / "scenes.jsonl").read_text().splitlines()
    }
    # the curriculum files: single colour / shape questions, then single position, count and read
    # questions (and relation questions in the second grounding file), answered right
    grounding = ("Where is the", "How many shapes", "What word is written")
    for name, sep, prefixes in (("instruct_basic.json", "-b", ("What colour is the", "What shape is the")),
                                ("instruct_ground.json", "-g", grounding),
                                ("instruct_ground_relation.json", "-g", (*grounding, "Is the "))):  # fmt: skip
        recs = json.loads((big_world / name).read_text())
        assert len({r["id"] for r in recs}) == len(recs) > 0, name
        for rec in recs:
            scene = Scene.from_dict(scenes[rec["id"].rsplit(sep, 1)[0]]["scene"])
            (h, g) = rec["conversations"]
            q = question_of(h["value"])
            assert q.startswith(prefixes) and g["value"] == answer(scene, q), (name, rec["id"])
            assert rec["type"] == type_of(q), (name, rec["id"])  # what a recipe may balance by
    # one position question per object of every training scene, one count question per scene and
    # one read question per scene with a word; the second file holds the same questions and one
    # relation question per scene with two objects or more (the same as instruct.json's)
    ground = json.loads((big_world / "instruct_ground.json").read_text())
    asked = [question_of(r["conversations"][0]["value"]) for r in ground]
    with_relation = json.loads((big_world / "instruct_ground_relation.json").read_text())
    asked_relation = [question_of(r["conversations"][0]["value"]) for r in with_relation]

    def by_scene(recs, qs):
        return sorted((r["id"].rsplit("-g", 1)[0], q) for r, q in zip(recs, qs, strict=True))

    assert by_scene(ground, asked) == [
        x for x in by_scene(with_relation, asked_relation) if not x[1].startswith("Is the ")
    ]
    assert sum(q.startswith("Where is the") for q in asked) == sum(
        len(s["scene"]["objects"]) for s in scenes.values()
    )
    assert sum(q.startswith("How many shapes") for q in asked) == len(scenes)
    assert sum(q.startswith("What word") for q in asked) == sum(
        bool(s["scene"]["word"]) for s in scenes.values()
    )
    # the default layout: every question of every training scene is its own sample, answered right
    per_scene = {}
    for rec in json.loads((big_world / "instruct.json").read_text()):
        sid = rec["id"].rsplit("-", 1)[0]
        scene = Scene.from_dict(scenes[sid]["scene"])
        (h, g) = rec["conversations"]
        q = question_of(h["value"])
        assert g["value"] == (shapes.describe(scene) if q == "Describe the image." else answer(scene, q))
        assert rec["type"] == type_of(q), rec["id"]
        per_scene.setdefault(sid, []).append(q)
    assert set(per_scene) == set(scenes)
    relations = {(sid, q) for sid, qs in per_scene.items() for q in qs if q.startswith("Is the ")}
    assert relations and relations == {
        (r["id"].rsplit("-g", 1)[0], q)
        for r, q in zip(with_relation, asked_relation, strict=True)
        if q.startswith("Is the ")
    }
    assert len(relations) == sum(len(s["scene"]["objects"]) >= 2 for s in scenes.values())
    for sid, qs in per_scene.items():
        objs = scenes[sid]["scene"]["objects"]
        assert len(qs) == len(set(qs)) and qs.count("How many shapes are there?") == 1, sid
        assert sum(q.startswith("Where is the") for q in qs) == len(objs), sid
        assert sum(q.startswith("Is there a") for q in qs) == len(objs) + 1, sid  # and one absent object
    described = sum("Describe the image." in qs for qs in per_scene.values()) / len(per_scene)
    assert 0.15 < described < 0.35
    # by default every position question names its object by colour and shape
    where = [q for qs in per_scene.values() for q in qs if q.startswith("Where is the")]
    assert where and all(len(q.split()) == 5 and not q.endswith(" object?") for q in where)


def test_short_references_name_the_one_attribute_that_singles_an_object_out(big_world, tmp_path):
    """``short_references=0.5``: about half of the training position questions name their object by
    the one attribute that singles it out (answered right, the reference fitting one object), the
    same question in every file; the scenes, the other questions and the held-out split unchanged."""
    out = tmp_path / "short"
    shapes.generate(out, num_train=300, num_eval=60, seed=3, num_text=100, short_references=0.5)
    for name in ("scenes.jsonl", "captions.json", "instruct_basic.json", "eval.json", "text.jsonl"):
        assert (out / name).read_bytes() == (big_world / name).read_bytes(), name
    scenes = {
        json.loads(line)["id"]: json.loads(line)["scene"]
        for line in (out / "scenes.jsonl").read_text().splitlines()
    }
    asked = {}
    for name, sep in (
        ("instruct.json", "-q"),
        ("instruct_ground.json", "-g"),
        ("instruct_ground_relation.json", "-g"),
    ):
        before = json.loads((big_world / name).read_text())
        after = json.loads((out / name).read_text())
        assert [r["id"] for r in after] == [r["id"] for r in before], name
        for r, b in zip(after, before, strict=True):
            q = question_of(r["conversations"][0]["value"])
            if r["type"] != "position":
                assert r == b, r["id"]
                continue
            scene = Scene.from_dict(scenes[r["id"].rsplit(sep, 1)[0]])
            assert r["conversations"][1]["value"] == answer(scene, q) == b["conversations"][1]["value"]
            asked.setdefault(name, []).append((r["id"].rsplit(sep, 1)[0], b["conversations"][0]["value"], q))
    # one question per object: the same reference in the full mixture and both grounding files
    assert (
        sorted(asked["instruct.json"])
        == sorted(asked["instruct_ground.json"])
        == sorted(asked["instruct_ground_relation.json"])
    )
    short = [q for _, _, q in asked["instruct.json"] if len(q.split()) == 4 or q.endswith(" object?")]
    assert {q.split()[-1] for q in short} == {f"{s}?" for s in shapes.SHAPES} | {"object?"}
    assert 0.3 < len(short) / len(asked["instruct.json"]) < 0.5
    assert json.loads((out / "meta.json").read_text())["short_references"] == 0.5
    with pytest.raises(ValueError, match=r"short_references must be a share in \[0, 1\], got 1.5"):
        shapes.generate(tmp_path / "x", num_train=1, num_eval=1, short_references=1.5)


def test_conversation_layout(big_world, tmp_path):
    """``layout="conversation"`` asks ``turns`` of a scene's questions in one conversation (the image in
    the first turn); the scenes, the other files and which scenes are described do not change."""
    conv = tmp_path / "conv"
    shapes.generate(conv, num_train=300, num_eval=60, seed=3, num_text=100, layout="conversation", turns=3)
    for name in ("scenes.jsonl", "captions.json", "instruct_basic.json", "instruct_ground.json", "eval.json",
                 "text.jsonl", "text_instruct.json"):  # fmt: skip
        assert (conv / name).read_bytes() == (big_world / name).read_bytes(), name
    assert json.loads((conv / "meta.json").read_text())["layout"] == "conversation"
    single = {}
    for rec in json.loads((big_world / "instruct.json").read_text()):
        single.setdefault(rec["id"].rsplit("-", 1)[0], []).append(rec["conversations"])
    recs = json.loads((conv / "instruct.json").read_text())
    assert [r["id"] for r in recs] == list(single) and {r["type"] for r in recs} == {"conversation"}
    for rec in recs:
        turns = rec["conversations"]
        humans = [t["value"] for t in turns[::2]]
        assert humans[0].endswith("\n<image>") and not any("<image>" in h for h in humans[1:]), rec["id"]
        asked = [t[0]["value"] for t in single[rec["id"]]]
        described = asked[-1].startswith("Describe the image.")
        assert len(humans) == min(3, len(asked) - described) + described, rec["id"]
        pairs = {(question_of(t[0]["value"]), t[1]["value"]) for t in single[rec["id"]]}
        assert {
            (question_of(h["value"]), g["value"]) for h, g in zip(turns[::2], turns[1::2], strict=True)
        } <= pairs
    with pytest.raises(ValueError, match="layout must be one of"):
        shapes.generate(tmp_path / "x", num_train=1, num_eval=1, layout="dialogue")


def parse_description(text: str) -> Scene:
    """A scene read back from its description ("a small red circle at the top left; ...")."""
    objs, word, word_cell = [], None, None
    for part in text.rstrip(".").split("; "):
        what, place = part.split(" at the ")
        if what.startswith("the word "):
            word, word_cell = what.removeprefix("the word "), POSITIONS.index(place)
        else:
            _, size, colour, shape = what.split()
            objs.append(shapes.Obj(shape, colour, size, POSITIONS.index(place)))
    return Scene(objs, word, word_cell)


def test_text_documents_answer_their_descriptions(big_world):
    """Each text document's answer is right for the picture it describes."""
    for path in (big_world / "text.jsonl", big_world / "text_eval.jsonl"):
        for line in path.read_text().splitlines():
            doc = json.loads(line)["text"]
            desc, rest = doc.removeprefix("In the picture there is ").split(" Question: ")
            q, a = rest.split(" Answer: ")
            assert answer(parse_description(desc), q) == a.rstrip("."), doc


def test_image_placement(big_world, tmp_path):
    """The image goes after each question by default, before it or either on request; the scenes,
    questions and answers are the same whatever the placement."""

    def firsts(d, name):
        recs = json.loads((d / name).read_text())
        return [r["conversations"][0]["value"] for r in recs], [
            [question_of(t["value"]) for t in r["conversations"]] for r in recs]  # fmt: skip

    runs = {"after": big_world}
    for placement in ("before", "mixed"):
        runs[placement] = tmp_path / placement
        shapes.generate(
            runs[placement], num_train=300, num_eval=60, seed=3, num_text=100, image_placement=placement
        )
    for name in TRAINING_FILES:
        turns = {k: firsts(d, name) for k, d in runs.items()}
        assert turns["after"][1] == turns["before"][1] == turns["mixed"][1], name
        assert all(
            t.endswith("\n<image>") and t.count("<image>") == 1
            for t in turns["after"][0]
            if name != "captions.json"
        )
        assert all(t.startswith("<image>\n") and t.count("<image>") == 1 for t in turns["before"][0])
        mixed = turns["mixed"][0]
        if name == "eval.json":  # held-out questions: one placement, before unless asked for after
            assert mixed == turns["before"][0]
        elif name != "captions.json":
            after = sum(t.endswith("\n<image>") for t in mixed) / len(mixed)
            assert 0.35 < after < 0.65 and all(t.count("<image>") == 1 for t in mixed), (name, after)
    assert json.loads((runs["mixed"] / "meta.json").read_text())["image_placement"] == "mixed"
    # a grounding question is the same sample, its image where it was drawn, in both grounding files
    ground, with_relation = (
        {(r["id"].rsplit("-g", 1)[0], question_of(r["conversations"][0]["value"])): r["conversations"]
         for r in json.loads((runs["mixed"] / name).read_text())}
        for name in ("instruct_ground.json", "instruct_ground_relation.json")
    )  # fmt: skip
    assert ground.items() <= with_relation.items() and len(with_relation) > len(ground)
    with pytest.raises(ValueError, match="image_placement must be one of"):
        shapes.generate(tmp_path / "x", num_train=1, num_eval=1, image_placement="middle")


@pytest.mark.parametrize("placement", ["before", "after"])
def test_eval_prompt_is_the_training_prompt(tmp_path, placement):
    """The held-out prompt puts the image where the record does, token for token as training renders it."""
    import torch

    from modalign import MLLMConfig
    from modalign.data.conversation import get_template, render
    from modalign.infer.chat import user_message
    from modalign.shapesworld.evaluate import heldout_question

    world = tmp_path
    shapes.generate(world, num_train=2, num_eval=6, seed=3, num_text=10, image_placement=placement)
    cfg = MLLMConfig.from_name("tiny-shapes")
    cfg.llm.num_layers = cfg.vision.num_layers = 1
    tok = Tokenizer.train_bpe(
        [s.messages[0].content for s in load_samples(world / "eval.json")], vocab_size=300
    )
    tok.template_name = "chatml"
    cm = ChatModel(MLLM(cfg), tok)
    per = cm.model.num_image_tokens() if cfg.placeholder == "per_token" else 1
    recs = json.loads((world / "eval.json").read_text())
    assert all(r["conversations"][0]["value"].endswith("\n<image>") == (placement == "after") for r in recs)
    for rec, s in zip(recs, load_samples(world / "eval.json"), strict=True):
        ex = render(s, tok, get_template("chatml", tok), cfg.image_token_id, per, 2048)  # as SampleProcessor
        answer_start = next(i for i, label in enumerate(ex.labels) if label != -100)
        prompt = cm.prompt_ids([user_message(heldout_question(rec), 1)])  # as both ShapesWorld evaluations
        assert prompt == ex.input_ids[:answer_start], rec["id"]
        assert torch.tensor(prompt).eq(cfg.image_token_id).any()


def test_files_load_with_the_llava_loader(big_world):
    for name in [*TRAINING_FILES, "text_instruct.json"]:
        samples = load_samples(big_world / name)
        assert samples and all(not isinstance(s, ValueError) for s in samples), name
    assert len(load_samples(big_world / "text.jsonl")) == 100


def test_quickstart_regenerates_data_missing_a_curriculum_file(tmp_path):
    from modalign.shapesworld.quickstart import prepare_data

    data = tmp_path / "data"
    prepare_data(data, scale=0.02)
    ground = (data / "instruct_ground.json").read_bytes()
    (data / "instruct_ground.json").unlink()  # as written by a version before the grounding step
    assert prepare_data(data, scale=0.02)
    assert (data / "instruct_ground.json").read_bytes() == ground
    assert (data / "tokenizer" / "tokenizer.json").is_file()
    assert not prepare_data(data, scale=0.02)  # current: kept
    # a data set of an older version (another layout) is written anew, its tokenizer trained anew
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "version": shapes.DATA_VERSION - 1}))
    (data / "tokenizer" / "tokenizer.json").write_text("{}")
    assert prepare_data(data, scale=0.02)
    assert json.loads((data / "meta.json").read_text()) == meta
    assert (data / "instruct_ground.json").read_bytes() == ground
    assert json.loads((data / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]


def test_quickstart_end_to_end_in_miniature(tmp_path, capsys):
    """The README's main job on a tiny data set and a few steps per stage: every stage runs with the
    recipe's freezing, results.json carries the fields the issue names and agrees with the per-sample
    file, the model loads, text perplexity before is the stage-0 model's."""
    import torch

    from modalign.eval.perplexity import text_perplexity
    from modalign.shapesworld.evaluate import evaluate_text_qa
    from modalign.shapesworld.quickstart import quickstart

    sets = [f"stages.{s}.stop.max_steps=2" for s in ("align", "basic", "ground", "instruct")]
    sets += [f"stage0.stages.{s}.stop.max_steps=2" for s in ("lm", "clip", "chat")]
    (res,) = quickstart("llava", tmp_path, scale=0.02, sets=sets, progress=False)
    out = tmp_path / "llava"
    saved = json.loads((out / "results.json").read_text())
    need = {"method", "heldout_accuracy", "unseen_pairs_accuracy", "accuracy_by_type", "text_ppl_before",
            "text_ppl_after", "text_qa_before", "text_qa_after", "trainable_params", "wall_seconds",
            "accuracy_by_type_seen_unseen"}  # fmt: skip
    assert need <= set(saved) and saved["method"] == "llava"
    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == saved["questions"] == len(json.loads((tmp_path / "data" / "eval.json").read_text()))
    assert saved["heldout_accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    unseen = [r["correct"] for r in rows if r["unseen"]]
    assert saved["unseen_pairs_accuracy"] == sum(unseen) / len(unseen)
    for t, acc in saved["accuracy_by_type"].items():
        sub = [r["correct"] for r in rows if r["type"] == t]
        assert acc == sum(sub) / len(sub)
    model = MLLM.from_pretrained(out / "model", dtype=torch.float32)
    connector = sum(p.numel() for p in model.connector.parameters())
    assert saved["trainable_params"]["align"] == connector
    assert saved["trainable_params"]["instruct"] == connector + sum(p.numel() for p in model.llm.parameters())
    tok = Tokenizer.from_dir(out / "model")
    before = MLLM.from_pretrained(tmp_path / "stage0" / "model", dtype=torch.float32)
    assert saved["text_ppl_before"] == text_perplexity(before, tok, tmp_path / "data" / "text_eval.jsonl")
    qa = evaluate_text_qa(before, tok, tmp_path / "data" / "text_qa_eval.json", "chatml")
    assert saved["text_qa_before"] == qa["accuracy"] and qa["questions"] == 50
    assert (tmp_path / "stage0" / "chat" / "result.json").is_file()  # stage 0 ends chat-tuned
    assert (out / "accuracy_by_type.png").stat().st_size > 0 and (out / "instruct" / "loss.png").is_file()
    printed = capsys.readouterr().out
    assert "| llava" in printed and res["heldout_accuracy"] == saved["heldout_accuracy"]
    # two steps cannot meet the curriculum stages' stop rules: the results and the table say so
    stages = saved["stages"]
    assert list(stages) == ["align", "basic", "ground", "instruct"]
    assert [stages[s]["converged"] for s in stages] == [None, False, False, None]
    assert stages["basic"]["steps"] == 2 and stages["basic"]["stop_at_loss"] == 0.05
    basic = [
        json.loads(x) for x in (out / "basic" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert stages["basic"]["final_loss"] == basic[-1]["loss"]
    notes = [line for line in printed.splitlines() if line.startswith("note: llava's")]
    assert [n.split("'s ")[1].split(" ")[0] for n in notes] == ["basic", "ground"]
    assert "ran to its cap (2 steps" in notes[0] and "stop.at_loss 0.05" in notes[0]


# ------------------------------------------------------------------------------ evaluation


def test_shapes_task_equals_quickstart_evaluation(world, tiny_model, tmp_path):
    d = tmp_path
    (d / "model").symlink_to(tiny_model)
    (d / "sw").symlink_to(world)
    cm = ChatModel.load(d / "model")
    res = evaluate(
        cm, "shapes", d / "sw" / "eval.json", None, d / "out", batch_size=8, max_new_tokens=8, progress=False
    )
    ref = evaluate_shapes(MLLM.from_pretrained(d / "model"), Tokenizer.from_dir(d / "model"), d / "sw" / "eval.json",
                          progress=False)  # fmt: skip
    assert res["accuracy"] == ref["accuracy"] and res["samples"] == ref["questions"]
    assert res["accuracy_by_category"] == ref["accuracy_by_type"]
    assert res["unseen_pairs_accuracy"] == ref["unseen_pairs_accuracy"]
    assert res["accuracy_by_category_seen_unseen"] == ref["accuracy_by_type_seen_unseen"]
    assert res["position_parts"] == ref["position_parts"]
    for f in ("samples.jsonl", "results.json", "report.md", "accuracy_by_category.png"):
        assert (d / "out" / f).is_file()
    line = json.loads((d / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert {"prompt", "raw", "answer", "score"} <= set(line)
    assert len(res["data_sha256"]) == 64 and res["prompt_version"] == "shapes-v1"


def test_position_parts_splits_row_and_column():
    from modalign.shapesworld.evaluate import position_parts

    rows = [("top", "top right"), ("left", "center"), ("bottom left", "top left"), ("right", "right"),
            ("center", "a circle"), ("bottom", "bottom")]  # fmt: skip
    samples = [{"type": "position", "answer": a, "prediction": p} for a, p in rows]
    samples.append({"type": "colour", "answer": "red", "prediction": "top"})  # not a position question
    parts = position_parts(samples)
    assert parts == {"row_accuracy": 4 / 6, "column_accuracy": 3 / 6, "questions": 6}
    assert position_parts(samples[-1:]) is None


def test_seen_unseen_split_adds_up_to_each_type(world, tiny_model):
    ref = evaluate_shapes(MLLM.from_pretrained(tiny_model), Tokenizer.from_dir(tiny_model), world / "eval.json",
                          progress=False)  # fmt: skip
    for t, parts in ref["accuracy_by_type_seen_unseen"].items():
        rows = [s for s in ref["samples"] if s["type"] == t]
        for k, acc in parts.items():
            sub = [s["correct"] for s in rows if s["unseen"] == (k == "unseen")]
            assert acc == sum(sub) / len(sub)
        assert set(parts) == {("unseen" if s["unseen"] else "seen") for s in rows}


def _recipe_stages(path) -> dict:
    """A recipe file's stages by name."""
    import yaml

    return {s["name"]: s for s in yaml.safe_load(path.read_text())["stages"]}


def test_every_method_recipe_shares_the_stage2_curriculum_and_budget():
    """The comparison is fair only if every method's recipe runs the same stage 2: the same data,
    objective, batch sizes and stop rules (step caps and stop losses) in basic, ground and
    instruct. The values are written out in each recipe file, so a change to one must reach all.
    The one choice: `ground` reads the grounding file with or without relation questions (in the
    same share; which each uses: docs/shapesworld.md)."""

    from modalign.shapesworld import RECIPES
    from modalign.shapesworld.quickstart import METHODS

    grounding = {"${data}/instruct_ground.json", "${data}/instruct_ground_relation.json"}

    def stage2(path):
        stages = _recipe_stages(path)
        found = {
            n: {"stop": stages[n]["stop"], "objective": stages[n].get("objective"),
                **{k: stages[n]["data"][k] for k in ("sources", "batch_size", "max_length")}}
            for n in ("basic", "ground", "instruct")
        }  # fmt: skip
        first = found["ground"]["sources"][0]
        assert first["path"] in grounding, path
        found["ground"]["sources"][0] = {**first, "path": "grounding"}
        return found, first["path"]

    found = {m: stage2(RECIPES / f"{name}.yaml") for m, name in METHODS.items()}  # every method
    assert len(found) == 8
    for m in found:
        assert found[m][0] == found["llava"][0], m
    assert {path for _, path in found.values()} == grounding  # both files are in use


def test_seed_methods_share_the_ground_and_instruct_lr_schedules():
    """The four seed methods decay `ground`'s and `instruct`'s LR over their caps alike (their rates
    are their own); `basic` either holds its LR after the same warmup or decays it as `ground` does
    (which each uses: docs/shapesworld.md)."""

    from modalign.shapesworld import RECIPES
    from modalign.shapesworld.quickstart import GROUPS, METHODS

    def schedules(name):
        stages = _recipe_stages(RECIPES / f"{name}.yaml")
        return {n: stages[n]["optim"]["schedule"] for n in ("basic", "ground", "instruct")}

    found = {m: schedules(METHODS[m]) for m in GROUPS["seed"]}
    assert len(found) == 4
    for m, sched in found.items():
        assert (
            sched["ground"] == found["llava"]["ground"] and sched["instruct"] == found["llava"]["instruct"]
        ), m
        assert sched["basic"] in ({"warmup": 0.05, "decay": "constant"}, sched["ground"]), m


def test_lr_factor_holds_after_warmup_with_constant_decay_and_cosine_reaches_its_floor():
    """`decay: constant` (the held `basic` LR) ramps over the warmup, then stays at the peak to the
    cap; `cosine` falls from the peak to `min_lr_ratio` at the cap."""
    from modalign.train.trainer import lr_factor

    total, warmup = 500, 0.05  # 25 warmup steps
    held = [lr_factor(s, total, warmup, "constant", 0.05) for s in range(total)]
    assert held[:25] == [(s + 1) / 25 for s in range(25)]
    assert held[25:] == [1.0] * (total - 25)
    cos = [lr_factor(s, total, warmup, "cosine", 0.05) for s in range(total + 1)]
    assert cos[:25] == held[:25] and cos[25] == 1.0
    assert all(a > b for a, b in zip(cos[25:total], cos[26 : total + 1], strict=True))
    assert abs(cos[total] - 0.05) < 1e-12

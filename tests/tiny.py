"""Tiny recipes for tests: the model shapes and a two-stage recipe on a ShapesWorld folder."""

from __future__ import annotations

# ------------------------------------------------------------------------------ recipes

TINY = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2},
    "llm": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
}


def recipe_doc(data, strategy="none", steps=6, save_every=2) -> dict:
    """A two-stage recipe on a ShapesWorld folder: ``align`` (the connector on captions), then
    ``instruct`` (connector + LLM on an 80/20 mixture of instructions and text chats, dropout 0.1)."""

    def stage(name, sources, template, trainable, dropout=0.0):
        return {"name": name, "trainable": trainable,
                "data": {"sources": sources, "template": template, "batch_size": 8, "max_length": 96},
                "optim": {"lr": 1e-2, "schedule": {"warmup": 2, "decay": "cosine"}, "dropout": dropout},
                "stop": {"max_steps": steps}, "checkpoints": {"every": save_every, "keep_last": 2}}  # fmt: skip

    return {
        "name": "tiny-test",
        "seed": 1,
        "parallel": {"strategy": strategy},
        "model": {"preset": "tiny-shapes", "overrides": TINY, "tokenizer": str(data / "tokenizer")},
        "stages": [
            stage("align", [{"path": str(data / "captions.json")}], "plain", ["connector.*"]),
            stage("instruct", [{"path": str(data / "instruct.json"), "weight": 0.8},
                               {"path": str(data / "text_instruct.json"), "weight": 0.2}],
                  "chatml", ["connector.*", "llm.*"], dropout=0.1),
        ],
    }  # fmt: skip


def labelled_runs(ids, labels):
    """Contiguous runs of trained ids (each label equal to its id)."""
    from modalign.data.conversation import IGNORE_INDEX

    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def tiny_quickstart(out) -> None:
    """``modalign quickstart`` (LLaVA) on 2% of ShapesWorld, stage 0 two steps a stage and the
    method one step a stage: the parts later method or pipeline runs start from."""
    from modalign.shapesworld.quickstart import quickstart

    sets = [f"stage0.stages.{s}.stop.max_steps=2" for s in ("lm", "clip", "chat")]
    sets += [f"stages.{s}.stop.max_steps=1" for s in ("align", "basic", "ground", "instruct")]
    quickstart("llava", out, scale=0.02, sets=sets, progress=False)


def tiny_method(method: str, out, stages) -> dict:
    """One quickstart method (``run_method``) two steps a stage, on the parts ``tiny_quickstart``
    left in ``out``; returns its results."""
    from modalign.shapesworld.quickstart import run_method

    v = {"data": str(out / "data"), "stage0": str(out / "stage0"), "out": str(out)}
    return run_method(method, out, v, [f"stages.{s}.stop.max_steps=2" for s in stages], progress=False)

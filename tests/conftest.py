"""Shared fixtures: one small ShapesWorld data set with its tokenizer, and a tiny model trained on
it for a few steps with the real recipe machinery (evaluation, serving and chat tests use it)."""

from __future__ import annotations

import pytest

from tests.tiny import recipe_doc


def pytest_configure(config):
    """The decode forms timed in the tests are kept in a file of their own, not the user's cache
    (set before test modules are imported, so environments copied from it have it too)."""
    import os
    import tempfile

    config._forms_dir = tempfile.TemporaryDirectory(prefix="modalign-forms-")
    config._forms_env = os.environ.get("MODALIGN_DECODE_FORMS")
    os.environ["MODALIGN_DECODE_FORMS"] = os.path.join(config._forms_dir.name, "decode_forms.json")


def pytest_unconfigure(config):
    import os

    if getattr(config, "_forms_dir", None) is None:
        return
    if config._forms_env is None:
        os.environ.pop("MODALIGN_DECODE_FORMS", None)
    else:
        os.environ["MODALIGN_DECODE_FORMS"] = config._forms_env
    config._forms_dir.cleanup()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """ShapesWorld: 48 training scenes, 6 held-out, 48 text documents, and a byte-level BPE."""
    from modalign.data.datasets import load_samples
    from modalign.data.tokenizer import Tokenizer
    from modalign.shapesworld import data as shapes

    d = tmp_path_factory.mktemp("world")
    shapes.generate(d, num_train=48, num_eval=6, seed=0, num_text=48)
    texts = [m.content for s in load_samples(d / "instruct.json") for m in s.messages]
    texts += [s.text for s in load_samples(d / "text.jsonl")]
    Tokenizer.train_bpe(texts, vocab_size=400).save(d / "tokenizer")
    return d


@pytest.fixture(scope="session")
def tiny_model(world, tmp_path_factory):
    """A model directory (weights + tokenizer) trained 3 steps per stage on ``world``."""
    from modalign.train.recipe import load_recipe
    from modalign.train.run import run_recipe

    d = tmp_path_factory.mktemp("tiny_model")
    run_recipe(load_recipe(recipe_doc(world, steps=3, save_every=0)), d / "run", progress=False)
    return d / "run" / "model"

"""The miniature: ShapesWorld, an embedded, seeded data set of simple scenes, and the quickstart
that trains every seed method on it on a laptop CPU.

    data.py        generate the data set (images, captions, instructions, held-out questions, text)
    evaluate.py    the held-out evaluation (per question type, unseen colour-shape pairs)
    benchmark.py   the same as ``modalign eval --task shapes``
    quickstart.py  data -> tokenizer -> stage 0 -> a method's recipe -> evaluation -> table and plots
    recipes/       the tiny recipes (stage 0 and one per method)

The core (models, checkpoints, data, train, infer, serve, eval) never imports this package.
"""

from pathlib import Path

RECIPES = Path(__file__).parent / "recipes"

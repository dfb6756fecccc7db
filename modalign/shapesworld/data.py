"""ShapesWorld: the embedded, seeded data set (images drawn with PIL, written as LLaVA JSON).

A scene is a 3x3 grid; 1-5 cells hold a shape (circle, square, triangle, star, hexagon) of a
colour and size; sometimes another cell holds a short word. From each scene come a caption
(stage-1 alignment), instruction data (colour, shape, count, position, relation, existence incl.
absent objects, reading, description; one question per sample by default, or a few as one
conversation), the stage-2 curriculum files and, for the held-out split,
single questions with their answers and types. Some colour-shape pairs never occur in the
training split and are the subject of the held-out "unseen pairs" questions.

    OUT/images/*.png
    OUT/captions.json      stage 1 (LLaVA JSON)      OUT/instruct.json    stage 2 (LLaVA JSON)
    OUT/instruct_basic.json  stage-2 curriculum: single colour / shape questions
    OUT/instruct_ground.json stage-2 curriculum: single position, count and read questions
    OUT/instruct_ground_relation.json  the same with each scene's relation question among them
    OUT/eval.json          held-out questions          OUT/text.jsonl       text corpus
    OUT/text_eval.jsonl    text for perplexity         OUT/text_instruct.json text-only chats
    OUT/text_qa_eval.json  held-out text-only questions (answered from a scene described in words)
    OUT/scenes.jsonl       annotations (captions + normalised boxes)    OUT/meta.json
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from modalign.data.conversation import IMAGE_PLACEHOLDER
from modalign.data.images import GRID_PLACES

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
WORDS = ("cat", "dog", "sun", "box", "car", "hat", "key", "pen")
POSITIONS = GRID_PLACES  # cell i of the 3x3 grid, row-major
NUMBERS = ("zero", "one", "two", "three", "four", "five")
UNSEEN_PAIRS = (("red", "star"), ("green", "hexagon"), ("blue", "triangle"), ("yellow", "square"),
                ("purple", "circle"))  # fmt: skip
QUESTION_TYPES = ("colour", "shape", "count", "position", "relation", "exist", "read")
# the first step of the stage-2 curriculum: questions that look up one object by one attribute
# and read another; the lookup they teach is what every other type (but count) builds on
BASIC_TYPES = ("colour", "shape")
# the second step: find an object by colour and shape and name its place (read out of its token);
# with it, the questions that look at the whole image (count, read), which the full mixture holds
# too few of for counting to form, and which in the first step keep the lookup from forming
GROUND_TYPES = ("position", "count", "read")
# the second step's other file: the same with the questions that find two objects and compare
# their places (relation). The miniature does not learn to answer them, but they keep the step's
# loss above its stop until its LR has decayed, so that it ends at about the same step on every
# seed and CPU (recipes choose the file; docs/shapesworld.md)
GROUND_RELATION_TYPES = GROUND_TYPES + ("relation",)
BACKGROUND = (240, 240, 240)
# every file generate() writes beside images/ (a data set missing one was written by an older version)
FILES = ("captions.json", "instruct.json", "instruct_basic.json", "instruct_ground.json",
         "instruct_ground_relation.json", "eval.json", "text_instruct.json", "text.jsonl", "text_eval.jsonl", "text_qa_eval.json", "scenes.jsonl", "meta.json")  # fmt: skip


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def row_col(self) -> tuple[int, int]:
        return divmod(self.cell, 3)


@dataclass
class Scene:
    objects: list[Obj]
    word: str | None = None
    word_cell: int | None = None

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "word": self.word, "word_cell": self.word_cell}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([Obj(**o) for o in d["objects"]], d.get("word"), d.get("word_cell"))


def random_scene(rng: random.Random, allow_unseen: bool, force_unseen: bool = False) -> Scene:
    n = rng.randint(1, 5)
    cells = rng.sample(range(9), n + 1)
    objs, used = [], set()
    for k in range(n):
        while True:
            if force_unseen and k == 0:
                colour, shape = rng.choice(UNSEEN_PAIRS)
            else:
                shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if (colour, shape) in used or (not allow_unseen and (colour, shape) in UNSEEN_PAIRS):
                continue
            break
        used.add((colour, shape))
        objs.append(Obj(shape, colour, rng.choice(SIZES), cells[k]))
    word = rng.choice(WORDS) if rng.random() < 0.3 else None
    return Scene(objs, word, cells[n] if word else None)


# ------------------------------------------------------------------------------ drawing


def _polygon(cx, cy, r, n, inner=None, rot=-math.pi / 2):
    pts = []
    for i in range(n * (2 if inner else 1)):
        rad = (inner if inner and i % 2 else 1.0) * r
        a = rot + i * math.pi / (n if inner else n / 2)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_scene(scene: Scene, size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene.objects:
        r_, c_ = o.row_col
        cx, cy = (c_ + 0.5) * cell, (r_ + 0.5) * cell
        r = cell * (0.42 if o.size == "large" else 0.24)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            d.polygon(_polygon(cx, cy + r * 0.15, r * 1.05, 3), fill=fill)
        elif o.shape == "star":
            d.polygon(_polygon(cx, cy, r * 1.1, 5, inner=0.45), fill=fill)
        elif o.shape == "hexagon":
            d.polygon(_polygon(cx, cy, r, 6, rot=0), fill=fill)
    if scene.word:
        r_, c_ = divmod(scene.word_cell, 3)
        font = ImageFont.load_default()
        box = d.textbbox((0, 0), scene.word, font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        d.text(((c_ + 0.5) * cell - tw / 2 - box[0], (r_ + 0.5) * cell - th / 2 - box[1]), scene.word,
               fill=(0, 0, 0), font=font)  # fmt: skip
    return img


def boxes(scene: Scene) -> list[dict]:
    """Objects as normalised [x1, y1, x2, y2] boxes with a category name (annotation export)."""
    out = []
    for o in scene.objects:
        r_, c_ = o.row_col
        half = (0.42 if o.size == "large" else 0.24) / 3
        cx, cy = (c_ + 0.5) / 3, (r_ + 0.5) / 3
        out.append({"category": f"{o.size} {o.colour} {o.shape}",
                    "bbox": [round(cx - half, 4), round(cy - half, 4), round(cx + half, 4), round(cy + half, 4)]})  # fmt: skip
    return out


# ------------------------------------------------------------------------------ language


def describe(scene: Scene) -> str:
    parts = [
        f"a {o.size} {o.colour} {o.shape} at the {POSITIONS[o.cell]}"
        for o in sorted(scene.objects, key=lambda o: o.cell)
    ]
    text = "; ".join(parts)
    if scene.word:
        text += f"; the word {scene.word} at the {POSITIONS[scene.word_cell]}"
    return text + "."


def caption(scene: Scene) -> str:
    return describe(scene)[0].upper() + describe(scene)[1:]


def _relation(a: Obj, b: Obj, rel: str) -> bool:
    (ra, ca), (rb, cb) = a.row_col, b.row_col
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def questions(scene: Scene, rng: random.Random, allow_unseen_absent: bool) -> list[dict]:
    """Every answerable question about ``scene``: {"type", "question", "answer", "objects"}."""
    objs = scene.objects
    qs = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    colour_counts = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    for o in objs:
        if shape_counts[o.shape] == 1:
            qs.append(
                {
                    "type": "colour",
                    "question": f"What colour is the {o.shape}?",
                    "answer": o.colour,
                    "objects": [o],
                }
            )
        if colour_counts[o.colour] == 1:
            qs.append({"type": "shape", "question": f"What shape is the {o.colour} object?", "answer": o.shape,
                       "objects": [o]})  # fmt: skip
        qs.append(
            {
                "type": "position",
                "question": f"Where is the {o.name}?",
                "answer": POSITIONS[o.cell],
                "objects": [o],
            }
        )
        qs.append({"type": "exist", "question": f"Is there a {o.name}?", "answer": "yes", "objects": [o]})
    qs.append(
        {
            "type": "count",
            "question": "How many shapes are there?",
            "answer": NUMBERS[len(objs)],
            "objects": [],
        }
    )
    if len(objs) >= 2:
        a, b = rng.sample(objs, 2)
        rel = rng.choice(("left of", "right of", "above", "below"))
        ans = "yes" if _relation(a, b, rel) else "no"
        qs.append({"type": "relation", "question": f"Is the {a.name} {rel} the {b.name}?", "answer": ans,
                   "objects": [a, b]})  # fmt: skip
    present = {(o.colour, o.shape) for o in objs}
    for _ in range(20):  # an absent object
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (c, s) not in present and (allow_unseen_absent or (c, s) not in UNSEEN_PAIRS):
            absent = Obj(s, c, "small", -1)
            qs.append(
                {"type": "exist", "question": f"Is there a {c} {s}?", "answer": "no", "objects": [absent]}
            )
            break
    if scene.word:
        qs.append(
            {
                "type": "read",
                "question": "What word is written in the image?",
                "answer": scene.word,
                "objects": [],
            }
        )
    return qs


IMAGE_PLACEMENTS = ("before", "after", "mixed")
# how instruct.json holds a scene's questions: each one its own sample, or a few as one conversation
LAYOUTS = ("single", "conversation")
# meta.json's "version": what the quickstart checks before it reuses a data set written earlier
# (5: training records carry their question's ``type``)
DATA_VERSION = 5


def _with_image(question: str, after: bool) -> str:
    """A first user turn: the image placeholder before the question, or after it."""
    return f"{question}\n{IMAGE_PLACEHOLDER}" if after else f"{IMAGE_PLACEHOLDER}\n{question}"


def _one_turn(
    sid: str, image: str, question: str, answer: str, after: bool, qtype: str | None = None
) -> dict:
    """A one-question LLaVA-format record, the image placeholder before or after the question;
    ``qtype`` (the question's type) goes in its ``type`` field, which recipes may balance by."""
    rec = {"id": sid, "image": image, "conversations": [
        {"from": "human", "value": _with_image(question, after)}, {"from": "gpt", "value": answer}]}  # fmt: skip
    return rec if qtype is None else {**rec, "type": qtype}


def _shorten(q: dict, scene: Scene, rng: random.Random, share: float) -> dict:
    """A position question asked by the one attribute that singles its object out in ``scene``
    (its shape or its colour, drawn where both do), with probability ``share``; the question as
    it was otherwise. ``rng`` is drawn only where a shorter reference exists and ``share`` > 0."""
    if q["type"] != "position" or share <= 0:
        return q
    (o,) = q["objects"]
    short = [f"Where is the {o.shape}?"] if sum(x.shape == o.shape for x in scene.objects) == 1 else []
    if sum(x.colour == o.colour for x in scene.objects) == 1:
        short.append(f"Where is the {o.colour} object?")
    if not short or rng.random() >= share:
        return q
    return {**q, "question": short[rng.randrange(len(short))]}


def _is_unseen(q: dict) -> bool:
    return any((o.colour, o.shape) in UNSEEN_PAIRS for o in q["objects"])


# ------------------------------------------------------------------------------ writing


def generate(
    out: str | Path,
    num_train: int = 4000,
    num_eval: int = 400,
    seed: int = 0,
    image_size: int = 96,
    turns: int = 4,
    num_text: int = 4000,
    image_placement: str = "after",
    layout: str = "single",
    short_references: float = 0.0,
) -> dict:
    """Write the data set to ``out``; returns the meta record (counts, files, unseen pairs).

    ``image_placement`` puts the image placeholder of each training question ``after`` the question
    (the default: the visual tokens then attend to what is asked) or ``before`` it, or draws one of
    the two per sample (``mixed``, as LLaVA-1.5's instruction data does); held-out questions put it
    after the question when it is ``after``, else before.

    ``layout`` is how ``instruct.json`` holds each training scene's questions: ``single`` (the
    default) makes every question its own sample, so each has the image where ``image_placement``
    says, and the types come in the held-out split's proportions; ``conversation`` asks ``turns``
    of them, drawn at random, in one multi-turn conversation (the image in the first turn only).
    Either way a quarter of the scenes are also described in full. The scenes do not depend on the
    layout or the placement.

    ``short_references`` is the share of training position questions that name their object by
    the one attribute that singles it out in its scene, where one does ("Where is the star?",
    "Where is the red object?"; held-out questions always name colour and shape). 0, the default,
    asks every one by both (measured at 0.5: docs/experiments.md, "Question mix").
    """
    if not 0.0 <= short_references <= 1.0:
        raise ValueError(f"short_references must be a share in [0, 1], got {short_references}")
    if image_placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"image_placement must be one of {IMAGE_PLACEMENTS}, got {image_placement!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out)
    prng = random.Random(seed + 5)

    def after(gen: random.Random = prng) -> bool:
        return image_placement == "after" or (image_placement == "mixed" and gen.random() < 0.5)

    rel_prng = random.Random(seed + 6)  # the relation questions' placements: the other files' draws as in v3
    ref_prng = random.Random(seed + 9)  # which position questions are asked by one attribute

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, instruct, basic, ground, ground_relation, scenes_out = [], [], [], [], [], []
    for i in range(num_train):
        scene = random_scene(rng, allow_unseen=False)
        name = f"images/train_{i:05d}.png"
        draw_scene(scene, image_size).save(out / name, optimize=False, compress_level=1)
        sid = f"train-{i:05d}"
        captions.append(
            _one_turn(f"{sid}-cap", name, "Describe the image briefly.", caption(scene), after=False)
        )
        qs = [
            _shorten(q, scene, ref_prng, short_references)
            for q in questions(scene, rng, allow_unseen_absent=False)
        ]
        for k, q in enumerate(q for q in qs if q["type"] in BASIC_TYPES):
            basic.append(_one_turn(f"{sid}-b{k}", name, q["question"], q["answer"], after(), q["type"]))
        # each grounding question is one sample in both grounding files (its own id in each)
        placed = {j: after() for j, q in enumerate(qs) if q["type"] in GROUND_TYPES}
        for dest, types in ((ground, GROUND_TYPES), (ground_relation, GROUND_RELATION_TYPES)):
            for k, j in enumerate(j for j, q in enumerate(qs) if q["type"] in types):
                at = placed[j] if j in placed else after(rel_prng)
                dest.append(
                    _one_turn(f"{sid}-g{k}", name, qs[j]["question"], qs[j]["answer"], at, qs[j]["type"])
                )
        pool = list(qs)
        rng.shuffle(qs)  # drawn in both layouts, so that the scenes do not depend on the layout
        describe_it = rng.random() < 0.25
        if layout == "single":
            for k, q in enumerate(pool):
                instruct.append(
                    _one_turn(f"{sid}-q{k}", name, q["question"], q["answer"], after(), q["type"])
                )
            if describe_it:
                instruct.append(
                    _one_turn(f"{sid}-d", name, "Describe the image.", describe(scene), after(), "describe")
                )
        else:
            conv = []
            for k, q in enumerate(qs[:turns]):
                conv.append(
                    {
                        "from": "human",
                        "value": _with_image(q["question"], after()) if k == 0 else q["question"],
                    }
                )
                conv.append({"from": "gpt", "value": q["answer"]})
            if describe_it:
                conv += [
                    {"from": "human", "value": "Describe the image."},
                    {"from": "gpt", "value": describe(scene)},
                ]
            instruct.append({"id": sid, "image": name, "type": "conversation", "conversations": conv})
        scenes_out.append({"id": sid, "image": name, "scene": scene.to_dict(), "captions": [caption(scene)],
                           "objects": boxes(scene)})  # fmt: skip
    erng = random.Random(seed + 1_000_003)
    evals = []
    for i in range(num_eval):
        scene = random_scene(erng, allow_unseen=True, force_unseen=i % 2 == 0)
        name = f"images/eval_{i:05d}.png"
        draw_scene(scene, image_size).save(out / name, optimize=False, compress_level=1)
        for k, q in enumerate(questions(scene, erng, allow_unseen_absent=True)):
            evals.append({"id": f"eval-{i:05d}-{k}", "image": name, "type": q["type"], "answer": q["answer"],
                          "unseen": _is_unseen(q), "scene": scene.to_dict(),
                          "conversations": [{"from": "human", "value": _with_image(q["question"], image_placement == "after")},
                                            {"from": "gpt", "value": q["answer"]}]})  # fmt: skip
    text, text_chat = text_corpus(random.Random(seed + 7), num_text)
    text_eval, text_qa_eval = text_corpus(random.Random(seed + 8), max(num_text // 10, 50))
    _write_json(out / "captions.json", captions)
    _write_json(out / "instruct.json", instruct)
    random.Random(seed + 3).shuffle(basic)
    _write_json(out / "instruct_basic.json", basic)
    random.Random(seed + 4).shuffle(ground)
    _write_json(out / "instruct_ground.json", ground)
    random.Random(seed + 4).shuffle(ground_relation)
    _write_json(out / "instruct_ground_relation.json", ground_relation)
    _write_json(out / "eval.json", evals)
    _write_json(out / "text_instruct.json", text_chat)
    _write_json(out / "text_qa_eval.json", text_qa_eval)
    _write_jsonl(out / "text.jsonl", [{"id": f"text-{i}", "text": t} for i, t in enumerate(text)])
    _write_jsonl(
        out / "text_eval.jsonl", [{"id": f"text-eval-{i}", "text": t} for i, t in enumerate(text_eval)]
    )
    _write_jsonl(out / "scenes.jsonl", scenes_out)
    meta = {"version": DATA_VERSION, "seed": seed, "image_size": image_size, "train_images": num_train, "eval_images": num_eval,
            "captions": len(captions), "instruct": len(instruct), "instruct_basic": len(basic),
            "instruct_ground": len(ground), "instruct_ground_relation": len(ground_relation), "eval_questions": len(evals),
            "text": len(text), "image_placement": image_placement, "layout": layout, "short_references": short_references, "unseen_pairs": [list(p) for p in UNSEEN_PAIRS]}  # fmt: skip
    _write_json(out / "meta.json", meta)
    return meta


def text_corpus(rng: random.Random, n: int) -> tuple[list[str], list[dict]]:
    """Scene descriptions in words and text-only question answering (no image): language
    pretraining for the tiny LM, and the text-only instruction share of stage 2."""
    docs, chats = [], []
    for i in range(n):
        scene = random_scene(rng, allow_unseen=False)
        qs = questions(scene, rng, allow_unseen_absent=False)
        q = rng.choice([q for q in qs if q["type"] != "read"] or qs)
        desc = describe(scene)
        docs.append(f"In the picture there is {desc} Question: {q['question']} Answer: {q['answer']}.")
        chats.append({"id": f"textchat-{i}", "conversations": [
            {"from": "human", "value": f"A picture shows {desc} {q['question']}"},
            {"from": "gpt", "value": q["answer"]}]})  # fmt: skip
    return docs, chats


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    tmp.replace(path)


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    tmp.replace(path)

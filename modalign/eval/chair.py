"""CHAIR (Caption Hallucination Assessment with Image Relevance; Rohrbach et al., 2018): how
many of the objects a caption mentions are not in the image.

- every mention of one of the 80 COCO object categories (through a synonym table) is an object
  word; the ground truth of an image is the union of its annotated categories and the objects
  its reference captions mention (as the paper does);
- CHAIR-i = hallucinated object mentions / all object mentions (over the corpus),
  CHAIR-s = captions with at least one hallucinated object / captions,
  recall = ground-truth objects a caption mentions / ground-truth objects.

The paper's rules for COCO are kept: two-word names are one object ("hot dog", "teddy bear",
"stop sign"), an animal after "baby" / "adult" is the animal and not a person, a "passenger
jet / train" is the vehicle, and "seat" in a caption that mentions a toilet is the toilet's.
Words are lower-cased and nouns reduced to the singular by rule (the paper's code uses a
lemmatizer; modalign downloads no language data). The built-in synonym table is modalign's
own; ``load_synonyms`` reads the paper's ``synonyms.txt`` format (one category per line, its
name first, synonyms after, comma-separated) for figures comparable with published ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# category -> its synonyms (written for modalign; the category's own name is always included)
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "teenager", "adult",
               "guy", "lady", "gentleman", "player", "skier", "surfer", "skateboarder", "snowboarder", "skater",
               "rider", "biker", "cyclist", "driver", "passenger", "pedestrian", "chef", "cook", "worker",
               "officer", "policeman", "soldier", "student", "tourist", "spectator", "batter", "pitcher",
               "catcher", "umpire", "customer", "vendor", "farmer", "bride", "groom", "mother", "father"),
    "bicycle": ("bike", "unicycle", "tricycle"),
    "car": ("automobile", "van", "minivan", "sedan", "suv", "taxi", "cab", "jeep", "limousine", "limo"),
    "motorcycle": ("motorbike", "motor bike", "scooter", "moped", "motor cycle"),
    "airplane": ("plane", "aeroplane", "jet", "jetliner", "airliner", "aircraft", "air plane"),
    "bus": ("minibus", "trolley"),
    "train": ("locomotive", "tram", "streetcar"),
    "truck": ("lorry", "pickup", "firetruck"),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht", "ferry", "rowboat", "speedboat", "tugboat"),
    "traffic light": ("stoplight", "stop light", "traffic signal", "street light", "streetlight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "owl", "crow", "sparrow", "eagle",
             "hawk", "pelican", "flamingo", "rooster", "chicken", "hen", "turkey", "peacock"),
    "cat": ("kitten", "kitty", "feline"),
    "dog": ("puppy", "pup", "canine", "terrier", "poodle", "retriever", "labrador", "bulldog", "hound", "husky"),
    "horse": ("pony", "foal", "stallion", "mare", "colt"),
    "sheep": ("lamb", "ram", "ewe", "goat"),
    "cow": ("cattle", "calf", "bull", "ox", "heifer", "buffalo", "bison"),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack", "rucksack"),
    "umbrella": ("parasol",),
    "handbag": ("purse", "wallet", "briefcase"),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("luggage", "suit case"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball", "football", "soccer ball", "basketball", "baseball", "volleyball"),
    "kite": (),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt"),
    "skateboard": (),
    "surfboard": ("longboard", "wakeboard"),
    "tennis racket": ("racket", "racquet"),
    "bottle": (),
    "wine glass": (),
    "cup": ("mug",),
    "fork": (),
    "knife": (),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "hamburger", "cheeseburger", "sub"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cupcake", "cheesecake"),
    "chair": ("seat", "stool", "armchair"),
    "couch": ("sofa", "loveseat"),
    "potted plant": ("houseplant", "plant pot"),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal",),
    "tv": ("television", "monitor", "tv screen"),
    "laptop": ("computer", "notebook", "macbook", "laptop computer"),
    "mouse": (),
    "remote": ("remote control", "controller"),
    "keyboard": (),
    "cell phone": ("phone", "cellphone", "smartphone", "mobile phone", "telephone"),
    "microwave": (),
    "oven": ("stove",),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddy", "teddybear"),
    "hair drier": ("hair dryer", "hairdryer"),
    "toothbrush": (),
}  # fmt: skip

_ANIMALS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)

_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "people", "mice": "mouse",
              "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox", "knives": "knife",
              "wives": "wife", "leaves": "leaf", "shelves": "shelf", "calves": "calf", "halves": "half",
              "wolves": "wolf", "loaves": "loaf", "scissors": "scissors", "skis": "skis", "sheep": "sheep",
              "cattle": "cattle", "glasses": "glass", "buses": "bus", "shoes": "shoe", "toes": "toe",
              "canoes": "canoe", "species": "species", "series": "series", "ponies": "pony"}  # fmt: skip


def singular(word: str) -> str:
    """The singular of an English noun by rule (non-nouns pass through unchanged or harmlessly)."""
    w = word
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3 or w.endswith(("ss", "us", "is", "ous")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


@dataclass
class Synonyms:
    """word or two-word phrase -> COCO category."""

    to_category: dict[str, str]
    phrases: dict[str, str] = field(default_factory=dict)  # 2-3 words -> the word they stand for

    @classmethod
    def from_table(cls, table: dict[str, Iterable[str]]) -> Synonyms:
        to_cat: dict[str, str] = {}
        for cat, syns in table.items():
            for s in (cat, *syns):
                to_cat[" ".join(singular(w) for w in s.lower().split())] = cat
        phrases = {p: p for p in to_cat if " " in p}
        if any(p.count(" ") > 2 for p in phrases):
            raise ValueError(f"synonyms of more than three words: {[p for p in phrases if p.count(' ') > 2]}")
        for a in _ANIMALS:  # "baby bird" is a bird, not a person
            phrases[f"baby {a}"] = phrases[f"adult {a}"] = a
        for v in ("jet", "train"):  # "passenger jet" is a jet, not a person
            phrases[f"passenger {v}"] = v
        phrases["bow tie"] = "tie" if "tie" in to_cat else "bow tie"
        phrases["toilet seat"] = "toilet"
        return cls(to_cat, phrases)


def load_synonyms(path: str | Path) -> Synonyms:
    """The paper's ``synonyms.txt`` format: ``category, synonym, synonym, ...`` per line."""
    table: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        names = [s.strip() for s in line.split(",") if s.strip()]
        if not names:
            continue
        if names[0] in table:
            raise ValueError(f"{path}:{n}: category {names[0]!r} is listed twice")
        table[names[0]] = names[1:]
    if not table:
        raise ValueError(f"{path}: no categories")
    return Synonyms.from_table(table)


DEFAULT = Synonyms.from_table(COCO_SYNONYMS)


def caption_objects(caption: str, syn: Synonyms = DEFAULT) -> list[tuple[str, str]]:
    """(word as written after normalisation, category) for every object mention, in order."""
    words = [singular(w) for w in re.findall(r"[a-z]+", caption.lower())]
    merged: list[str] = []
    i = 0
    while i < len(words):
        n = next((n for n in (3, 2) if i + n <= len(words) and " ".join(words[i : i + n]) in syn.phrases), 1)
        merged.append(syn.phrases[" ".join(words[i : i + n])] if n > 1 else words[i])
        i += n
    if "toilet" in merged:  # "the seat of the toilet" is not a chair
        merged = [w for w in merged if w != "seat"]
    return [(w, syn.to_category[w]) for w in merged if w in syn.to_category]


def ground_truth(
    objects: Iterable[str] = (), references: Iterable[str] = (), syn: Synonyms = DEFAULT
) -> set[str]:
    """An image's objects: its annotated categories (names or synonyms) and the objects its
    reference captions mention."""
    gt = set()
    for o in objects:
        key = " ".join(singular(w) for w in o.lower().split())
        if key not in syn.to_category:
            raise ValueError(f"object {o!r} is not a category or synonym in the CHAIR table")
        gt.add(syn.to_category[key])
    for r in references:
        gt.update(c for _, c in caption_objects(r, syn))
    return gt


def caption_chair(caption: str, truth: set[str], syn: Synonyms = DEFAULT) -> dict:
    """One caption: the categories it mentions (every mention), the hallucinated ones among
    them, and the true objects it found."""
    cats = [c for _, c in caption_objects(caption, syn)]
    return {"mentioned": cats, "hallucinated": [c for c in cats if c not in truth],
            "found": sorted({c for c in cats if c in truth}), "truth": sorted(truth)}  # fmt: skip


def chair_totals(per_caption: list[dict]) -> dict:
    """CHAIR-s, CHAIR-i and object recall from :func:`caption_chair` results."""
    mentions = sum(len(p["mentioned"]) for p in per_caption)
    wrong = sum(len(p["hallucinated"]) for p in per_caption)
    truths = sum(len(p["truth"]) for p in per_caption)
    n = len(per_caption)
    return {"chair_s": sum(bool(p["hallucinated"]) for p in per_caption) / n if n else None,
            "chair_i": wrong / mentions if mentions else None,
            "chair_recall": sum(len(p["found"]) for p in per_caption) / truths if truths else None,
            "object_mentions": mentions}  # fmt: skip


def chair(captions: list[str], truths: list[set[str]], syn: Synonyms = DEFAULT) -> dict:
    """CHAIR of ``captions`` given each image's true objects (``ground_truth``)."""
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions but {len(truths)} ground-truth object sets")
    return chair_totals([caption_chair(c, t, syn) for c, t in zip(captions, truths, strict=True)])

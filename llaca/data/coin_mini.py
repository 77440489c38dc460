"""CoIN-mini: a procedural, seeded stand-in for the CoIN continual instruction benchmark.

CoIN (ScienceQA, TextVQA, ImageNet, GQA, VizWiz, RefCOCO grounding, VQAv2, OCR-VQA)
measures how a multimodal model forgets earlier tasks while it is tuned on later
ones.  Real CoIN is far too large for a tiny 64x64 LLaVA, so every task here is a
tiny synthetic analogue that keeps the two things forgetting is measured on:
a distinct *image kind* and a distinct *answer format* per task.

Everything is driven by explicitly passed ``random.Random`` instances, so the same
seed gives byte-identical JSON and PNGs.  Each task first builds a ``Scene`` (pure
data) and only then renders it; the vision pre-training labels (``aux_labels``)
are read from the same scenes, so a vision tower trained on them sees every
image kind the benchmark uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------- vocabulary

IMAGE_SIZE = 64
QUAD = IMAGE_SIZE // 2  # quadrants are 32x32 px

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) in pixels, x2/y2 exclusive

# Far apart in RGB so exact-colour answers are learnable at 64 px.
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 225, 40),
    "purple": (150, 60, 190),
    "orange": (240, 120, 20),
}
SHAPES = ["circle", "square", "triangle", "cross"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
WORDS = ["cat", "dog", "sun", "car", "box", "cup", "map", "hat", "pen", "bus", "egg", "owl"]
LETTERS = ["A", "B", "C", "D"]
UNANSWERABLE = "unanswerable"

WHITE: RGB = (255, 255, 255)
LIGHT_GREY: RGB = (205, 205, 205)

# --------------------------------------------------------------------------- prompt wording
# Kept verbatim from the LLaVA / CoIN instruction templates where one exists.

SHORT_ANSWER = "Answer the question using a single word or phrase."
SCIQA_Q = ("What shape is in the image?\n{options}\n"
           "Answer with the option's letter from the given choices directly.")
TEXTVQA_Q = "What word is written in the image?\n" + SHORT_ANSWER
IMAGENET_Q = "What is the object in the image?\n" + SHORT_ANSWER
GQA_Q = "Where is the {colour} {shape}?\nAnswer with the region name."
VIZWIZ_Q = ("What color is the object?\n"
            "When the provided information is insufficient, respond with 'Unanswerable'.\n"
            + SHORT_ANSWER)
GROUNDING_Q = ("Please provide the bounding box coordinate of the region this sentence "
               "describes: {colour} {shape}.")
VQAV2_Q = "How many objects are in the image?\n" + SHORT_ANSWER
OCRVQA_Q = "What is the title of this book?"
CAPTION_Q = "Describe the image briefly."
COLOUR_QA_Q = "What color is the {shape}?"
SHAPE_QA_Q = "What shape is this?"

# --------------------------------------------------------------------------- scene model


@dataclass(frozen=True)
class Obj:
    """One coloured shape; quadrant is None for a single, roughly centred object."""
    shape: str
    colour: str
    quadrant: str | None
    box: Box


@dataclass
class Scene:
    """Everything needed to render an image, and to label it for vision pre-training."""
    kind: str                      # image kind, see SCENE_SAMPLERS
    background: RGB
    objects: list[Obj] = field(default_factory=list)
    word: str | None = None
    noise_seed: int | None = None  # textured / noise backgrounds
    noise_amp: int = 0             # +- per-channel amplitude of that noise
    text_xy: tuple[int, int] = (QUAD, QUAD)  # centre of the word
    text_size: int = 20
    text_colour: RGB = (20, 20, 20)
    cover: Box | None = None       # book cover rectangle
    cover_colour: RGB = WHITE
    border: int = 0                # dark border width around the cover


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _background(scene: Scene) -> Image.Image:
    if scene.noise_seed is None or scene.noise_amp == 0:
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    gen = np.random.default_rng(scene.noise_seed)
    noise = gen.integers(-scene.noise_amp, scene.noise_amp + 1, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.array(scene.background, dtype=np.int64) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: RGB) -> None:
    """Draw without anti-aliasing so every object pixel has exactly its palette colour."""
    x1, y1, x2, y2 = box
    r, b = x2 - 1, y2 - 1  # PIL coordinates are inclusive
    if shape == "circle":
        draw.ellipse([x1, y1, r, b], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, r, b], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x1 + (x2 - x1 - 1) // 2, y1), (x1, b), (r, b)], fill=fill)
    elif shape == "cross":
        t = max(4, (x2 - x1) // 3)
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.rectangle([cx - t // 2, y1, cx - t // 2 + t - 1, b], fill=fill)
        draw.rectangle([x1, cy - t // 2, r, cy - t // 2 + t - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """Scene -> 64x64 RGB image (pure function of the scene)."""
    img = _background(scene)
    draw = ImageDraw.Draw(img)
    if scene.cover is not None:
        x1, y1, x2, y2 = scene.cover
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=scene.cover_colour,
                       outline=(25, 25, 25), width=scene.border)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
    if scene.word is not None:
        draw.text(scene.text_xy, scene.word, fill=scene.text_colour,
                  font=_font(scene.text_size), anchor="mm")
    return img


# --------------------------------------------------------------------------- scene samplers


def _centred_box(rng: random.Random, lo: int, hi: int, jitter: int) -> Box:
    """A size lo..hi box near the image centre, kept fully inside the image."""
    size = rng.randint(lo, hi)
    x1 = (IMAGE_SIZE - size) // 2 + rng.randint(-jitter, jitter)
    y1 = (IMAGE_SIZE - size) // 2 + rng.randint(-jitter, jitter)
    x1 = min(max(x1, 1), IMAGE_SIZE - size - 1)
    y1 = min(max(y1, 1), IMAGE_SIZE - size - 1)
    return (x1, y1, x1 + size, y1 + size)


def _quadrant_box(rng: random.Random, quadrant: str) -> Box:
    """A 20-24 px box inside one quadrant, 1 px clear of its edges so neighbours never touch.

    Little jitter: a stage must learn the box format in ~250 steps, and boxes that vary less round to
    fewer distinct 1-decimal answers (see `format_box`).
    """
    size = rng.randint(20, 24)
    qi = QUADRANTS.index(quadrant)
    ox, oy = (qi % 2) * QUAD, (qi // 2) * QUAD
    lo, hi = 1, QUAD - size - 1
    x = min(max((QUAD - size) // 2 + rng.randint(-2, 2), lo), hi)
    y = min(max((QUAD - size) // 2 + rng.randint(-2, 2), lo), hi)
    return (ox + x, oy + y, ox + x + size, oy + y + size)


def _quadrant_objects(rng: random.Random, k: int, distinct: bool) -> list[Obj]:
    """k objects in k distinct quadrants, listed in QUADRANTS order.

    distinct=True makes every (shape, colour) pair unique so "<colour> <shape>" refers
    to exactly one object.
    """
    quads = sorted(rng.sample(range(4), k))
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = rng.sample(pairs, k) if distinct else [(rng.choice(SHAPES), rng.choice(list(COLOURS)))
                                                    for _ in range(k)]
    return [Obj(s, c, QUADRANTS[q], _quadrant_box(rng, QUADRANTS[q])) for q, (s, c) in zip(quads, chosen)]


def _single_object(rng: random.Random, lo: int = 20, hi: int = 30, jitter: int = 4) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), None, _centred_box(rng, lo, hi, jitter))


def _scene_shape(rng: random.Random) -> Scene:
    """One shape, centred-ish, on white (ScienceQA, VizWiz, colour/shape QA)."""
    return Scene("shape", WHITE, [_single_object(rng)])


def _scene_word(rng: random.Random) -> Scene:
    """A dark word on a random pale background (TextVQA)."""
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    xy = (QUAD + rng.randint(-4, 4), QUAD + rng.randint(-5, 5))
    return Scene("word", bg, word=rng.choice(WORDS), text_xy=xy,
                 text_size=rng.randint(22, 26), text_colour=ink)


def _scene_textured(rng: random.Random) -> Scene:
    """One large shape on low-contrast noise texture (ImageNet: object on clutter)."""
    base = tuple(rng.randint(150, 210) for _ in range(3))
    return Scene("textured", base, [_single_object(rng, 26, 34, 4)],
                 noise_seed=rng.getrandbits(32), noise_amp=rng.randint(12, 28))


def _scene_grey_multi(rng: random.Random) -> Scene:
    """2-3 uniquely described objects on light grey (GQA spatial questions)."""
    return Scene("grey_multi", LIGHT_GREY, _quadrant_objects(rng, rng.randint(2, 3), distinct=True))


def _scene_multi(rng: random.Random, lo: int, hi: int, distinct: bool) -> Scene:
    """lo..hi objects, one per quadrant, on white (grounding, counting, captions)."""
    return Scene("multi", WHITE, _quadrant_objects(rng, rng.randint(lo, hi), distinct))


def _scene_blank(rng: random.Random) -> Scene:
    """A uniform grey frame: nothing to see (VizWiz's unanswerable photos)."""
    g = rng.randint(60, 230)
    return Scene("blank", (g, g, g))


def _scene_noise(rng: random.Random) -> Scene:
    """Full-range RGB noise: nothing recognisable (VizWiz's unanswerable photos)."""
    return Scene("noise", (128, 128, 128), noise_seed=rng.getrandbits(32), noise_amp=128)


def _scene_book(rng: random.Random) -> Scene:
    """A book cover: palette-coloured panel, dark border, title word (OCR-VQA)."""
    m = [rng.randint(3, 7) for _ in range(4)]
    cover = (m[0], m[1], IMAGE_SIZE - m[2], IMAGE_SIZE - m[3])
    name = rng.choice(list(COLOURS))
    ink = (15, 15, 15) if name in ("yellow", "orange") else (250, 250, 250)
    xy = ((cover[0] + cover[2]) // 2 + rng.randint(-3, 3), (cover[1] + cover[3]) // 2 + rng.randint(-5, 5))
    return Scene("book", (240, 240, 235), word=rng.choice(WORDS), text_xy=xy,
                 text_size=rng.randint(21, 24), text_colour=ink,
                 cover=cover, cover_colour=COLOURS[name], border=rng.randint(2, 3))


# Every image kind used anywhere; aux_batch draws uniformly from these.
SCENE_SAMPLERS: dict[str, Callable[[random.Random], Scene]] = {
    "shape": _scene_shape,
    "word": _scene_word,
    "textured": _scene_textured,
    "grey_multi": _scene_grey_multi,
    "multi": lambda rng: _scene_multi(rng, 1, 4, distinct=False),
    "book": _scene_book,
    "blank": _scene_blank,
    "noise": _scene_noise,
}

# --------------------------------------------------------------------------- tasks

Sample = tuple[Scene, str, str]


@dataclass(frozen=True)
class Task:
    """A task = an image kind + a question template + an answer format."""
    name: str
    coin_analogue: str
    answer_format: str
    answer_regex: str  # full-match regex of a well-formed answer (for format-forgetting metrics)
    make: Callable[[random.Random], Sample]

    def sample_scene(self, rng: random.Random) -> Sample:
        """(scene, question, answer) without rendering; cheap, and exposes ground truth."""
        return self.make(rng)

    def sample(self, rng: random.Random) -> tuple[Image.Image, str, str]:
        scene, question, answer = self.make(rng)
        return render(scene), question, answer


def _alt(options) -> str:
    return "(?:" + "|".join(options) + ")"


def _sciqa(rng: random.Random) -> Sample:
    # The options keep one order: with shuffled options the tiny LM did not learn the letter lookup in
    # 200 steps (22% = chance, measured), and what CoIN measures here is the answer *format* (a letter).
    scene = _scene_shape(rng)
    options = list(SHAPES)
    listing = "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, options))
    return scene, SCIQA_Q.format(options=listing), LETTERS[options.index(scene.objects[0].shape)]


def _textvqa(rng: random.Random) -> Sample:
    scene = _scene_word(rng)
    return scene, TEXTVQA_Q, scene.word


def _imagenet(rng: random.Random) -> Sample:
    scene = _scene_textured(rng)
    return scene, IMAGENET_Q, scene.objects[0].shape


# GQA and grounding ask about one object: with 2-3 objects the 2M-parameter model did not learn to bind
# colour+shape to a position within a stage (35% on gqa after 200 steps, measured); position and box
# formats are what these stages teach.
def _gqa(rng: random.Random) -> Sample:
    scene = Scene("grey_multi", LIGHT_GREY, _quadrant_objects(rng, 1, distinct=True))
    target = rng.choice(scene.objects)
    return scene, GQA_Q.format(colour=target.colour, shape=target.shape), target.quadrant


def _vizwiz(rng: random.Random) -> Sample:
    r = rng.random()
    if r < 0.7:
        scene = _scene_shape(rng)
        return scene, VIZWIZ_Q, scene.objects[0].colour
    scene = _scene_blank(rng) if r < 0.85 else _scene_noise(rng)
    return scene, VIZWIZ_Q, UNANSWERABLE


def format_box(box: Box) -> str:
    """Pixel box -> normalised "[x1,y1,x2,y2]" with 1 decimal.

    LLaVA writes 2 decimals; with 2 the 2M-parameter model learned the format but not the numbers in a
    stage (5% at IoU > 0.5 after 250 steps, always the same x1, measured): ~100 number tokens per
    coordinate are too sparse to bind to positions. One decimal keeps the box format with ~10 values.
    """
    return "[" + ",".join(f"{v / IMAGE_SIZE:.1f}" for v in box) + "]"


def _grounding(rng: random.Random) -> Sample:
    scene = _scene_multi(rng, 1, 1, distinct=True)
    target = rng.choice(scene.objects)
    return scene, GROUNDING_Q.format(colour=target.colour, shape=target.shape), format_box(target.box)


def _vqav2(rng: random.Random) -> Sample:
    scene = _scene_multi(rng, 1, 4, distinct=False)
    return scene, VQAV2_Q, str(len(scene.objects))


def _ocrvqa(rng: random.Random) -> Sample:
    scene = _scene_book(rng)
    return scene, OCRVQA_Q, scene.word


def caption_text(objects: list[Obj]) -> str:
    """Deterministic caption: "A red circle." / "A red circle in the top left and a blue square in the ..."."""
    phrases = [f"{o.colour} {o.shape}" + (f" in the {o.quadrant}" if o.quadrant else "") for o in objects]
    return "A " + " and a ".join(phrases) + "."


def describe(scene: Scene) -> str:
    """The alignment caption of any scene kind: what is where, what is written, or that nothing is there."""
    if scene.kind == "blank":
        return "A blank image."
    if scene.kind == "noise":
        return "Random noise."
    if scene.kind == "word":
        return f"The word {scene.word}."
    if scene.kind == "book":
        colour = next(n for n, rgb in COLOURS.items() if rgb == scene.cover_colour)
        return f"A {colour} book titled {scene.word}."
    return caption_text(scene.objects)


# Alignment data covers every image kind, so stages mostly teach formats (as CoIN does on LLaVA-1.5).
_CAPTION_KINDS = [("multi", 8), ("shape", 2), ("word", 4), ("book", 4), ("textured", 1), ("blank", 1), ("noise", 1)]


def _caption(rng: random.Random) -> Sample:
    kind = rng.choices([k for k, _ in _CAPTION_KINDS], weights=[w for _, w in _CAPTION_KINDS])[0]
    scene = _scene_multi(rng, 1, 3, distinct=True) if kind == "multi" else SCENE_SAMPLERS[kind](rng)
    return scene, CAPTION_Q, describe(scene)


def _colour_qa(rng: random.Random) -> Sample:
    scene = _scene_shape(rng)
    obj = scene.objects[0]
    return scene, COLOUR_QA_Q.format(shape=obj.shape), obj.colour


def _shape_qa(rng: random.Random) -> Sample:
    scene = _scene_shape(rng)
    return scene, SHAPE_QA_Q, scene.objects[0].shape


_BOX_NUM = r"(?:0\.\d|1\.0)"

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("sciqa", "ScienceQA", "option letter A-D", _alt(LETTERS), _sciqa),
    Task("textvqa", "TextVQA", "the written word", _alt(WORDS), _textvqa),
    Task("imagenet", "ImageNet", "shape name", _alt(SHAPES), _imagenet),
    Task("gqa", "GQA", "region name, e.g. 'bottom left'", _alt(QUADRANTS), _gqa),
    Task("vizwiz", "VizWiz", "colour name or 'unanswerable'", _alt([*COLOURS, UNANSWERABLE]), _vizwiz),
    Task("grounding", "RefCOCO", "normalised box '[x1,y1,x2,y2]', 1 decimal",
         r"\[" + ",".join([_BOX_NUM] * 4) + r"\]", _grounding),
    Task("vqav2", "VQAv2", "count as a digit 1-4", "[1-4]", _vqav2),
    Task("ocrvqa", "OCR-VQA", "book title word", _alt(WORDS), _ocrvqa),
]}
DEFAULT_SEQUENCE: list[str] = list(TASKS)

_PHRASE = _alt(COLOURS) + " " + _alt(SHAPES)
_OBJ = _PHRASE + f"(?: in the {_alt(QUADRANTS)})?"
BASE_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("caption", "LLaVA alignment captions", "a one-sentence description of any image kind",
         f"(?:A {_OBJ}(?: and a {_OBJ})*|The word {_alt(WORDS)}|A {_alt(COLOURS)} book titled {_alt(WORDS)}"
         f"|A blank image|Random noise)\\.", _caption),
    Task("colour_qa", "LLaVA instruction data", "colour name", _alt(COLOURS), _colour_qa),
    Task("shape_qa", "LLaVA instruction data", "shape name", _alt(SHAPES), _shape_qa),
]}

ALL_TASKS: dict[str, Task] = {**TASKS, **BASE_TASKS}


def get_task(name: str) -> Task:
    try:
        return ALL_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {list(ALL_TASKS)}") from None


# --------------------------------------------------------------------------- writing to disk

Record = tuple[Image.Image, str, str]
SPLITS = {"train": 0, "test": 1}


def split_seed(seed: int, task_name: str, split: str) -> int:
    """Stable per-(seed, task, split) seed; python hash() is salted per process, so not used."""
    return seed * 1000 + list(ALL_TASKS).index(task_name) * 10 + SPLITS[split]


def make_records(task_name: str, n: int, seed: int) -> list[Record]:
    task = get_task(task_name)
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(n)]


def write_split(out_dir: str | os.PathLike, records: list[Record], id_prefix: str) -> Path:
    """Write data.json + images/ in LLaVA conversation format, atomically; a record is (image, question, answer) or
    (image, [(question, answer), ...]) for a multi-turn conversation about one image.

    Everything goes to a sibling temp dir first and is swapped in by rename, so a
    reader never sees a half-written split (and a crash leaves the old one intact).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    entries = []
    for i, (img, *asked) in enumerate(records):
        rel = f"images/{i:05d}.png"
        img.save(tmp / rel, format="PNG")
        turns = asked[0] if len(asked) == 1 else [asked]  # (image, [(q, a), ...]) or (image, q, a)
        conversations = []
        for t, (question, answer) in enumerate(turns):
            conversations += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                              {"from": "gpt", "value": answer}]
        entries.append({"id": f"{id_prefix}-{i:05d}", "image": rel, "conversations": conversations})
    (tmp / "data.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def write_task(out_root: str | os.PathLike, task_name: str, n_train: int, n_test: int, seed: int) -> Path:
    """Write <out_root>/<task>/{train,test}; the two splits use different derived seeds."""
    task_dir = Path(out_root) / task_name
    for split, n in (("train", n_train), ("test", n_test)):
        records = make_records(task_name, n, split_seed(seed, task_name, split))
        write_split(task_dir / split, records, f"{task_name}-{split}")
    return task_dir


def write_coin_mini(out_root: str | os.PathLike, seed: int = 0, n_train: int = 1500, n_test: int = 100,
                    tasks: Sequence[str] = tuple(DEFAULT_SEQUENCE)) -> list[Path]:
    """Write the whole CoIN-mini benchmark; returns the task dirs in sequence order."""
    return [write_task(out_root, name, n_train, n_test, seed) for name in tasks]


def write_base_mixture(out_root: str | os.PathLike, seed: int = 0, n_train: int = 3000,
                       n_test: int = 150) -> Path:
    """Write <out_root>/base/{train,test}: the base tasks in equal shares, shuffled.

    n_train / n_test are totals over the mixture.
    """
    base_dir = Path(out_root) / "base"
    names = list(BASE_TASKS)
    for split, n in (("train", n_train), ("test", n_test)):
        records: list[Record] = []
        for k, name in enumerate(names):
            share = n // len(names) + (1 if k < n % len(names) else 0)
            records += make_records(name, share, split_seed(seed, name, split))
        random.Random(seed * 1000 + 990 + SPLITS[split]).shuffle(records)
        write_split(base_dir / split, records, f"base-{split}")
    return base_dir


def all_texts(seed: int = 0, n: int = 200) -> list[str]:
    """Questions and answers of n samples from every task and base task (tokenizer corpus)."""
    texts = []
    for name, task in ALL_TASKS.items():
        rng = random.Random(split_seed(seed, name, "train"))
        for _ in range(n):
            _, question, answer = task.sample_scene(rng)
            texts += [question, answer]
    return texts


# --------------------------------------------------------------------------- vision pre-training labels

KINDS = {"blank": 1, "noise": 2}  # anything else is 0 = normal

AUX_HEADS: dict[str, int] = {
    **{f"q{i}_{attr}": n for i in range(4) for attr, n in (("shape", 1 + len(SHAPES)),
                                                           ("colour", 1 + len(COLOURS)))},
    "word": 1 + len(WORDS),
    "kind": 3,
    "count": 5,                  # number of objects, 0-4
    "shape": 1 + len(SHAPES),    # shape of the only object (0 unless exactly one object)
    "colour": 1 + len(COLOURS),  # colour of the only object (0 unless exactly one object)
}


# Heads that also read the *mean* of the patch features: a label decodable from an average is one the
# language model can pick up with a flat attention pattern wherever the word or object sits (the flattened
# heads alone left reading position-bound: 36% on textvqa after a stage, measured).
AUX_POOLED_HEADS: tuple[str, ...] = ("word", "kind", "count", "shape", "colour")
# Reading is the hard skill at 16 px patches: a linear probe on the frozen tower read 75% of words after
# 800 unweighted steps (measured), so the word loss counts more.
AUX_WEIGHTS: dict[str, float] = {"word": 3.0}


def aux_labels(scene: Scene) -> dict[str, int]:
    """Class labels per AUX_HEADS; 0 always means 'nothing there'.

    Centred single objects (quadrant None) are not assigned to a quadrant: they are
    covered by the 'shape'/'colour' heads instead, which fire whenever the scene holds
    exactly one object.
    """
    labels = {name: 0 for name in AUX_HEADS}
    colour_names = list(COLOURS)
    for obj in scene.objects:
        if obj.quadrant is not None:
            qi = QUADRANTS.index(obj.quadrant)
            labels[f"q{qi}_shape"] = 1 + SHAPES.index(obj.shape)
            labels[f"q{qi}_colour"] = 1 + colour_names.index(obj.colour)
    if len(scene.objects) == 1:
        labels["shape"] = 1 + SHAPES.index(scene.objects[0].shape)
        labels["colour"] = 1 + colour_names.index(scene.objects[0].colour)
    labels["count"] = len(scene.objects)
    labels["word"] = 0 if scene.word is None else 1 + WORDS.index(scene.word)
    labels["kind"] = KINDS.get(scene.kind, 0)
    return labels


def aux_batch(rng: random.Random, n: int):
    """n images drawn uniformly over SCENE_SAMPLERS, with a LongTensor of labels per head."""
    import torch  # only this function needs torch

    kinds = list(SCENE_SAMPLERS)
    scenes = [SCENE_SAMPLERS[rng.choice(kinds)](rng) for _ in range(n)]
    per_scene = [aux_labels(s) for s in scenes]
    labels = {h: torch.tensor([l[h] for l in per_scene], dtype=torch.long) for h in AUX_HEADS}
    return [render(s) for s in scenes], labels


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the CoIN-mini benchmark and base mixture.")
    p.add_argument("out_root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--tasks", nargs="*", default=DEFAULT_SEQUENCE)
    p.add_argument("--no-base", action="store_true", help="skip the base pre-training mixture")
    a = p.parse_args(argv)
    for d in write_coin_mini(a.out_root, a.seed, a.n_train, a.n_test, a.tasks):
        print(d)
    if not a.no_base:
        print(write_base_mixture(a.out_root, a.seed))


if __name__ == "__main__":
    main()

"""The pre-training world of base v2: real drawings and emoji, fonts, shapes — and many ways to ask about them.

Base v1 learned CoIN-mini's own image kinds with three fixed questions, so every CoIN-mini task started at 0%
zero-shot and each stage had to learn its answer format from nothing. LLaVA-1.5 (CoIN's start) instead follows
instructions in many formats about many kinds of images. This module is that foundation, shrunk: scenes built from
real images (`llaca.data.image_pack`: openclipart drawings and Noto emoji), text in 16 font faces shipped in `assets/fonts`,
anti-aliased shapes of ten kinds in eleven colours at any position, and empty / dark / noisy frames; then eleven
instruction families, each with several phrasings, covering every answer format continual tasks use (option
letter, one word, class name, region name, colour or "unanswerable", box, count, title, yes/no, short sentence).

Nothing here comes from `llaca.data.coin_mini`: no template, no generator, no palette, no image kind, so the
CoIN-mini tasks stay new (their concepts — colours, shapes, words, positions — overlap, as CoIN's concepts
overlap with what LLaVA-1.5 saw). Deterministic for a seed: every choice goes through an explicit
`random.Random`.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..paths import ASSETS_DIR
from . import image_pack

# Bumped whenever the data a seed gives changes (names the cached mixtures, so a rebuild never reuses stale data).
# 2: "count everything" questions, shapes named by their noun.
DATA_VERSION = 2
SIZE = 64
SS = 4  # supersampling for anti-aliased shapes

# Colour names with a centre RGB; every draw jitters it, so a name covers a region, not one value.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35), "green": (45, 160, 60), "blue": (40, 85, 210), "yellow": (240, 215, 45),
    "purple": (135, 60, 175), "orange": (240, 130, 30), "pink": (240, 130, 180), "brown": (125, 80, 40),
    "black": (25, 25, 25), "white": (250, 250, 250), "grey": (135, 135, 135),
}
SHAPE_KINDS = ["circle", "square", "triangle", "cross", "star", "heart", "diamond", "hexagon", "ring", "arrow"]
REGIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
LETTERS = "ABCDE"
UNANSWERABLE = "unanswerable"
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]

# Common short English words for rendered text (reading, titles, signs).
WORDS = sorted(set("""
cat dog sun car box cup map hat pen bus egg owl apple bell boat book cake fish frog gift kite lamp leaf lion
milk moon rain ring rose ship shoe star tree toy open stop exit sale park shop home
""".split()))

# The text fonts: Debian's fonts-dejavu-core/-extra, fonts-liberation and fonts-freefont-ttf files, shipped byte for
# byte in assets/fonts (licences beside them) so the data a seed gives never depends on what the machine has
# installed. Listed rather than discovered, in a fixed order: the list draws random choices. A missing file is an
# error (`FontMissing`), never a fallback: another face would silently change the base's test split. Upright faces
# only: 48 faces with italics and 103 words were not learnable in the build budget (a linear probe on the tower
# read 11% of the words, measured).
FONT_DIR = ASSETS_DIR / "fonts"
FONT_NAMES: tuple[str, ...] = (
    "dejavu/DejaVuSans", "dejavu/DejaVuSans-Bold", "dejavu/DejaVuSerif", "dejavu/DejaVuSerif-Bold",
    "dejavu/DejaVuSansCondensed", "dejavu/DejaVuSansMono", "freefont/FreeSans", "freefont/FreeSansBold",
    "freefont/FreeSerif", "freefont/FreeSerifBold", "liberation/LiberationSans-Regular",
    "liberation/LiberationSans-Bold", "liberation/LiberationSerif-Regular", "liberation/LiberationSerif-Bold",
    "liberation/LiberationSansNarrow-Regular", "liberation/LiberationMono-Regular")
FONTS: tuple[str, ...] = tuple(str(FONT_DIR / f"{name}.ttf") for name in FONT_NAMES)


class FontMissing(FileNotFoundError):
    """A font file the world renders with is not there (the data would differ from what was measured)."""


def font_files() -> tuple[str, ...]:
    return FONTS


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if not path or not os.path.isfile(path):
        raise FontMissing(f"font file {path!r} is missing: base_world renders text only with the fonts shipped in "
                          f"{FONT_DIR} (restore them from git; see {FONT_DIR / 'README.md'})")
    return ImageFont.truetype(path, size)


# --------------------------------------------------------------------------- scenes


@dataclass
class Thing:
    """One object in a scene: a real sprite or a drawn shape."""
    kind: str                # "sprite" | "shape"
    name: str                # readable: "dog face", "fruit", "star"
    group: str               # "animal", "food", ..., "shape"
    box: tuple[int, int, int, int]
    colour: str | None = None  # shapes only
    sprite: int | None = None  # index into the image pack
    shape: str | None = None


@dataclass
class Scene:
    kind: str                # "objects" | "text" | "empty"
    background: str          # how the background was made (for captions of empty frames)
    things: list[Thing] = field(default_factory=list)
    text: str | None = None
    font: str | None = None
    seed: int = 0


def readable_name(sprite: image_pack.Sprite) -> str:
    """'animals/birds' -> 'birds', 'people' -> 'person'; an emoji by its group ('animal', 'food', 'face').

    Emoji names ("input symbol for latin small letters") stay out of the language data: one picture per name
    cannot be learned, and they made prompts long. The vision tower still learns each emoji apart.
    """
    if sprite.source == "emoji":
        return sprite.group
    top, _, sub = sprite.label.partition("/")
    return (sub or sprite.group).replace("_", " ").replace("-", " ")


def region_of(box) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col, row = min(int(cx * 3 / SIZE), 2), min(int(cy * 3 / SIZE), 2)
    return REGIONS[row * 3 + col]


def format_box(box) -> str:
    return "[" + ",".join(f"{v / SIZE:.1f}" for v in box) + "]"


def _free_box(rng: random.Random, size: int, taken: list) -> tuple[int, int, int, int] | None:
    for _ in range(30):
        x, y = rng.randint(0, SIZE - size), rng.randint(0, SIZE - size)
        box = (x, y, x + size, y + size)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def _sprite_thing(rng, idx, box) -> Thing:
    _, sprites = image_pack.load()
    s = sprites[idx]
    return Thing("sprite", readable_name(s), s.group, box, sprite=idx)


def _shape_thing(rng, box, shape=None, colour=None) -> Thing:
    shape = shape or rng.choice(SHAPE_KINDS)
    colour = colour or rng.choice(list(PALETTE))
    return Thing("shape", shape, "shape", box, colour=colour, shape=shape)


def sample_scene(rng: random.Random) -> Scene:
    """Any scene of the world: objects (real or drawn, 1-6, maybe repeated), text, or an empty frame."""
    r = rng.random()
    bg = rng.choice(["plain", "plain", "plain", "gradient", "texture"])
    if r < 0.10:
        return Scene("empty", rng.choice(["blank", "dark", "noise", "blur"]), seed=rng.getrandbits(31))
    if r < 0.36:
        return Scene("text", bg, text=rng.choice(WORDS), font=rng.choice(FONTS),
                     seed=rng.getrandbits(31))
    _, sprites = image_pack.load()
    layout = rng.random()
    things: list[Thing] = []
    if layout < 0.45:  # one big-ish object anywhere
        size = rng.randint(26, 56)
        box = _free_box(rng, size, [])
        things.append(_sprite_thing(rng, rng.randrange(len(sprites)), box) if rng.random() < 0.7
                      else _shape_thing(rng, box))
    elif layout < 0.75:  # n copies of one thing (counting)
        n, size = rng.randint(1, 6), rng.randint(12, 22)
        idx, shape, colour = rng.randrange(len(sprites)), rng.choice(SHAPE_KINDS), rng.choice(list(PALETTE))
        use_sprite = rng.random() < 0.5
        for _ in range(n):
            box = _free_box(rng, size, [t.box for t in things])
            if box:
                things.append(_sprite_thing(rng, idx, box) if use_sprite else _shape_thing(rng, box, shape, colour))
    else:  # 2-4 different things
        for _ in range(rng.randint(2, 4)):
            box = _free_box(rng, rng.randint(16, 28), [t.box for t in things])
            if box:
                things.append(_sprite_thing(rng, rng.randrange(len(sprites)), box) if rng.random() < 0.5
                              else _shape_thing(rng, box))
    return Scene("objects", bg, things=things, seed=rng.getrandbits(31))


def _background(scene: Scene, gen: np.random.Generator) -> np.ndarray:
    base = gen.integers(150, 256, 3) if gen.random() < 0.7 else gen.integers(0, 256, 3)
    img = np.ones((SIZE, SIZE, 3)) * base
    if scene.background == "gradient":
        other = gen.integers(0, 256, 3)
        t = np.linspace(0, 1, SIZE)[:, None, None] if gen.random() < 0.5 else np.linspace(0, 1, SIZE)[None, :, None]
        img = img * (1 - t) + other * t
    elif scene.background == "texture":
        img = img + gen.normal(0, gen.uniform(6, 22), (SIZE, SIZE, 3))
    return np.clip(img, 0, 255)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x1, y1, x2, y2 = (v * SS for v in box)
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    elif shape == "ring":
        draw.ellipse([x1, y1, x2, y2], outline=fill, width=max(2, w // 6))
    elif shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x1, y2), (x2, y2)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "cross":
        t = w / 3
        draw.rectangle([cx - t / 2, y1, cx + t / 2, y2], fill=fill)
        draw.rectangle([x1, cy - t / 2, x2, cy + t / 2], fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, w / 2), 6, fill=fill)
    elif shape == "star":
        pts = [(cx + (w / 2 if k % 2 == 0 else w / 5) * np.sin(k * np.pi / 5),
                cy - (h / 2 if k % 2 == 0 else h / 5) * np.cos(k * np.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)
    elif shape == "heart":
        r = w / 4
        draw.ellipse([x1, y1 + h / 8, cx, y1 + h / 8 + 2 * r], fill=fill)
        draw.ellipse([cx, y1 + h / 8, x2, y1 + h / 8 + 2 * r], fill=fill)
        draw.polygon([(x1 + 1, y1 + h / 8 + r * 1.2), (x2 - 1, y1 + h / 8 + r * 1.2), (cx, y2)], fill=fill)
    elif shape == "arrow":
        t = h / 3
        draw.rectangle([x1, cy - t / 2, x1 + w * 0.55, cy + t / 2], fill=fill)
        draw.polygon([(x1 + w * 0.5, y1), (x2, cy), (x1 + w * 0.5, y2)], fill=fill)
    else:
        raise ValueError(shape)


def render(scene: Scene) -> Image.Image:
    """Scene -> 64x64 RGB image (a pure function of the scene, including its noise seed)."""
    gen = np.random.default_rng(scene.seed)
    if scene.kind == "empty":
        if scene.background == "noise":
            return Image.fromarray(gen.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        level = {"blank": gen.integers(90, 256), "dark": gen.integers(0, 35)}.get(scene.background, 128)
        img = np.ones((SIZE, SIZE, 3)) * level + gen.normal(0, 3, (SIZE, SIZE, 3))
        if scene.background == "blur":  # heavy blur of random blobs: something, but nothing recognisable
            img = gen.integers(0, 256, (8, 8, 3)).repeat(8, 0).repeat(8, 1).astype(float)
            return Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(6))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    canvas = Image.fromarray(_background(scene, gen).astype(np.uint8))
    if scene.kind == "text":
        size = int(gen.integers(15, 27)) if len(scene.text) <= 4 else int(gen.integers(14, 21))
        font = _font(scene.font, size)
        draw = ImageDraw.Draw(canvas)
        if gen.random() < 0.6:  # a sign / label / cover behind the word
            x1, y1 = int(gen.integers(1, 10)), int(gen.integers(6, 20))
            panel = tuple(int(v) for v in gen.integers(0, 256, 3))
            draw.rounded_rectangle([x1, y1, SIZE - int(gen.integers(1, 10)), SIZE - int(gen.integers(6, 20))],
                                   radius=int(gen.integers(0, 6)), fill=panel)
            light = sum(panel) > 380
        else:
            light = canvas.getpixel((SIZE // 2, SIZE // 2))[0] > 120
        ink = tuple(int(v) for v in (gen.integers(0, 70, 3) if light else gen.integers(190, 256, 3)))
        xy = (SIZE / 2 + gen.integers(-4, 5), SIZE / 2 + gen.integers(-6, 7))
        draw.text(xy, scene.text, fill=ink, font=font, anchor="mm")
        return canvas
    pack, _ = image_pack.load()
    if any(t.kind == "shape" for t in scene.things):  # drawn at 4x and box-filtered down: anti-aliased edges
        big = canvas.resize((SIZE * SS, SIZE * SS), Image.NEAREST)
        draw = ImageDraw.Draw(big)
        for t in scene.things:
            if t.kind == "shape":
                rgb = np.clip(np.array(PALETTE[t.colour]) + gen.integers(-18, 19, 3), 0, 255)
                _draw_shape(draw, t.shape, t.box, tuple(int(v) for v in rgb))
        canvas = big.reduce(SS)
    for t in scene.things:
        if t.kind == "sprite":
            w = t.box[2] - t.box[0]
            sprite = Image.fromarray(pack[t.sprite]).resize((w, w), Image.BILINEAR, reducing_gap=2.0)
            canvas.paste(sprite, t.box[:2], sprite)
    return canvas


# --------------------------------------------------------------------------- vision pre-training labels

@lru_cache(maxsize=1)
def _sprite_labels() -> tuple[dict[str, int], dict[str, int]]:
    """Fine label -> index and group -> index over the image pack (sorted, so stable)."""
    _, sprites = image_pack.load()
    labels, groups = sorted({s.label for s in sprites}), sorted({s.group for s in sprites})
    return {l: i for i, l in enumerate(labels)}, {g: i for i, g in enumerate(groups)}


@lru_cache(maxsize=1)
def aux_heads() -> dict[str, int]:
    """Head name -> classes. 0 (or -100, ignored) means 'not applicable' where a head has no 'none' class."""
    labels, groups = _sprite_labels()
    return {"label": len(labels), "group": len(groups) + 3,  # + shape, text, empty
            "shape": len(SHAPE_KINDS) + 1, "colour": len(PALETTE) + 1, "count": 7, "region": len(REGIONS) + 1,
            "word": len(WORDS) + 1}


AUX_WEIGHTS = {"word": 2.0, "label": 0.5}


def aux_labels(scene: Scene) -> dict[str, int]:
    labels, groups = _sprite_labels()
    _, sprites = image_pack.load()
    out = {"label": -100, "shape": 0, "colour": 0, "count": len(scene.things), "region": 0, "word": 0}
    if scene.kind == "empty":
        out["group"] = len(groups) + 2
    elif scene.kind == "text":
        out["group"] = len(groups) + 1
        out["word"] = 1 + WORDS.index(scene.text)
    else:
        first = scene.things[0]
        out["group"] = len(groups) if first.kind == "shape" else groups[first.group]
        if len({(t.name, t.colour) for t in scene.things}) == 1:  # one kind of thing: name it
            if first.kind == "sprite":
                out["label"] = labels[sprites[first.sprite].label]
            else:
                out["shape"] = 1 + SHAPE_KINDS.index(first.shape)
                out["colour"] = 1 + list(PALETTE).index(first.colour)
        if len(scene.things) == 1:
            out["region"] = 1 + REGIONS.index(region_of(first.box))
    out["count"] = min(out["count"], 6)
    return out


def aux_batch(rng: random.Random, n: int, dense_grid: int = 0):
    """n rendered scenes and a LongTensor of labels per head (-100 = ignore); with `dense_grid` also the per-patch
    labels of `dense_labels` (each `(n, grid * grid)`)."""
    import torch

    scenes = [sample_scene(rng) for _ in range(n)]
    per = [aux_labels(s) for s in scenes]
    labels = {h: torch.tensor([p[h] for p in per]) for h in aux_heads()}
    if dense_grid:
        dense = [dense_labels(s, dense_grid) for s in scenes]
        labels.update({h: torch.tensor([d[h] for d in dense]) for h in dense_heads()})
    return [render(s) for s in scenes], labels


@lru_cache(maxsize=1)
def dense_heads() -> dict[str, int]:
    """Per-patch head name -> classes: what the thing under an image token is (group also covers background)."""
    labels, groups = _sprite_labels()
    return {"patch_group": len(groups) + 4,  # + shape, text, empty frame, background
            "patch_label": len(labels), "patch_shape": len(SHAPE_KINDS), "patch_colour": len(PALETTE),
            "patch_word": len(WORDS)}


def dense_labels(scene: Scene, grid: int) -> dict[str, list[int]]:
    """Per-patch labels (row-major over a grid x grid split of the image): which thing each image token shows.

    The image-level heads of `aux_labels` name a thing only when the scene holds one kind, so in a scene of several
    things no token is ever told what it shows, and the LM must find identities the tower was not trained to keep.
    Here a patch gets the thing covering most of it (a quarter at least; a thing always owns its centre's patch);
    a text scene's word goes to every patch (the LM may read it from any token); the rest is background.
    -100 = ignore.
    """
    labels, groups = _sprite_labels()
    _, sprites = image_pack.load()
    n = grid * grid
    out = {h: [-100] * n for h in dense_heads()}
    shape_g, text_g, empty_g, background_g = len(groups), len(groups) + 1, len(groups) + 2, len(groups) + 3
    if scene.kind == "empty":
        out["patch_group"] = [empty_g] * n
        return out
    if scene.kind == "text":
        out["patch_group"] = [text_g] * n
        out["patch_word"] = [WORDS.index(scene.text)] * n
        return out
    owner = patch_owners(scene, grid)
    for i, t in enumerate(owner):
        if t is None:
            out["patch_group"][i] = background_g
        elif t.kind == "shape":
            out["patch_group"][i] = shape_g
            out["patch_shape"][i] = SHAPE_KINDS.index(t.shape)
            out["patch_colour"][i] = list(PALETTE).index(t.colour)
        else:
            out["patch_group"][i] = groups[t.group]
            out["patch_label"][i] = labels[sprites[t.sprite].label]
    return out


def patch_owners(scene: Scene, grid: int) -> list[Thing | None]:
    """Row-major over a grid x grid split of the image: the thing each patch shows (the one covering most of it, a
    quarter at least; a thing always owns the patch under its centre), or None."""
    n, cell = grid * grid, SIZE // grid
    owner: list[Thing | None] = [None] * n
    for i in range(n):
        r, c = divmod(i, grid)
        x1, y1 = c * cell, r * cell
        best = 0
        for t in scene.things:
            w = max(0, min(x1 + cell, t.box[2]) - max(x1, t.box[0]))
            area = w * max(0, min(y1 + cell, t.box[3]) - max(y1, t.box[1]))
            if area > best and area >= cell * cell // 4:
                best, owner[i] = area, t
    for t in scene.things:  # a small thing split over four patches still owns the one under its centre
        owner[centre_patch(t, grid)] = t
    return owner


def centre_patch(thing: Thing, grid: int) -> int:
    """Row-major index of the patch under the thing's centre, on a grid x grid split of the image."""
    cell = SIZE // grid
    cx, cy = (thing.box[0] + thing.box[2]) // 2, (thing.box[1] + thing.box[3]) // 2
    return min(cy // cell, grid - 1) * grid + min(cx // cell, grid - 1)


def patch_words(scene: Scene, grid: int, centre_word: str | None = None, count_word: bool = False) -> list[list[str]]:
    """Row-major per patch: the words that say what it shows, as the instructions name it (a shape's colour and
    shape, a drawing's name and group; a text scene's word on every patch); [] for background and empty frames.

    `centre_word`: also said on the patch under each thing's centre, once per thing whatever its size, so that the
    things can be counted off the patches (the words alone are on every patch a thing covers: two patches of one
    big star and two small stars read alike).

    `count_word`: every patch a thing owns also says how many things the scene has ("three"), the answer every
    counting question of the world asks (`count`, `count_all`: a scene of copies or all of it), so a count is read
    off any one token instead of summed over 49."""
    if scene.kind == "text":
        return [[scene.text]] * (grid * grid)
    owners = patch_owners(scene, grid)
    words = [[] if t is None else [t.colour, t.shape] if t.kind == "shape" else [t.name, t.group] for t in owners]
    if count_word:
        number = NUMBER_WORDS[len(scene.things)]
        words = [w + [number] if w else w for w in words]
    if centre_word:
        for t in scene.things:
            i = centre_patch(t, grid)
            if owners[i] is t:  # two things centred on one patch: it shows (and counts) the one it belongs to
                words[i] = words[i] + [centre_word]
    return words


# --------------------------------------------------------------------------- instructions

def _pick(rng, options):
    return rng.choice(options)


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _plural(name: str, n: int) -> str:
    if n == 1:
        return name
    return name if name.endswith("s") else name + ("es" if name.endswith(("sh", "ch", "x")) else "s")


def _thing_phrase(t: Thing) -> str:
    return f"{t.colour} {t.name}" if t.kind == "shape" else t.name


def caption(scene: Scene) -> str:
    if scene.kind == "empty":
        return {"blank": "An empty picture.", "dark": "A dark picture with nothing visible.",
                "noise": "Random coloured noise.", "blur": "A blurry picture of nothing clear."}[scene.background]
    if scene.kind == "text":
        return f"The text '{scene.text}'."
    names = [_thing_phrase(t) for t in scene.things]
    if len(set(names)) == 1:
        n = len(names)
        return (f"{_article(names[0]).capitalize()}." if n == 1
                else f"{NUMBER_WORDS[n].capitalize()} {_plural(names[0], n)}.")
    return (", ".join(_article(n) for n in names[:-1]) + " and " + _article(names[-1]) + ".").capitalize()


CAPTION_QS = ["Describe the image briefly.", "What do you see?", "Give a short caption for this picture.",
              "Summarize the picture in a few words.", "Briefly, what is in this image?",
              "Write a one-line description of the photo."]
NAME_QS = ["What is this? Reply with a word or short phrase.", "Name the thing in the picture.",
           "What is shown here? Answer briefly.", "Which object is in the image? Use a few words.",
           "Identify the object.", "What does this picture show? One phrase only."]
GROUP_QS = ["What kind of thing is this?", "Which category does the object belong to?",
            "Classify the picture into a category. Answer with the category only.",
            "What type of object is pictured? Give the class name."]
REGION_QS = ["Where is the {x} in the picture?", "In which part of the image is the {x}? Answer with the region.",
             "Which region contains the {x}? Use words like 'top left' or 'center'.",
             "Tell me where the {x} is located (top, bottom, left, right, center...)."]
COLOUR_QS = ["What colour is the {x}?", "Which color does the {x} have? One word.",
             "Name the color of the {x}.", "What is the {x}'s colour? Answer with a single word."]
UNANS_HINTS = [" If you cannot tell, say 'unanswerable'.", " Reply 'unanswerable' if the picture does not show it.",
               " Answer unanswerable when it cannot be seen."]
BOX_QS = ["Give the bounding box of the {x} as [x1,y1,x2,y2] with one decimal.",
          "Where exactly is the {x}? Reply with its box [x1,y1,x2,y2], coordinates from 0 to 1.",
          "Locate the {x}. Output the box coordinates.", "Find the {x} and give its bounding box.",
          "What are the coordinates of the box around the {x}?", "Mark the {x} with a bounding box.",
          "Output the box of the object described here: {x}."]
COUNT_QS = ["How many {xs} are there?", "Count the {xs} in the picture. Reply with a number.",
            "How many {xs} can you see? Answer with a digit.", "What is the number of {xs}?"]
# Counting everything, whatever it is (a scene of mixed things): users ask this without naming the things.
COUNT_ALL_QS = ["How many things are in the picture?", "Count all the items you can see.",
                "What is the total number of objects shown?", "How many separate objects does this picture have?",
                "Tell me how many things appear here."]
READ_QS = ["What does the text say?", "Read the word in the image.", "What is written here?",
           "What is the title on this sign?", "Which word is printed in the picture? One word.",
           "What is the label's text?"]
YESNO_QS = ["Is there {a} in the picture? Answer yes or no.", "Does the image contain {a}?",
            "Can you see {a} here? Reply yes or no.", "Is {a} shown in this image?"]
MCQ_QS = ["{q}\n{options}\nReply with the letter of the correct option.",
          "{q}\n{options}\nChoose one option and answer with its letter only.",
          "{q} Options:\n{options}\nAnswer with the option's letter.",
          "Question: {q}\n{options}\nGive the letter of your choice.",
          "{q}\n{options}", "{q}\nChoices:\n{options}\nWhich letter is right?"]
# Answer-format lines after the question (the second line of LLaVA-style prompts), per answer kind. Without them
# the only multi-line prompts were multiple choice, and a base trained so answered every multi-line question
# with a letter (measured: 0% zero-shot on 7 of 8 CoIN-mini tasks).
FORMAT_HINTS = {
    "phrase": ["Answer with one word or a short phrase.", "Use a word or two.", "Reply briefly.",
               "Give just the name.", "Respond with a short answer."],
    "word": ["Reply with the word only.", "Answer with a single word.", "Just the word, please.",
             "Respond with one word."],
    "region": ["Reply with the region, e.g. top left.", "Answer with a region such as center or bottom right.",
               "Use a position word."],
    "colour": ["Reply with one colour word.", "Answer with a single color name.", "One word."],
    "count": ["Reply with a number.", "Answer with one digit.", "Give only the count."],
    "box": ["Format: [x1,y1,x2,y2].", "Coordinates go from 0 to 1, one decimal.", "Reply with the box only."],
    "yesno": ["Answer yes or no.", "Reply with yes or no only."],
    "sentence": ["Keep it short.", "One sentence, please."],
}
UNANS_LINES = ["If it cannot be seen, answer 'unanswerable'.", "Say unanswerable when the picture does not show it.",
               "When you cannot tell, reply 'unanswerable'."]
SENTENCE_QS = ["Describe the picture in one sentence.", "Tell me about this image in a full sentence.",
               "Write one sentence about what you see."]


def _target(rng, scene: Scene) -> Thing:
    return rng.choice(scene.things)


_HINT_KIND = {"caption": "sentence", "sentence": "sentence", "read": "word", "count": "count", "count_all": "count",
              "name": "phrase", "group": "phrase", "region": "region", "region_multi": "region", "box": "box",
              "box_multi": "box", "yesno": "yesno", "colour_unans": "colour"}


def _ask(rng, scene: Scene) -> tuple[str, str]:
    """One (question, answer); half the time with an answer-format line under the question."""
    fam, question, answer = _ask_family(rng, scene)
    if fam == "colour_unans" and rng.random() < 0.5:  # the unanswerable rule on its own line
        question += "\n" + _pick(rng, UNANS_LINES)
    if fam in _HINT_KIND and rng.random() < 0.5:
        question += "\n" + _pick(rng, FORMAT_HINTS[_HINT_KIND[fam]])
    return question, answer


def _ask_family(rng, scene: Scene) -> tuple[str, str, str]:
    """(family, question, answer) about the scene; the family is drawn from those that fit it."""
    fams = ["caption", "sentence"]
    if scene.kind == "text":
        fams += ["read"] * 5 + ["mcq_read"] * 2
    elif scene.kind == "empty":
        fams += ["colour_unans"] * 4 + ["yesno"]
    else:
        one_kind = len({_thing_phrase(t) for t in scene.things}) == 1
        fams += ["yesno", "yesno", "count_all"]
        if one_kind:
            fams += ["count"] * 2 + ["mcq_count"]
        if len(scene.things) == 1:
            fams += ["name", "group", "region", "box", "mcq_name", "mcq_region"]
            if scene.things[0].kind == "shape":
                fams += ["colour_unans", "colour_unans", "mcq_colour"]
        else:
            unique = [t for t in scene.things if sum(_thing_phrase(u) == _thing_phrase(t) for u in scene.things) == 1]
            if unique:
                fams += ["region_multi", "box_multi"]
    fam = rng.choice(fams)
    if fam == "caption":
        return (fam, *(_pick(rng, CAPTION_QS), caption(scene)))
    if fam == "sentence":
        return (fam, *(_pick(rng, SENTENCE_QS), "The picture shows " + caption(scene)[0].lower() + caption(scene)[1:]))
    if fam == "read":
        return (fam, *(_pick(rng, READ_QS), scene.text))
    if fam == "mcq_read":
        return (fam, *(_mcq(rng, "Which word is written in the image?", scene.text, WORDS)))
    if fam == "colour_unans":
        x = scene.things[0].name if scene.things else rng.choice(SHAPE_KINDS + ["object", "animal", "car"])
        answer = scene.things[0].colour if scene.things else UNANSWERABLE
        inline = _pick(rng, UNANS_HINTS) if rng.random() < 0.5 else ""
        return (fam, *(_pick(rng, COLOUR_QS).format(x=x) + inline, answer))
    if fam == "yesno":
        present = {t.name for t in scene.things}
        if scene.things and rng.random() < 0.5:
            return (fam, *(_pick(rng, YESNO_QS).format(a=_article(rng.choice(sorted(present)))), "yes"))
        absent = rng.choice([s for s in SHAPE_KINDS + ["dog", "car", "tree", "house", "person"] if s not in present])
        return (fam, *(_pick(rng, YESNO_QS).format(a=_article(absent)), "no"))
    t = scene.things[0]
    if fam == "count":
        n = len(scene.things)
        noun = _plural(_thing_phrase(t), 2)
        return (fam, *(_pick(rng, COUNT_QS).format(xs=noun), str(n)))
    if fam == "count_all":
        return (fam, *(_pick(rng, COUNT_ALL_QS), str(len(scene.things))))
    if fam == "name":  # the noun: a red star is "star" (its colour has its own questions)
        return (fam, *(_pick(rng, NAME_QS), t.name))
    if fam == "group":
        return (fam, *(_pick(rng, GROUP_QS), t.group))
    if fam == "region":
        return (fam, *(_pick(rng, REGION_QS).format(x=_thing_phrase(t)), region_of(t.box)))
    if fam == "box":
        return (fam, *(_pick(rng, BOX_QS).format(x=_thing_phrase(t)), format_box(t.box)))
    if fam == "mcq_count":
        return (fam, *_mcq(rng, f"How many {_plural(_thing_phrase(t), 2)} are there?", str(len(scene.things)),
                           [str(k) for k in range(1, 7)]))
    if fam == "mcq_region":
        return (fam, *_mcq(rng, f"In what part of the picture is the {_thing_phrase(t)}?", region_of(t.box), REGIONS))
    if fam == "mcq_colour":
        return (fam, *_mcq(rng, f"What colour is the {t.name}?", t.colour, list(PALETTE)))
    if fam == "mcq_name":
        if t.kind == "shape":
            return (fam, *(_mcq(rng, "What shape is shown?", t.shape, SHAPE_KINDS)))
        _, sprites = image_pack.load()
        pool = sorted({readable_name(s) for s in sprites if s.group == t.group} |
                      {readable_name(s) for s in rng.sample(sprites, 20)})
        return (fam, *(_mcq(rng, "What is in the picture?", t.name, pool)))
    # region_multi / box_multi: about one uniquely described thing among several
    unique = [u for u in scene.things if sum(_thing_phrase(v) == _thing_phrase(u) for v in scene.things) == 1]
    u = rng.choice(unique)
    if fam == "region_multi":
        return (fam, *(_pick(rng, REGION_QS).format(x=_thing_phrase(u)), region_of(u.box)))
    return (fam, *(_pick(rng, BOX_QS).format(x=_thing_phrase(u)), format_box(u.box)))


def _mcq(rng, question: str, answer: str, pool: list[str]) -> tuple[str, str]:
    k = rng.randint(3, 5)
    options = rng.sample([p for p in pool if p != answer], min(k - 1, len(pool) - 1)) + [answer]
    rng.shuffle(options)
    listing = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return _pick(rng, MCQ_QS).format(q=question, options=listing), LETTERS[options.index(answer)]


def sample(rng: random.Random, draw=render) -> tuple[Image.Image, str, str]:
    image, turns = sample_turns(rng, 1, draw)
    return image, *turns[0]


def sample_turns(rng: random.Random, k: int, draw=render) -> tuple[Image.Image, list[tuple[str, str]]]:
    """One scene asked up to `k` questions of different answer families: a multi-turn record (as LLaVA's own
    instruction data is), so a model pays the image's tokens once for k answers. k = 1 draws what `sample` draws.
    `draw` turns the scene into the record's image (`keep_scene`: the scene itself; it draws nothing from `rng`)."""
    scene = sample_scene(rng)
    while scene.kind == "objects" and not scene.things:
        scene = sample_scene(rng)
    turns, families = [], set()
    for _ in range(4 * k):
        question, answer = _ask(rng, scene)
        if (kind := family(question, answer)) not in families:
            families.add(kind)
            turns.append((question, answer))
        if len(turns) == k:
            break
    return draw(scene), turns


# --------------------------------------------------------------------------- alignment (LLaVA's stage 1, shrunk)
# One fixed question per visual attribute, short answers. Measured (`python -m experiments.grounding`): a fresh LM
# on the frozen tower learns "what colour is the star" alone to ~95% in 400 steps; a mix of four attributes from the
# start stays at the answer priors at lr 3e-3 and is learned at 5e-4 (61.5% in 800 steps). `build_base_v2` aligns on
# all six attributes at 5e-4 before the instructions.
ATTRIBUTES = ("colour", "shape", "group", "read", "region", "count")
ATTRIBUTE_QUESTIONS = {"colour": "What colour is the {shape}?", "shape": "What shape is this?",
                       "group": "What kind of thing is this?", "read": "What does the text say?",
                       "region": "Where is the {thing}?", "count": "How many {things} are there?"}


def attribute_sample(rng: random.Random, attributes, draw=render) -> tuple[Image.Image, str, str]:
    """(image, question, answer) for one attribute drawn from `attributes`: one shape or sprite anywhere, a word, or
    1-6 copies of one thing (count), on plain / gradient / textured backgrounds. `draw`: as `sample_turns`."""
    _, sprites = image_pack.load()
    attribute = rng.choice(list(attributes))
    background = rng.choice(["plain", "plain", "gradient", "texture"])
    question = ATTRIBUTE_QUESTIONS[attribute]
    if attribute == "read":
        scene = Scene("text", background, text=rng.choice(WORDS), font=rng.choice(FONTS), seed=rng.getrandbits(31))
        return draw(scene), question, scene.text
    if attribute == "count":
        n, size = rng.randint(1, 6), rng.randint(12, 22)
        idx, shape, colour = rng.randrange(len(sprites)), rng.choice(SHAPE_KINDS), rng.choice(list(PALETTE))
        use_sprite, things = rng.random() < 0.5, []
        for _ in range(n):
            box = _free_box(rng, size, [t.box for t in things])
            if box:
                things.append(_sprite_thing(rng, idx, box) if use_sprite else _shape_thing(rng, box, shape, colour))
        scene = Scene("objects", background, things=things, seed=rng.getrandbits(31))
        return draw(scene), question.format(things=_plural(_thing_phrase(things[0]), 2)), str(len(things))
    box = _free_box(rng, rng.randint(24, 56), [])
    sprite = attribute == "group" or (attribute == "region" and rng.random() < 0.5)
    thing = _sprite_thing(rng, rng.randrange(len(sprites)), box) if sprite else _shape_thing(rng, box)
    scene = Scene("objects", background, things=[thing], seed=rng.getrandbits(31))
    answer = {"colour": thing.colour, "shape": thing.shape, "group": thing.group, "region": region_of(thing.box)}
    return draw(scene), question.format(shape=thing.shape, thing=_thing_phrase(thing)), answer[attribute]


def write_attribute_set(out_dir, attributes, n_train: int, n_test: int, seed: int = 0) -> Path:
    """<out_dir>/{train,test}: attribute questions in equal shares (atomic per split)."""
    from .coin_mini import write_split

    out_dir = Path(out_dir)
    for split, n, s in (("train", n_train, 0), ("test", n_test, 1)):
        rng = random.Random(seed * 1000 + 77 + s)
        write_split(out_dir / split, [attribute_sample(rng, attributes) for _ in range(n)], f"attr-{split}")
    return out_dir


def all_texts(seed: int = 0, n: int = 4000) -> list[str]:
    """Questions and answers of n samples (the tokenizer corpus), without rendering."""
    rng = random.Random(seed * 7919 + 5)
    texts = []
    for _ in range(n):
        scene = sample_scene(rng)
        if scene.kind == "objects" and not scene.things:
            continue
        q, a = _ask(rng, scene)
        texts += [q, a]
    _, sprites = image_pack.load()
    return texts + sorted({readable_name(s) for s in sprites}) + WORDS


def keep_scene(scene: Scene) -> Scene:
    """A `draw` that renders nothing: the record's 'image' is its scene (the facts a perfect eye would read)."""
    return scene


def mixture_draws(split: str, n: int, seed: int = 0, rehearsal: float = 0.0, turns: int = 1, draw=render) -> list:
    """The records of one split of the v2 mixture, in order: (image, question, answer), or (image, turns) when a
    training split asks several questions an image. With `draw=keep_scene` the same records carry their scenes
    instead of pixels (the draws are identical: rendering takes nothing from the generator)."""
    rng = random.Random(seed * 1000 + 700 + (split == "test"))
    share = rehearsal if split == "train" else 0.0
    asked = turns if split == "train" else 1
    return [attribute_sample(rng, ATTRIBUTES, draw) if share and rng.random() < share
            else sample(rng, draw) if asked == 1 else sample_turns(rng, asked, draw) for _ in range(n)]


def write_mixture(out_root, seed: int = 0, n_train: int = 16000, n_test: int = 300,
                  splits=("train", "test"), rehearsal: float = 0.0, turns: int = 1) -> Path:
    """<out_root>/base/{train,test} in LLaVA conversation format (atomic per split; each split has its own seed).

    `rehearsal`: that fraction of the *training* records are attribute questions (all attributes), so the
    instruction phase keeps what the alignment phases grounded; the test split is instructions only. `turns`: up to
    that many questions per training image (`sample_turns`); the test split stays one question per image.
    """
    from .coin_mini import write_split  # the file writer only: LLaVA JSON + PNGs, atomic

    base_dir = Path(out_root) / "base"
    for split, n in (("train", n_train), ("test", n_test)):
        if split in splits:
            write_split(base_dir / split, mixture_draws(split, n, seed, rehearsal, turns), f"base-{split}")
    return base_dir


# --------------------------------------------------------------------------- on disk

N_TRAIN = 16000
N_TEST = 300


def ensure_mixture(registry, seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST,
                   splits=("train", "test"), rehearsal: float = 0.0, turns: int = 1) -> Path:
    """The v2 instruction mixture on disk (each split written once per seed, size, rehearsal share and turns)."""
    name = (f"base-v2-mixture-d{DATA_VERSION}-seed{seed}" + (f"-rehearsal{rehearsal:g}" if rehearsal else "")
            + (f"-turns{turns}" if turns > 1 else ""))
    root = registry.home / "datasets" / name
    for split, n in (("train", n_train), ("test", n_test)):
        stamp = root / "base" / f"{split}.size"
        if split in splits and not (stamp.is_file() and stamp.read_text() == str(n)):
            write_mixture(root, seed=seed, n_train=n_train, n_test=n_test, splits=(split,),
                          rehearsal=rehearsal, turns=turns)
            stamp.write_text(str(n))
    return root


def ensure_alignment(registry, seed: int, attributes, n_train: int, n_test: int = 200) -> Path:
    """One alignment phase's attribute set on disk (written once per seed, attributes and size)."""
    root = registry.home / "datasets" / f"base-v2-align-seed{seed}-{'+'.join(attributes)}-{n_train}"
    if not (root / "test" / "data.json").is_file():
        write_attribute_set(root, attributes, n_train, n_test, seed)
    return root


def family(question: str, answer: str) -> str:
    """The answer family of a test record (from this world's templates; v1's three tasks by their answers)."""
    if "\nA." in question or "Options:" in question:
        return "mcq"
    first = question.split("\n")[0]
    if first == ATTRIBUTE_QUESTIONS["shape"]:
        return "shape"
    if first == ATTRIBUTE_QUESTIONS["group"]:
        return "group"
    for name, qs in (("caption", CAPTION_QS), ("sentence", SENTENCE_QS), ("name", NAME_QS),
                     ("group", GROUP_QS), ("read", READ_QS)):
        if first in qs:
            return name
    if answer.startswith("["):
        return "box"
    if answer in REGIONS:
        return "region"
    if answer in ("yes", "no"):
        return "yesno"
    if answer.isdigit():
        return "count"
    if answer in PALETTE or answer == UNANSWERABLE:
        return "colour"
    if answer.endswith("."):
        return "caption"
    return "other"

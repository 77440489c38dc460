"""Tests for the procedural CoIN-mini generator (fast: small n everywhere)."""

import collections
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from llaca.data import coin_mini as cm
from llaca.evaluation.metrics import box_iou


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(tmp_path):
    for name in ("gqa", "textvqa", "vizwiz"):
        cm.write_task(tmp_path / "a", name, n_train=12, n_test=4, seed=3)
        cm.write_task(tmp_path / "b", name, n_train=12, n_test=4, seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 3 * (2 + 16)
    assert a == b


def test_different_seed_or_split_differs(tmp_path):
    cm.write_task(tmp_path / "a", "imagenet", n_train=8, n_test=8, seed=0)
    cm.write_task(tmp_path / "b", "imagenet", n_train=8, n_test=8, seed=1)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a["imagenet/train/data.json"] != b["imagenet/train/data.json"]
    assert a["imagenet/train/images/00000.png"] != b["imagenet/train/images/00000.png"]
    assert a["imagenet/train/images/00000.png"] != a["imagenet/test/images/00000.png"]


def test_split_seeds_are_unique():
    seeds = [cm.split_seed(s, t, sp) for s in range(3) for t in cm.ALL_TASKS for sp in cm.SPLITS]
    assert len(seeds) == len(set(seeds))


# ----------------------------------------------------------------- answer spaces

BOX_RE = re.compile(r"\[(\d\.\d),(\d\.\d),(\d\.\d),(\d\.\d)\]")  # 1 decimal: see coin_mini.format_box
SPACES = {
    "sciqa": set(cm.LETTERS),
    "textvqa": set(cm.WORDS),
    "imagenet": set(cm.SHAPES),
    "gqa": set(cm.QUADRANTS),
    "vizwiz": set(cm.COLOURS) | {"unanswerable"},
    "vqav2": {"1", "2", "3", "4"},
    "ocrvqa": set(cm.WORDS),
    "colour_qa": set(cm.COLOURS),
    "shape_qa": set(cm.SHAPES),
}


def _answers(name, n, seed=0):
    rng = random.Random(seed)
    return [cm.get_task(name).sample_scene(rng) for _ in range(n)]


def test_task_order_and_interface():
    assert cm.DEFAULT_SEQUENCE == ["sciqa", "textvqa", "imagenet", "gqa", "vizwiz",
                                   "grounding", "vqav2", "ocrvqa"]
    assert list(cm.BASE_TASKS) == ["caption", "colour_qa", "shape_qa"]
    for task in cm.ALL_TASKS.values():
        img, q, a = task.sample(random.Random(0))
        assert img.size == (64, 64) and img.mode == "RGB"
        assert q and a and task.coin_analogue and task.answer_format


@pytest.mark.parametrize("name", sorted(cm.ALL_TASKS))
def test_answers_in_declared_space(name):
    task = cm.get_task(name)
    for scene, q, a in _answers(name, 150):
        assert re.fullmatch(task.answer_regex, a), (name, a)
        if name in SPACES:
            assert a in SPACES[name]
        elif name == "grounding":
            x1, y1, x2, y2 = map(float, BOX_RE.fullmatch(a).groups())
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        elif name == "caption":
            assert a == cm.describe(scene)


def test_answers_match_scene():
    for scene, q, a in _answers("sciqa", 50):
        options = dict(re.findall(r"^([A-D])\. (\w+)$", q, re.M))
        assert sorted(options.values()) == sorted(cm.SHAPES)
        assert options[a] == scene.objects[0].shape
    for scene, q, a in _answers("gqa", 50):
        colour, shape = re.search(r"Where is the (\w+) (\w+)\?", q).groups()
        [target] = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
        assert target.quadrant == a
    for scene, _, a in _answers("vqav2", 50):
        assert int(a) == len(scene.objects) and len({o.quadrant for o in scene.objects}) == int(a)
    for scene, _, a in _answers("vizwiz", 100):
        assert (a == "unanswerable") == (scene.kind in ("blank", "noise"))
    obj = cm.Obj("circle", "red", "top left", (1, 1, 20, 20))
    obj2 = cm.Obj("square", "blue", "top right", (33, 1, 52, 20))
    centred = cm.Obj("cross", "green", None, (20, 20, 44, 44))
    assert cm.caption_text([centred]) == "A green cross."
    assert cm.caption_text([obj, obj2]) == "A red circle in the top left and a blue square in the top right."
    kinds = {}
    for scene, _, a in _answers("caption", 200):
        kinds.setdefault(scene.kind, a)
    assert {"multi", "shape", "word", "book", "blank", "noise"} <= set(kinds)
    assert kinds["blank"] == "A blank image." and kinds["noise"] == "Random noise."
    assert re.fullmatch(r"The word \w+\.", kinds["word"]) and " book titled " in kinds["book"]


def test_prompts_use_declared_wording():
    _, q, _ = _answers("vizwiz", 1)[0]
    assert q == cm.VIZWIZ_Q and "'Unanswerable'" in q
    _, q, _ = _answers("sciqa", 1)[0]
    assert q.endswith("Answer with the option's letter from the given choices directly.")
    _, q, _ = _answers("grounding", 1)[0]
    assert re.fullmatch(r"Please provide the bounding box coordinate of the region this sentence "
                        r"describes: \w+ \w+\.", q)


# ----------------------------------------------------------------- geometry


def _mask(img, colour):
    return (np.asarray(img) == np.array(cm.COLOURS[colour])).all(-1)


def test_grounding_box_surrounds_object():
    rng = random.Random(7)
    for _ in range(60):
        scene, q, a = cm.TASKS["grounding"].sample_scene(rng)
        colour, shape = re.search(r"describes: (\w+) (\w+)\.$", q).groups()
        x1, y1, x2, y2 = (float(v) * 64 for v in BOX_RE.fullmatch(a).groups())
        mask = _mask(cm.render(scene), colour)
        ys, xs = np.nonzero(mask)
        # the object's pixel extent is the box up to the 1-decimal rounding (half of 0.1 x 64 px = 3.2 px)
        assert abs(xs.min() - x1) <= 3.2 and abs(xs.max() + 1 - x2) <= 3.2, (a, xs.min(), xs.max())
        assert abs(ys.min() - y1) <= 3.2 and abs(ys.max() + 1 - y2) <= 3.2, (a, ys.min(), ys.max())
        target = next(o for o in scene.objects if (o.colour, o.shape) == (colour, shape))
        # the rounded gold still counts as the object under the metric (IoU > 0.5)
        assert box_iou([v / 64 for v in target.box], [x1 / 64, y1 / 64, x2 / 64, y2 / 64]) > 0.5


def test_objects_stay_inside_their_quadrant():
    rng = random.Random(1)
    for _ in range(200):
        scene = cm.SCENE_SAMPLERS["multi"](rng)
        for o in scene.objects:
            qi = cm.QUADRANTS.index(o.quadrant)
            ox, oy = (qi % 2) * 32, (qi // 2) * 32
            x1, y1, x2, y2 = o.box
            assert ox < x1 < x2 < ox + 32 and oy < y1 < y2 < oy + 32
            assert 18 <= x2 - x1 <= 26 and x2 - x1 == y2 - y1


def test_text_is_drawn_and_dark_on_light():
    for name in ("textvqa", "ocrvqa"):
        for scene, _, _ in _answers(name, 10):
            img = cm.render(scene)
            plain = cm.render(cm.Scene(**{**scene.__dict__, "word": None}))
            changed = (np.asarray(img) != np.asarray(plain)).any(-1)
            assert 40 < changed.sum() < 1500  # a word, not nothing and not the whole image


# ----------------------------------------------------------------- class balance


@pytest.mark.parametrize("name,classes", [
    ("sciqa", cm.LETTERS), ("textvqa", cm.WORDS), ("imagenet", cm.SHAPES), ("gqa", cm.QUADRANTS),
    ("vqav2", ["1", "2", "3", "4"]), ("ocrvqa", cm.WORDS), ("colour_qa", list(cm.COLOURS)),
])
def test_class_balance(name, classes):
    n = 60 * len(classes)
    counts = collections.Counter(a for _, _, a in _answers(name, n))
    assert set(counts) == set(classes)
    assert all(30 <= c <= 90 for c in counts.values()), counts


def test_vizwiz_unanswerable_share():
    counts = collections.Counter(a for _, _, a in _answers("vizwiz", 600))
    assert 130 <= counts["unanswerable"] <= 230
    assert len(counts) == 7


# ----------------------------------------------------------------- files on disk


def _check_split(split_dir, prefix, n):
    data = json.loads((split_dir / "data.json").read_text())
    assert len(data) == n
    for i, rec in enumerate(data):
        assert rec["id"] == f"{prefix}-{i:05d}" and rec["image"] == f"images/{i:05d}.png"
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        with Image.open(split_dir / rec["image"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    return data


def test_write_coin_mini_layout(tmp_path):
    dirs = cm.write_coin_mini(tmp_path, seed=0, n_train=5, n_test=3)
    assert [d.name for d in dirs] == cm.DEFAULT_SEQUENCE
    for d in dirs:
        _check_split(d / "train", f"{d.name}-train", 5)
        _check_split(d / "test", f"{d.name}-test", 3)
    assert not [p for p in tmp_path.rglob(".*")]  # no leftover temp dirs


def test_write_split_overwrites_atomically(tmp_path):
    recs = cm.make_records("vqav2", 4, seed=0)
    cm.write_split(tmp_path / "s", recs, "x")
    cm.write_split(tmp_path / "s", recs[:2], "x")
    assert len(json.loads((tmp_path / "s" / "data.json").read_text())) == 2
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == ["00000.png", "00001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_base_mixture(tmp_path):
    base = cm.write_base_mixture(tmp_path, seed=0, n_train=31, n_test=7)
    data = _check_split(base / "train", "base-train", 31)
    _check_split(base / "test", "base-test", 7)
    questions = [r["conversations"][0]["value"] for r in data]
    assert sum(q == "<image>\n" + cm.CAPTION_Q for q in questions) == 11
    assert sum(q == "<image>\n" + cm.SHAPE_QA_Q for q in questions) == 10
    assert sum(q.startswith("<image>\nWhat color is the ") for q in questions) == 10
    assert questions[:11] != ["<image>\n" + cm.CAPTION_Q] * 11  # shuffled, not concatenated


def test_all_texts_cover_every_task():
    texts = cm.all_texts(seed=0, n=20)
    assert len(texts) == 2 * 20 * len(cm.ALL_TASKS)
    joined = "\n".join(texts)
    for marker in ("option's letter", "word is written", "object in the image", "region name",
                   "'Unanswerable'", "bounding box", "How many", "title of this book",
                   "Describe the image", "What color is the", "What shape is this?"):
        assert marker in joined


# ----------------------------------------------------------------- vision pre-training labels


def test_aux_labels_of_known_scene():
    scene = cm.Scene("multi", cm.WHITE, [
        cm.Obj("cross", "orange", "bottom right", (40, 40, 60, 60)),
        cm.Obj("circle", "red", "top left", (2, 2, 22, 22)),
    ])
    labels = cm.aux_labels(scene)
    assert labels["q0_shape"] == 1 and labels["q0_colour"] == 1
    assert labels["q3_shape"] == 4 and labels["q3_colour"] == 6
    assert labels["q1_shape"] == labels["q2_colour"] == 0
    assert labels["count"] == 2 and labels["shape"] == 0 and labels["word"] == 0 and labels["kind"] == 0
    single = cm.Scene("shape", cm.WHITE, [cm.Obj("square", "blue", None, (20, 20, 40, 40))])
    assert cm.aux_labels(single)["shape"] == 2 and cm.aux_labels(single)["colour"] == 3
    assert cm.aux_labels(cm.Scene("noise", (0, 0, 0)))["kind"] == 2
    assert cm.aux_labels(cm.Scene("word", cm.WHITE, word="owl"))["word"] == 12


def test_aux_batch_covers_all_kinds():
    import torch

    images, labels = cm.aux_batch(random.Random(0), 320)
    assert len(images) == 320 and all(im.size == (64, 64) for im in images)
    assert set(labels) == set(cm.AUX_HEADS)
    for head, n_classes in cm.AUX_HEADS.items():
        t = labels[head]
        assert t.dtype == torch.long and t.shape == (320,)
        assert 0 <= int(t.min()) and int(t.max()) < n_classes
    for head in ("word", "kind", "count", "shape", "q0_shape", "q3_colour"):
        assert len(set(labels[head].tolist())) == cm.AUX_HEADS[head], head
    again, labels2 = cm.aux_batch(random.Random(0), 320)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    assert all(torch.equal(labels[h], labels2[h]) for h in labels)

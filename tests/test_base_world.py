"""Base v2's pre-training world: real images, every answer format, deterministic, and nothing of CoIN-mini."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from llaca.data import coin_mini, image_pack
from llaca.data import world as bw

FORMATS = {  # answer format -> full-match regex; every one must occur in the instruction data
    "option letter": r"[A-E]",
    "region name": "|".join(bw.REGIONS),
    "colour": "|".join(bw.PALETTE),
    "unanswerable": bw.UNANSWERABLE,
    "box": r"\[(?:0\.\d|1\.0)(?:,(?:0\.\d|1\.0)){3}\]",
    "count": r"[1-6]",
    "yes/no": "yes|no",
    "word (title, text)": "|".join(bw.WORDS),
    "sentence": r"(?:The picture shows|An?|The|One|Two|Three|Four|Five|Six) .+\.",
}


@pytest.fixture(scope="module")
def samples():
    rng = random.Random(11)
    return [bw.sample(rng) for _ in range(800)]


def test_image_pack_is_real_and_categorised():
    pixels, sprites = image_pack.load()
    assert pixels.shape == (len(sprites), 64, 64, 4) and pixels.dtype == np.uint8
    assert {s.source for s in sprites} == {"openclipart", "emoji"}
    assert len({s.label for s in sprites if s.source == "openclipart"}) >= 50
    opaque = (pixels[..., 3] > 0).mean(axis=(1, 2))
    assert (opaque > 0).all(), "every sprite shows something"
    assert (opaque > 0.02).mean() > 0.99, "and almost all more than a few thin lines"


def test_every_answer_format_occurs(samples):
    answers = [a for _, _, a in samples]
    for name, rx in FORMATS.items():
        assert any(re.fullmatch(rx, a) for a in answers), name
    questions = {q for _, q, _ in samples}
    assert len(questions) > 200, "many phrasings, not a handful of templates"


def test_same_seed_same_data():
    a = [bw.sample(random.Random(5)) for _ in range(3)]
    b = [bw.sample(random.Random(5)) for _ in range(3)]
    for (ia, qa, aa), (ib, qb, ab) in zip(a, b):
        assert (qa, aa) == (qb, ab) and ia.tobytes() == ib.tobytes()


def test_no_coin_mini_template_or_answer_pattern_in_base_texts(samples):
    """CoIN-mini's tasks must stay new: none of their instructions may appear in base training."""
    texts = set(bw.all_texts(0, n=2000)) | {q for _, q, _ in samples}
    rng = random.Random(0)
    coin_questions = {task.sample_scene(rng)[1] for task in coin_mini.TASKS.values() for _ in range(20)}
    for q in coin_questions:
        first_line = q.split("\n")[0]
        assert not any(first_line in t for t in texts), q
    for hint in ("Answer with the option's letter from the given choices directly.",
                 "Answer the question using a single word or phrase.", "Answer with the region name.",
                 "Please provide the bounding box coordinate"):
        assert not any(hint in t for t in texts), hint


def test_aux_labels_match_the_scene():
    rng = random.Random(3)
    heads = bw.aux_heads()
    for _ in range(300):
        scene = bw.sample_scene(rng)
        labels = bw.aux_labels(scene)
        assert set(labels) == set(heads)
        for h, v in labels.items():
            assert v == -100 or 0 <= v < heads[h], (h, v)
        assert labels["count"] == min(len(scene.things), 6)
        if scene.kind == "text":
            assert bw.WORDS[labels["word"] - 1] == scene.text
        if len(scene.things) == 1:
            assert bw.REGIONS[labels["region"] - 1] == bw.region_of(scene.things[0].box)


def test_dense_labels_name_what_each_patch_shows():
    """Per-token labels for the tower: the thing covering most of a patch, a small thing's centre patch, else
    background; a text scene's word on every token; an empty frame everywhere."""
    _, sprites = image_pack.load()
    labels, groups = bw._sprite_labels()
    star = bw.Thing("shape", "star", "shape", (0, 0, 32, 32), colour="red", shape="star")
    small = bw.Thing("sprite", "x", sprites[5].group, (40, 40, 52, 52), sprite=5)  # 12 px, centre in patch (2, 2)
    d = bw.dense_labels(bw.Scene("objects", "plain", things=[star, small]), grid=4)
    heads = bw.dense_heads()
    assert set(d) == set(heads) and all(len(v) == 16 for v in d.values())
    star_patches, small_patch = {0, 1, 4, 5}, 2 * 4 + 2
    for i in range(16):
        if i in star_patches:
            assert (d["patch_group"][i], d["patch_shape"][i], d["patch_colour"][i]) == (
                len(groups), bw.SHAPE_KINDS.index("star"), list(bw.PALETTE).index("red"))
            assert d["patch_label"][i] == -100
        elif i == small_patch:
            assert d["patch_group"][i] == groups[sprites[5].group]
            assert d["patch_label"][i] == labels[sprites[5].label] and d["patch_shape"][i] == -100
        else:
            assert d["patch_group"][i] == len(groups) + 3 and d["patch_label"][i] == -100
    text = bw.dense_labels(bw.Scene("text", "plain", text="owl"), grid=4)
    assert text["patch_word"] == [bw.WORDS.index("owl")] * 16 and text["patch_group"] == [len(groups) + 1] * 16
    assert bw.dense_labels(bw.Scene("empty", "dark"), grid=2)["patch_group"] == [len(groups) + 2] * 4
    rng = random.Random(0)
    for _ in range(200):
        for h, vs in bw.dense_labels(bw.sample_scene(rng), grid=4).items():
            assert all(v == -100 or 0 <= v < heads[h] for v in vs), h


def test_dense_labels_do_not_change_the_scene_stream():
    """Asking for per-token labels draws the same scenes (the shipped base's build stays bit-identical)."""
    images, plain = bw.aux_batch(random.Random(0), 8)
    again, dense = bw.aux_batch(random.Random(0), 8, dense_grid=4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    assert all(plain[k].equal(dense[k]) for k in plain)
    assert dense["patch_group"].shape == (8, 16)


def test_box_and_region_are_computed_from_pixels():
    assert bw.format_box((0, 32, 32, 64)) == "[0.0,0.5,0.5,1.0]"
    assert bw.region_of((0, 0, 10, 10)) == "top left"
    assert bw.region_of((27, 27, 37, 37)) == "center"
    assert bw.region_of((54, 54, 64, 64)) == "bottom right"


def test_digits_heldout_set_is_written_split_by_image(tmp_path):
    from llaca.data import heldout, load_instruction_set

    (root,) = heldout.write_sets(tmp_path, ["digits"])
    train, test = load_instruction_set(str(root / "train")), load_instruction_set(str(root / "test"))
    assert (len(train.records), len(test.records)) == (1400, 397)
    answers = {r.answer for r in train.records}
    assert answers == {str(d) for d in range(10)}


def test_build_base_v2_registers_beside_base(tmp_path):
    """`build-base --recipe v2` (tiny step counts): a root version `base-v2` with the v2 spec and its own test split."""
    from llaca.bases import tiny as base_build_v2
    from llaca.bench.quality import base_test_split
    from llaca.versions import Registry, load_version

    reg = Registry(tmp_path / "home")
    v = base_build_v2.build_base_v2(reg, vision_steps=3, base_steps=3, n_train=24, n_test=6, align_steps=2,
                                    align_records=12)
    assert v.id == "base-v2" and v.meta["parent"] is None and v.meta["build"]["world"] == "v2"
    phases = v.meta["build"]["phases"]  # the alignment phase(s), then the instructions, each with its test score
    assert [p["steps"] for p in phases] == [2] * len(base_build_v2.ALIGN_PHASES) + [3]
    assert phases[-1]["data"] == "base" and v.meta["build"]["lr"] == base_build_v2.BASE_LR
    assert all(0 <= p["test_accuracy"] <= 100 for p in phases)
    assert v.meta["build"]["spec"] == base_build_v2.SPEC.__dict__ and not reg.exists("base")
    model, processor = load_version(reg, "base-v2")
    assert model.config.vision_config.hidden_size == 128
    assert len(processor.tokenizer) == model.config.text_config.vocab_size <= base_build_v2.SPEC.vocab_size
    test = base_test_split(reg, v)
    assert test.endswith("base/test") and (Path(test) / "data.json").is_file()


def test_attribute_questions_are_well_formed():
    """Alignment data: each attribute's fixed question with a well-formed answer."""
    import random

    rng = random.Random(0)
    for attribute in bw.ATTRIBUTES:
        image, question, answer = bw.attribute_sample(rng, [attribute])
        assert image.size == (64, 64) and "{" not in question
        ok = {"colour": answer in bw.PALETTE, "shape": answer in bw.SHAPE_KINDS,
              "read": answer in bw.WORDS, "region": answer in bw.REGIONS,
              "count": answer.isdigit() and 1 <= int(answer) <= 6, "group": answer.islower()}[attribute]
        assert ok, (attribute, question, answer)


def test_multi_turn_records_ask_one_scene_different_families_and_round_trip(tmp_path):
    from llaca.data import load_instruction_set

    rng_a, rng_b = random.Random(5), random.Random(5)
    for _ in range(20):  # one question: exactly what `sample` draws (the shipped builds' mixture is unchanged)
        image, turns = bw.sample_turns(rng_a, 1)
        image_b, question, answer = bw.sample(rng_b)
        assert turns == [(question, answer)] and np.array_equal(np.asarray(image), np.asarray(image_b))
    rng = random.Random(3)
    records = [bw.sample_turns(rng, 3) for _ in range(40)]
    sizes = [len(turns) for _, turns in records]
    assert max(sizes) == 3 and min(sizes) >= 2  # every scene kind fits at least two families
    for _, turns in records:
        families = [bw.family(q, a) for q, a in turns]
        assert len(set(families)) == len(families)
    bw.write_mixture(tmp_path, seed=1, n_train=12, n_test=6, rehearsal=0.0, turns=3)
    train = load_instruction_set(tmp_path / "base" / "train").records
    test = load_instruction_set(tmp_path / "base" / "test").records
    assert all(len(r.turns) >= 2 for r in train) and all(len(r.turns) == 1 for r in test)
    single = tmp_path / "single"
    bw.write_mixture(single, seed=1, n_train=12, n_test=6, splits=("test",))
    assert [r.turns for r in load_instruction_set(single / "base" / "test").records] == [r.turns for r in test]


def test_patch_words_say_what_each_image_token_shows():
    """Fact alignment's targets (`small_build.fact_align`): a shape's colour and shape, a drawing's name and group on
    the patches it owns, the written word on every patch of a text scene, nothing on background or empty frames."""
    star = bw.Thing("shape", "star", "shape", (0, 0, 32, 32), colour="red", shape="star")
    dog = bw.Thing("sprite", "dog", "animal", (40, 40, 60, 60), sprite=0)  # 400 px of the bottom-right 32 px patch
    assert bw.patch_words(bw.Scene("objects", "plain", things=[star, dog]), grid=2) == [
        ["red", "star"], [], [], ["dog", "animal"]]
    assert bw.patch_words(bw.Scene("text", "plain", text="owl"), grid=2) == [["owl"]] * 4
    assert bw.patch_words(bw.Scene("empty", "dark"), grid=2) == [[]] * 4


def test_a_centre_word_marks_each_thing_once_whatever_its_size():
    """With `centre_word`, one big star over four patches and two small stars carry the word on three patches: the
    things can be counted off the patches, which the words alone (on all six patches) do not allow."""
    def star(box):
        return bw.Thing("shape", "star", "shape", box, colour="red", shape="star")

    scene = bw.Scene("objects", "plain", things=[star((0, 0, 32, 32)), star((40, 0, 52, 12)), star((40, 40, 52, 52))])
    words = bw.patch_words(scene, grid=4, centre_word="one")
    assert [i for i, w in enumerate(words) if w == ["red", "star", "one"]] == [2, 5, 10]
    assert [i for i, w in enumerate(words) if w == ["red", "star"]] == [0, 1, 4]
    assert sum(w.count("one") for w in words) == len(scene.things)
    assert bw.patch_words(scene, grid=4) == [w[:2] for w in words]  # without it: the words alone
    assert bw.patch_words(bw.Scene("text", "plain", text="owl"), grid=2, centre_word="one") == [["owl"]] * 4


def test_a_count_word_says_the_scenes_number_of_things_on_every_patch_a_thing_owns():
    """With `count_word`, each patch of each of three stars also says "three" (what every counting question of the
    world answers); background patches stay empty and a text scene keeps its word alone."""
    def star(box):
        return bw.Thing("shape", "star", "shape", box, colour="red", shape="star")

    scene = bw.Scene("objects", "plain", things=[star((0, 0, 32, 32)), star((40, 0, 52, 12)), star((40, 40, 52, 52))])
    words = bw.patch_words(scene, grid=4, count_word=True)
    assert [i for i, w in enumerate(words) if w] == [0, 1, 2, 4, 5, 10]
    assert all(w == ["red", "star", "three"] for w in words if w)
    one = bw.Scene("objects", "plain", things=[star((0, 0, 32, 32))])
    assert [w for w in bw.patch_words(one, grid=2, count_word=True) if w] == [["red", "star", "one"]]
    assert bw.patch_words(bw.Scene("text", "plain", text="owl"), grid=2, count_word=True) == [["owl"]] * 4
    both = bw.patch_words(scene, grid=4, centre_word="one", count_word=True)
    assert both[2] == ["red", "star", "three", "one"] and both[0] == ["red", "star", "three"]


def test_mixture_scenes_are_the_scenes_of_the_written_records(tmp_path):
    """Replaying the mixture without pixels gives, record for record, the written question, answer and image."""
    from llaca.data import load_image, load_instruction_set

    bw.write_mixture(tmp_path, seed=2, n_train=10, n_test=4, rehearsal=0.3)
    for split, n in (("train", 10), ("test", 4)):
        records = load_instruction_set(tmp_path / "base" / split).records
        draws = bw.mixture_draws(split, n, seed=2, rehearsal=0.3, draw=bw.keep_scene)
        assert [r.turns[0] for r in records] == [(q.strip(), a) for _, q, a in draws]
        assert all(isinstance(scene, bw.Scene) for scene, _, _ in draws)
        for r, (scene, _, _) in list(zip(records, draws))[:3]:
            assert np.array_equal(np.asarray(load_image(r.image)), np.asarray(bw.render(scene)))

"""The pending corrections set (llaca/train/corrections.py), its CLI, and the batch a small set becomes."""
from __future__ import annotations

import json

import pytest

from llaca.data import load_instruction_set
from llaca.train.corrections import CorrectionError, CorrectionStore, SmallSetRecipe


@pytest.fixture()
def images(tmp_path):
    import random

    from llaca.data import coin_mini

    out = []
    for k in range(3):
        image, question, answer = coin_mini.get_task("vqav2").sample(random.Random(k))
        path = tmp_path / f"img{k}.png"
        image.save(path)
        out.append((path, question, answer))
    return out


def test_add_persists_as_a_valid_llava_set_and_remove_drops_the_image(tmp_path, images):
    store = CorrectionStore(tmp_path / "home")
    (img, q, a), (img2, q2, a2) = images[:2]
    first = store.add(img, [("What is it?", "a square"), (q, a)], version="v1", original="7")
    store.add(img2, [(q2, a2)])
    store.add(img, [(q, "again")])  # the same image is stored once
    again = CorrectionStore(tmp_path / "home").list()  # a fresh store reads what survives a restart
    assert [c.id for c in again][0] == first.id and len(again) == 3
    assert again[0].turns == [("What is it?", "a square"), (q, a)] and again[0].original == "7"
    assert len(list((tmp_path / "home/corrections/pending/images").iterdir())) == 2
    pending = load_instruction_set(store.pending_dir)  # the pending set itself is LLaVA conversation JSON
    assert pending.records[0].turns[-1] == (q, a)
    store.remove(again[1].id)
    assert len(list((tmp_path / "home/corrections/pending/images").iterdir())) == 1
    with pytest.raises(CorrectionError, match="no pending correction"):
        store.remove("nope")
    assert not list(store.pending_dir.glob(".*tmp*"))  # atomic writes leave no temp files


def test_bad_corrections_are_refused_with_what_is_wrong(tmp_path, images):
    store = CorrectionStore(tmp_path)
    img, q, _ = images[0]
    with pytest.raises(CorrectionError, match="turn 1 answer: empty"):
        store.add(img, [(q, "  ")])
    with pytest.raises(CorrectionError, match="no such file"):
        store.add(tmp_path / "missing.png", [(q, "1")])
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        store.add(not_image, [(q, "1")])
    assert store.count() == 0


def test_batch_mixes_replay_and_reaches_the_minimum_steps(llaca_home, images):
    from llaca.versions import Registry

    store = CorrectionStore(llaca_home)
    for img, q, a in images:
        store.add(img, [(q, a)])
    recipe = SmallSetRecipe(min_steps=25, replay_per_correction=2.0)
    config = store.prepare_batch(Registry(llaca_home), "base", recipe)
    train = load_instruction_set(config["data"])
    ids = {r.id for r in train.records}
    assert {c.id for c in store.list()} <= ids and len(train) == 3 + 6  # 2 replay records per correction
    assert config["max_steps"] == 25  # 9 records x 3 epochs is 2 steps: the minimum wins
    test = load_instruction_set(config["data"].replace("/train", "/test"))
    assert [r.answer for r in test.records] == [a for _, _, a in images]


def test_the_recipe_follows_the_parents_base(llaca_home, images):
    """No recipe given: the parent's base picks it (tiny: full weights at 5e-4, 4 replay records per correction;
    small: its LoRA adapter size and bf16, the fields a small-set stage on it needs)."""
    from llaca.train.corrections import CORRECTION_RECIPES
    from llaca.versions import Registry

    store = CorrectionStore(llaca_home)
    for img, q, a in images:
        store.add(img, [(q, a)])
    config = store.prepare_batch(Registry(llaca_home), "base")
    tiny = CORRECTION_RECIPES["tiny"]
    assert config["lr"] == tiny.lr and "lora" not in config and "mixed_precision" not in config
    assert len(load_instruction_set(config["data"])) == 3 + 3 * tiny.replay_per_correction
    assert config["max_steps"] == tiny.min_steps  # 15 records x 3 epochs is 3 steps
    assert CORRECTION_RECIPES["small"].stage_fields() == {"mixed_precision": "auto", "lora": True, "lora_r": 32,
                                                          "lora_alpha": 64}


def test_cli_add_list_json_remove(llaca_home, images, capsys):
    from llaca.cli import main

    img, q, a = images[0]
    assert main(["corrections", "add", str(img), q, a]) == 0
    cid = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["corrections", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["id"], c["answer"]) for c in listed] == [(cid, a)]
    assert main(["corrections", "add", str(img), q, ""]) == 2
    assert "error: turn 1 answer: empty" in capsys.readouterr().err
    assert main(["corrections", "remove", cid]) == 0
    assert main(["corrections"]) == 0 and "no pending corrections" in capsys.readouterr().out


def test_cli_learn_prints_the_new_version_and_archives_the_batch(llaca_home, images, capsys):
    from llaca.cli import main
    from llaca.versions import Registry

    for img, q, a in images[:2]:
        assert main(["corrections", "add", str(img), q, a]) == 0
    capsys.readouterr()
    assert main(["corrections", "learn", "--method", "seq", "--from", "base", "--min-steps", "3"]) == 0
    version_id = capsys.readouterr().out.strip().splitlines()[-1]
    version = Registry(llaca_home).get(version_id)
    assert version.parent == "base" and version.meta["steps"] == 3 and version.meta["method"] == "seq"
    store = CorrectionStore(llaca_home)
    assert store.count() == 0  # learned corrections leave the pending set ...
    [batch] = store.archived()  # ... and stay archived with the version they produced
    assert batch["version"] == version_id and batch["n_corrections"] == 2
    assert any(k.startswith("corrections-") for k in version.meta["metrics"]["test"])

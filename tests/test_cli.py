"""The `python -m llaca` interface end to end on a real tiny LLaVA: learn -> version -> ask -> eval."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def llaca(*args, home: Path, check=True, fresh_process=False) -> subprocess.CompletedProcess:
    """`python -m llaca ARGS` with $LLACA_HOME=home: in this process (`llaca.cli.main`, the same code without the
    ~5 s interpreter + torch start of each call), or with `fresh_process` exactly as a user runs it."""
    argv = [str(a) for a in args]
    if fresh_process:
        env = {**os.environ, "LLACA_HOME": str(home), "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "llaca", *argv], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=600)
    else:
        from llaca.cli import main

        out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
        os.environ["LLACA_HOME"] = str(home)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's own errors and --help, with the interpreter's exit codes
                    code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
        proc = subprocess.CompletedProcess(["llaca", *argv], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"llaca {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_learn_ask_eval_versions(llaca_home, coin_dir):
    train = coin_dir / "sciqa" / "train"
    out = llaca("learn", train, "--method", "llaca", "--max-steps", "4", "--batch-size", "8", "--name", "sci",
                home=llaca_home, fresh_process=True)
    new_id = out.stdout.strip().splitlines()[-1]
    assert new_id == "v1"
    listed = json.loads(llaca("versions", "--json", home=llaca_home).stdout)
    by_id = {v["id"]: v for v in listed}
    assert by_id["v1"]["parent"] == "base" and by_id["v1"]["method"] == "llaca"
    assert by_id["v1"]["stage"]["name"] == "sciqa-train"
    assert "sciqa-test" in by_id["v1"]["metrics"]["test"]  # automatic evaluation on the sibling test split
    log = json.loads((llaca_home / "versions" / "v1" / "train_log.json").read_text())
    assert len(log) == 4 and all("alpha_mean" in e for e in log)

    image = next((coin_dir / "sciqa" / "test" / "images").iterdir())
    answer = llaca("ask", "v1", image, "What shape is in the image?", home=llaca_home).stdout.strip()
    assert isinstance(answer, str)
    # `ask` without a version uses the newest one and gives the same greedy answer.
    assert llaca("ask", image, "What shape is in the image?", home=llaca_home).stdout.strip() == answer

    result = json.loads(llaca("eval", "sci", coin_dir / "sciqa" / "test", "--json", home=llaca_home).stdout)
    assert result["version"] == "v1" and result["n"] == 12 and 0 <= result["accuracy"] <= 100
    assert result["accuracy"] == by_id["v1"]["metrics"]["test"]["sciqa-test"]["accuracy"]


def test_bad_input_is_one_line_error(llaca_home, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.json").write_text('[{"id": "1", "image": "nope.png", "conversations": []}]')
    proc = llaca("learn", bad, "--method", "seq", home=llaca_home, check=False, fresh_process=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error: data.json, record 0 (id '1'), field 'image'")
    proc = llaca("ask", "v99", tmp_path / "x.png", "hi", home=llaca_home, check=False)
    assert proc.returncode == 2 and "unknown version 'v99'" in proc.stderr and "Traceback" not in proc.stderr
    proc = llaca("learn", tmp_path / "nowhere", home=llaca_home, check=False)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    # Nothing was written by the failed commands.
    assert [v["id"] for v in json.loads(llaca("versions", "--json", home=llaca_home).stdout)] == ["base"]


def test_coin_mini_command(tmp_path, llaca_home):
    out = llaca("coin-mini", tmp_path / "c", "--n-train", "4", "--n-test", "2", home=llaca_home)
    dirs = [Path(p) for p in out.stdout.split()]
    assert len(dirs) >= 6
    for d in dirs:
        assert len(json.loads((d / "train" / "data.json").read_text())) == 4
        assert len(json.loads((d / "test" / "data.json").read_text())) == 2


def test_vision_flag_trains_or_freezes_the_tower(llaca_home, coin_dir):
    """`--vision train` adapts the CLIP tower in the stage (new image kinds); `--vision frozen` leaves it as it was."""
    from safetensors.torch import load_file

    def tower(vid):
        w = load_file(llaca_home / "versions" / vid / "model" / "model.safetensors")
        return {k: v for k, v in w.items() if "vision_tower" in k}

    train = coin_dir / "textvqa" / "train"
    for mode, vid in (("frozen", "v1"), ("train", "v2")):
        out = llaca("learn", train, "--method", "seq", "--from", "base", "--max-steps", "3", "--batch-size", "8",
                    "--vision", mode, "--no-eval", home=llaca_home)
        assert out.stdout.strip().splitlines()[-1] == vid
    base, frozen, trained = tower("base"), tower("v1"), tower("v2")
    assert all((base[k] == frozen[k]).all() for k in base)
    changed = [k for k in base if not (base[k] == trained[k]).all()]
    assert len(changed) > len(base) // 2, "the tower's weights moved in the stage"
    meta = json.loads((llaca_home / "versions" / "v2" / "meta.json").read_text())
    assert meta["hparams"]["train_vision"] is True


def test_vision_blocks_adapt_only_the_towers_last_blocks(llaca_home, coin_dir):
    """`--vision-blocks 1` trains the last tower block that feeds the LM and nothing else of the tower; with `--lora`
    it puts LoRA adapters on that block's linear layers (beside the LM's); an impossible N is a clear error."""
    import re

    from safetensors.torch import load_file

    from llaca.versions import Registry, load_version

    config = load_version(Registry(llaca_home), "base")[0].config
    last = config.vision_config.num_hidden_layers + config.vision_feature_layer  # feature layer -1: the last block
    train = coin_dir / "textvqa" / "train"
    out = llaca("learn", train, "--method", "seq", "--from", "base", "--max-steps", "3", "--batch-size", "8",
                "--vision-blocks", "1", "--no-eval", home=llaca_home)
    vid = out.stdout.strip().splitlines()[-1]
    base, new = (load_file(llaca_home / "versions" / v / "model" / "model.safetensors") for v in ("base", vid))
    moved = {k for k in base if "vision_tower" in k and not (base[k] == new[k]).all()}
    assert moved and all(re.search(rf"encoder\.layers\.{last}\.", k) for k in moved), sorted(moved)
    assert json.loads((llaca_home / "versions" / vid / "meta.json").read_text())["hparams"]["vision_blocks"] == 1

    out = llaca("learn", train, "--method", "seq", "--from", "base", "--max-steps", "2", "--batch-size", "8",
                "--lora", "--vision-blocks", "1", "--no-eval", home=llaca_home)
    adapter = load_file(llaca_home / "versions" / out.stdout.strip().splitlines()[-1] / "adapter" /
                        "adapter_model.safetensors")
    tower_lora = {k for k in adapter if "vision_tower" in k and "lora_" in k}
    assert tower_lora and all(re.search(rf"encoder\.layers\.{last}\.", k) for k in tower_lora), sorted(tower_lora)
    assert any("language_model" in k and "lora_" in k for k in adapter)

    bad = llaca("learn", train, "--from", "base", "--max-steps", "2", "--vision-blocks", "99", "--no-eval",
                home=llaca_home, check=False)
    assert bad.returncode != 0 and "vision_blocks=99" in bad.stderr and "Traceback" not in bad.stderr


def test_replay_fraction_mixes_earlier_records_into_a_llaca_stage(llaca_home, coin_dir):
    """`--method llaca --replay-fraction 0.5` (the measured llaca+replay) trains on the stage's records plus half as
    many replayed from the lineage: more steps per epoch, recorded in the version's hparams."""
    first = llaca("learn", coin_dir / "sciqa" / "train", "--method", "seq", "--from", "base", "--epochs", "1",
                  "--batch-size", "8", "--no-eval", home=llaca_home).stdout.strip().splitlines()[-1]
    second = llaca("learn", coin_dir / "textvqa" / "train", "--method", "llaca", "--from", first, "--epochs", "1",
                   "--batch-size", "8", "--replay-fraction", "0.5", "--no-eval",
                   home=llaca_home).stdout.strip().splitlines()[-1]
    meta = json.loads((llaca_home / "versions" / second / "meta.json").read_text())
    assert meta["method"] == "llaca" and meta["hparams"]["replay_fraction"] == 0.5
    assert meta["steps"] == (48 + 24) // 8  # 48 stage records + 24 replayed, batch 8, one epoch
    bad = llaca("learn", coin_dir / "textvqa" / "train", "--grouped", "--replay-fraction", "0.5", "--no-eval",
                home=llaca_home, check=False)
    assert bad.returncode != 0 and "--replay-fraction" in bad.stderr and "Traceback" not in bad.stderr


def test_learn_defaults_to_the_measured_recipe_and_replay_fraction_0_is_the_faithful_rule(llaca_home, coin_dir):
    """No flags: `llaca` with 20% replay at lr 3e-4 (llaca.train.tuner.DEFAULT_RECIPE); `--replay-fraction 0` the rule
    alone; another method gets no replay it did not ask for."""
    from llaca.train.tuner import DEFAULT_RECIPE
    from llaca.versions import Version

    first = llaca("learn", coin_dir / "sciqa" / "train", "--method", "seq", "--from", "base", "--epochs", "1",
                  "--batch-size", "8", "--no-eval", home=llaca_home).stdout.strip().splitlines()[-1]

    def learned(*flags):
        vid = llaca("learn", coin_dir / "textvqa" / "train", "--from", first, "--epochs", "1", "--batch-size", "8",
                    "--no-eval", *flags, home=llaca_home).stdout.strip().splitlines()[-1]
        return json.loads((llaca_home / "versions" / vid / "meta.json").read_text())

    from llaca.cli import build_parser
    from llaca.train.recipes import SMALL_RECIPE, recipe_for
    from llaca.versions import Registry

    assert build_parser().parse_args(["learn", "d"]).epochs is None  # None: the parent's base recipe decides
    assert recipe_for(Registry(llaca_home), first)["epochs"] == DEFAULT_RECIPE["epochs"] == 5.0  # a tiny lineage
    assert recipe_for(Registry(llaca_home), first).get("lora") is None and SMALL_RECIPE["lora"]
    default = learned()
    assert (default["method"], default["hparams"]["lr"]) == (DEFAULT_RECIPE["method"], DEFAULT_RECIPE["lr"]) == ("llaca", 3e-4)
    assert default["hparams"]["replay_fraction"] == DEFAULT_RECIPE["replay_fraction"] == 0.2
    assert default["steps"] == 8  # 48 stage records + 10 replayed (round(9.6)) = 58, batch 8: 7 full + 1 partial
    alone = learned("--replay-fraction", "0")
    assert alone["method"] == "llaca" and "replay_fraction" not in alone["hparams"] and alone["steps"] == 48 // 8
    named = {Version("v", llaca_home, meta).method for meta in (default, alone)}  # what the app's labels show
    assert named == {"llaca + 20% replay", "llaca"}
    seq = learned("--method", "seq")
    assert "replay_fraction" not in seq["hparams"] and seq["steps"] == 48 // 8
    # a set smaller than --min-records takes more passes: 96 / 48 records = 2 epochs of the 8 mixed batches
    twice = learned("--min-records", "96")
    assert twice["hparams"]["min_records"] == 96 and twice["steps"] == 2 * default["steps"]
    assert "min_records" not in default["hparams"]  # tiny's recipe has none
    # the paper's named recipe: LoRA on every LM Linear + the projector at its own lr, one epoch, the rule alone
    paper = learned("--recipe", "paper-r64", "--max-steps", "2")
    assert paper["method"] == "llaca" and paper["weights"] == "lora"
    assert {k: paper["hparams"][k] for k in ("lr", "projector_lr", "lora_r", "lora_alpha", "epochs")} == \
        {"lr": 2e-4, "projector_lr": 2e-5, "lora_r": 64, "lora_alpha": 128, "epochs": 1.0}
    assert "replay_fraction" not in paper["hparams"]
    assert paper["hparams"]["lora_dropout"] == 0.05  # the paper's recipe keeps peft's usual adapter dropout
    undropped = learned("--recipe", "paper-r64", "--max-steps", "1", "--lora-dropout", "0")
    assert undropped["hparams"]["lora_dropout"] == 0.0


def test_progress_bar_restarts_for_each_stage_of_a_job(capsys):
    """A multi-phase build (alignment, then instructions) shows one bar per phase, not one bar counting both."""
    from llaca.train.progress import progress_printer

    on_event = progress_printer("build-base")
    for total, steps in ((4, 4), (6, 3)):
        for k in range(1, steps + 1):
            on_event({"type": "step", "phase": "stage", "step": k, "total_steps": total, "loss": 1.0})
    err = capsys.readouterr().err
    assert "4/4" in err and "3/6" in err


def test_learn_takes_the_rule_and_replay_share_from_the_parents_base_recipe():
    """With no --method, `learn` runs the base's rule: tiny llaca with 20% mixed in, small the replay rule with a
    fraction of 0.2 (issue 25's measurements); a named rule drops the recipe's share unless one is given, the replay
    rule takes a given share as its own fraction, and --grouped stays llaca per group."""
    from llaca.train.recipes import RECIPES, resolve_rule
    from llaca.train.rules import make_rule
    from llaca.train.tuner import StageConfig

    tiny, small = RECIPES["tiny"], RECIPES["small"]
    assert resolve_rule(tiny, None, None) == ("llaca", 0.2, {})
    assert resolve_rule(small, None, None) == ("replay", 0.0, {"fraction": 0.2})
    assert resolve_rule(small, "llaca", None) == ("llaca", 0.0, {})  # the paper's rule alone
    assert resolve_rule(small, "llaca", 0.2) == ("llaca", 0.2, {})  # llaca + replay, asked for
    assert resolve_rule(small, None, 0.3, rule_hparams={"beta": 0.9}) == ("replay", 0.0, {"beta": 0.9, "fraction": 0.3})
    assert resolve_rule(tiny, "replay", None) == ("replay", 0.0, {})  # ReplayRule's own default
    assert resolve_rule(small, None, None, grouped=True) == ("llaca", 0.0, {})
    method, share, hparams = resolve_rule(small, None, None)
    cfg = StageConfig(data="d", method=method, replay_fraction=share, rule_hparams=hparams)
    assert make_rule(cfg.method, **cfg.rule_hparams).fraction == 0.2
    from llaca.train.recipes import stage_fields  # small learns in batches of 2, tiny in the tuner's 16

    assert stage_fields(small)["batch_size"] == 2 and StageConfig(data="d", **stage_fields(tiny)).batch_size == 16


def test_smalls_stage_passes_a_small_set_up_to_its_least_records_unless_the_epochs_are_chosen():
    """`small`'s recipe trains at least 2,000 records per stage (a 493-record set: 4.06 epochs); the CLI and the app
    drop that floor when the user picks the epochs (or steps) themselves, so a chosen epoch count runs as given."""
    from llaca.cli import build_parser
    from llaca.train.recipes import RECIPES, base_stage_options, describe

    small, tiny = RECIPES["small"], RECIPES["tiny"]
    assert small["min_records"] == 2000 and "min_records" not in tiny
    assert base_stage_options(small, True, small["epochs"])["min_records"] == 2000  # the form left at the default
    assert base_stage_options(small, True)["lora_dropout"] == 0.0  # kept although falsy: 0 is a choice, not unset
    assert "min_records" not in base_stage_options(small, True, 2.0)  # epochs chosen: exactly those
    assert "min_records" not in base_stage_options(tiny, False)
    assert "passes up to 2,000 records" in describe(small) and "passes up to" not in describe(tiny)
    assert build_parser().parse_args(["learn", "d"]).min_records is None  # None: the recipe decides


def test_smalls_stage_adapts_the_towers_last_block_and_tiny_keeps_its_tower_frozen():
    """`small`'s recipe puts LoRA on its tower's last block (`vision_blocks=1`): `learn` with no options, the Learn
    tab's form and the held-out bench's "CLI defaults" all run it; tiny's recipe leaves the tower frozen."""
    from llaca.cli import build_parser
    from llaca.train.recipes import RECIPES, base_stage_options, describe, stage_fields

    small, tiny = RECIPES["small"], RECIPES["tiny"]
    assert stage_fields(small)["vision_blocks"] == 1 and "vision_blocks" not in stage_fields(tiny)
    assert base_stage_options(small, True)["vision_blocks"] == 1 and "vision_blocks" not in base_stage_options(tiny, False)
    assert "the tower's last block adapted" in describe(small) and "tower" not in describe(tiny)
    assert build_parser().parse_args(["learn", "d"]).vision_blocks is None  # None: the recipe decides


def test_learn_takes_the_recipes_tower_blocks_unless_the_tower_is_chosen(llaca_home, coin_dir, monkeypatch):
    """`learn` with no tower option runs the recipe's `vision_blocks`; `--vision frozen` (or `train`) or
    `--vision-blocks N` decide instead (here on tiny, its recipe given one block for the test)."""
    from llaca.train import recipes

    monkeypatch.setitem(recipes.RECIPES, "tiny", {**recipes.RECIPES["tiny"], "vision_blocks": 1})
    train = coin_dir / "textvqa" / "train"
    hparams = {}
    for option in ([], ["--vision", "frozen"], ["--vision-blocks", "2"]):
        out = llaca("learn", train, "--from", "base", "--max-steps", "1", "--batch-size", "4", "--no-eval", *option,
                    home=llaca_home)
        meta = json.loads((llaca_home / "versions" / out.stdout.strip().splitlines()[-1] / "meta.json").read_text())
        hparams[" ".join(option)] = meta["hparams"].get("vision_blocks", 0)
    assert hparams == {"": 1, "--vision frozen": 0, "--vision-blocks 2": 2}


def test_image_jitter_reaches_the_stage_and_a_bad_value_is_one_clear_line(llaca_home, coin_dir):
    """`learn --image-jitter 0.1` trains with reframed images (recorded in the version's hparams, so its run key
    differs); an out-of-range value is refused with the option's name, no traceback."""
    train = coin_dir / "textvqa" / "train"
    out = llaca("learn", train, "--method", "seq", "--from", "base", "--max-steps", "2", "--batch-size", "8",
                "--image-jitter", "0.1", "--no-eval", home=llaca_home)
    vid = out.stdout.strip().splitlines()[-1]
    assert json.loads((llaca_home / "versions" / vid / "meta.json").read_text())["hparams"]["image_jitter"] == 0.1
    bad = llaca("learn", train, "--from", "base", "--max-steps", "2", "--image-jitter", "1.5", home=llaca_home,
                check=False)
    assert bad.returncode != 0 and "image_jitter=1.5" in bad.stderr and "Traceback" not in bad.stderr

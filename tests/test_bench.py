"""Smoke tests of the benchmarks: they run end to end on the tiny base and report self-consistent numbers
(not that LLaCA wins: two steps per stage teach nothing)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llaca.bench import quality, speed
from llaca.evaluation import metrics


def test_quality_smoke_metrics_match_the_matrix(llaca_home, coin_dir, tmp_path):
    tasks = ["vqav2", "gqa"]
    cfg = {"tasks": tasks, "methods": ["seq", "llaca"], "seeds": [0], "steps": 2, "lr": 1e-3, "batch_size": 8,
           "test_limit": 4, "test_n": 4, "jobs": 1, "quick": True, "data_seed": 0, "n_train": 48, "n_test": 12}
    out = tmp_path / "out"
    assert quality.run_benchmark(cfg, out=out, data=str(coin_dir), work=str(tmp_path / "work")) == 0
    for name in ("results.json", "table.md", "quality.png", "alpha.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("seq", 0), ("llaca", 0)]
    for run in results["runs"]:
        A = run["A"]
        assert len(A) == len(tasks) and all(len(row) == len(tasks) for row in A)
        assert all(0 <= a <= 100 for row in A for a in row)
        assert 0 <= run["base_final"] <= 100
        recomputed = metrics.cl_metrics(A)
        for key, value in run["metrics"].items():
            assert value == pytest.approx(recomputed[key], abs=0.006), key
        summary = results["summary"][run["method"]]
        assert summary["avg_acc"]["mean"] == pytest.approx(recomputed["avg_acc"], abs=0.006)
    llaca_run = results["runs"][1]
    assert llaca_run["tensors"] and all(0 <= t["fallback_frac"] <= 1 for t in llaca_run["tensors"])
    assert all(len(st["alpha_trace"]["mean"]) == 2 for st in llaca_run["stages"])
    assert "| llaca |" in (out / "table.md").read_text()


def test_speed_smoke_writes_the_ratios(llaca_home, tmp_path):
    res = speed.run_speed(out=tmp_path, reps=2, train_reps=1, stage_steps=2, stage_reps=1, mem_steps=1, mem_reps=1,
                          chat_reps=1, max_new_tokens=4, batch_size=4, log=lambda *a, **k: None)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["optimizer_step"]["ratio"] > 0 and saved["stage"]["ratio"] > 0
    assert saved["chat"]["overhead_ratio"] > 0 and saved["chat"]["ttft_stream_ms"] > 0
    assert saved["memory"]["llaca_state_bytes"] == 2 * saved["memory"]["trainable_param_bytes"]  # ema + g_prev, fp32
    assert saved["memory"]["peak_rss_llaca_mb"] > 0
    assert res["chat"]["same_text"]
    assert "optimizer step" in (tmp_path / "speed.md").read_text()


def test_instruction_router_groups_by_template_and_routes_questions(coin_dir):
    """The ICML version's grouping (the library router the benchmark uses): CoIN-mini tasks have distinct templates
    -> one group each, routed back exactly; a second dataset with the same template continues its group."""
    from llaca.data import load_instruction_set
    from llaca.train.grouping import InstructionRouter

    router = InstructionRouter(threshold=0.9)
    tasks = ["sciqa", "gqa", "vqav2"]
    for k, task in enumerate(tasks):
        texts = [r.question for r in load_instruction_set(coin_dir / task / "train").records]
        assert router.match(texts)[0] is None
        assert router.add(None, texts, f"v{k}") == k
    again = [r.question for r in load_instruction_set(coin_dir / "gqa" / "test").records]
    assert router.match(again)[0] == 1
    for k, task in enumerate(tasks):
        records = load_instruction_set(coin_dir / task / "test").records
        assert {router.route(r.question).version for r in records} == {f"v{k}"}


def test_quality_regime_knobs_are_in_the_cache_key():
    """Every regime knob changes a run's cache key; the default regime keeps the key it had before the knobs."""
    from llaca.paths import ASSETS_DIR

    def key(*argv):
        cfg = quality.resolve_config(quality.parse_args(["--tasks", "2", *argv]))
        job = {"method": "llaca", "seed": 0, "home": "h", "tasks_root": "t", "tasks": cfg["tasks"],
               "steps": cfg["steps"], "lr": cfg["lr"], "batch_size": cfg["batch_size"], "test_limit": None,
               "base_test": None, "multitask_data": None, "run_home": "r",
               **{k: cfg[k] for k in ("stage_kw", "llaca_hp", "base_id") if cfg.get(k)}}
        return quality._job_key(job, {"created": 1.0, "stage": {"sha256": "x"}}), cfg

    default, cfg = key()
    assert not {"stage_kw", "llaca_hp", "base", "base_id"} & set(cfg)
    variants = [("--lora",), ("--lora-r", "8"), ("--lora-r", "64"), ("--lr", "1e-4"), ("--steps", "80"),
                ("--scale", "1.0"), ("--alpha-fallback", "0.001"), ("--base", str(ASSETS_DIR / "base_v1")),
                ("--lora-alpha", "16"), ("--projector-lr", "2e-5"), ("--recipe", "paper"), ("--recipe", "paper-r64")]
    keys = [key(*v)[0] for v in variants]
    assert len(set(keys + [default])) == len(variants) + 1
    assert key("--lora-r", "8")[1]["stage_kw"] == {"lora": True, "lora_r": 8}
    paper = key("--recipe", "paper")[1]  # the paper's stage: LoRA r128/a256, projector 2e-5, lr 2e-4, one epoch
    from llaca.train.tuner import native_bf16

    bf16 = native_bf16()  # the recipe's "auto" is keyed as what this machine runs
    assert paper["stage_kw"] == {"lora": True, "lora_r": 128, "lora_alpha": 256, "projector_lr": 2e-5,
                                 **({"mixed_precision": "bf16"} if bf16 else {})}
    assert (paper["lr"], paper["steps"]) == (2e-4, math.ceil(quality.N_TRAIN / quality.STAGE_BATCH))
    assert key("--recipe", "paper", "--lora-r", "32", "--steps", "10")[1]["stage_kw"]["lora_r"] == 32  # options win
    assert quality.regime_label(paper) == "recipe paper; LoRA r=128 alpha 256; projector lr 2e-05; " + ("bf16; " if bf16 else "")
    # --data is read as it is: with --paraphrased the fixed set's cached runs would come back as paraphrased ones
    with pytest.raises(ValueError, match="give one or the other"):
        quality.resolve_config(quality.parse_args(["--paraphrased", "--data", "somewhere"]))
    assert quality.resolve_config(quality.parse_args(["--paraphrased"]))["paraphrased"] is True
    assert quality.job_rule({"method": "llaca", "llaca_hp": {"scale": 1.0}}) == \
        ("llaca", {"scale": 1.0})
    assert quality.job_rule({"method": "llaca-norm"})[1]["size_ref"] == 4096 * 128
    assert quality.job_rule({"method": "seq", "llaca_hp": {"scale": 1.0}}) == ("seq", {})   # llaca rules only


def test_quality_cache_key_ignores_the_multitask_set_except_for_multitask_and_finds_old_keys(tmp_path):
    base = {"created": 1.0, "stage": {"sha256": "x"}}
    job = {"method": "llaca", "seed": 0, "tasks": ["sciqa"], "steps": 2, "lr": 1e-3, "multitask_data": None}
    with_multitask = {**job, "multitask_data": "/w/multitask-abc"}  # what a run beside `multitask` was keyed with
    assert quality._job_key(job, base) == quality._job_key(with_multitask, base)
    mt = {**with_multitask, "method": "multitask"}
    assert quality._job_key(mt, base) != quality._job_key({**mt, "multitask_data": "/w/other"}, base)
    old = tmp_path / f"llaca-s0-{quality._job_key(with_multitask, base, legacy=True)}.json"
    assert quality._cache_path(with_multitask, tmp_path, base).name != old.name  # nothing cached: the new key
    old.write_text("{}")
    assert quality._cache_path(with_multitask, tmp_path, base) == old  # a run cached under its old key is reused
    assert quality._cache_path(job, tmp_path, base) != old  # a subset run was never keyed with the path


def test_grounding_variants_train_a_fresh_lm_on_the_frozen_tower(tmp_path):
    """Tiny run of the base-v2 grounding diagnostic: real data variants, a real stage, per-family scores."""
    from experiments import grounding
    from llaca.data import world as base_world
    from llaca.paths import ASSETS_DIR

    before = (list(base_world.READ_QS), base_world.sample_scene)
    with grounding.world_variant("v2-1phrase") as bw:
        assert bw.READ_QS == before[0][:1] and bw._HINT_KIND == {}
    with grounding.world_variant("v2-easy") as bw:
        scene = bw.sample_scene(__import__("random").Random(3))
        assert scene.kind != "objects" or len(scene.things) == 1
    assert (list(base_world.READ_QS), base_world.sample_scene) == before  # restored

    out = tmp_path / "out"
    assert grounding.main(["--tower-from", str(ASSETS_DIR / "base"), "--variants", "v2-easy", "v1", "attr:colour,count",
                           "--steps", "2",
                           "--n-train", "32", "--test-n", "8", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    runs = sorted(json.loads(p.read_text())["variant"] for p in (out / "runs").glob("*.json"))
    assert runs == ["attr:colour,count", "v1", "v2-easy"]
    for p in (out / "runs").glob("*.json"):
        r = json.loads(p.read_text())
        assert sum(f["n"] for f in r["per_family"].values()) == r["n_test"] == 8
        assert 0 <= r["accuracy"] <= 100 and r["steps"] == 2
    assert "| v2-easy (192x4x4) | 2 |" in (out / "table_base.md").read_text()
    default_params = json.loads(next((out / "runs").glob("v1-*.json")).read_text())["parameters"]
    # the LM's size, clipping and a learning tower are options of the same run (own cache keys, own table rows)
    assert grounding.main(["--tower-from", str(ASSETS_DIR / "base"), "--variants", "v1", "--steps", "2",
                           "--text-size", "64x2x2", "--max-grad-norm", "1", "--train-vision",
                           "--n-train", "32", "--test-n", "8", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    small = json.loads(next((out / "runs").glob("v1-*-lm64x2x2-clip1-tower.json")).read_text())
    assert small["text_size"] == [64, 2, 2] and small["max_grad_norm"] == 1 and small["train_vision"]
    assert small["parameters"] < default_params
    assert "| v1 (64x2x2, clip 1, tower trained) | 2 |" in (out / "table_base.md").read_text()
    assert grounding.family("What does the text say?", "cat") == "read"
    assert grounding.family("Where is the cat?", "top left") == "region"
    assert grounding.family("What shape is this?", "star") == "shape"
    with pytest.raises(Exception, match="attr:A,B"):
        grounding.check_variant("attr:colour,smell")


def test_demo_bench_runs_each_arm_and_its_metrics_match_its_rows(llaca_home, tmp_path, monkeypatch):
    from llaca.bench import demo as demo_bench
    from llaca.data import demo

    monkeypatch.setattr(demo, "STAGE", dict(max_steps=2, batch_size=4, checkpoint_every=0))
    monkeypatch.setattr(demo, "DATA", dict(n_train=16, n_test=6, seed=0))
    out = tmp_path / "demo"
    args = ["--out", str(out), "--tasks", "2"]
    assert demo_bench.main(args + ["--arms", "seq, lr 1e-3", "llaca+replay, lr 3e-4"]) == 0
    results = json.loads((out / "results_2tasks.json").read_text())
    assert [(r["arm"], r["method"], r["lr"]) for r in results["runs"]] == [("seq, lr 1e-3", "seq", 1e-3),
                                                                             ("llaca+replay, lr 3e-4", "llaca", 3e-4)]
    assert results["runs"][1]["replay_fraction"] == 0.2
    first, second = demo.TASKS[:2]
    for run in results["runs"]:
        assert [row["stage"] for row in run["after"]] == [1, 2]
        assert all(0 <= row[t] <= 100 for row in run["after"] for t in (first, second))
        m = demo_bench.run_metrics(run)  # two tasks: Forgetting is what stage 2 took from task 1
        assert m["forgetting"] == pytest.approx(run["after"][0][first] - run["after"][1][first])
        assert m["avg_acc"] == pytest.approx((run["after"][1][first] + run["after"][1][second]) / 2)
    table = (out / "table_2tasks.md").read_text()
    assert "| seq, lr 1e-3 | 0 |" in table and "| llaca+replay, lr 3e-4 | 0 |" in table
    cached = sorted(p.name for p in (out / "runs").iterdir())
    assert len(cached) == 2
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert demo_bench.main(args + ["--arms", "seq, lr 1e-3"]) == 0  # resumes from the cache, trains nothing
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamp


def test_the_demo_button_compares_rules_at_one_lr_and_ends_with_the_default_recipe():
    from llaca.data import demo
    from llaca.train.tuner import DEFAULT_RECIPE

    rule = {k: DEFAULT_RECIPE[k] for k in ("method", "lr", "replay_fraction")}  # the demo's stages set max_steps
    assert demo.ARMS[demo.DEFAULT_ARMS[-1]] == rule
    assert {demo.ARMS[a]["lr"] for a in demo.DEFAULT_ARMS} == {DEFAULT_RECIPE["lr"]}
    assert [demo.ARMS[a]["method"] for a in demo.DEFAULT_ARMS[:2]] == ["seq", "llaca"]


def test_heldout_bench_recipe_overrides_are_typed_and_checked():
    from llaca.bench.heldout import parse_overrides

    assert parse_overrides(["lr=1e-3", "method=replay", "epochs=2", "lora=false"]) == {
        "lr": 1e-3, "method": "replay", "epochs": 2, "lora": False}
    for bad in (["lr"], ["learning_rate=1e-3"]):
        with pytest.raises(SystemExit, match="KEY=VALUE"):
            parse_overrides(bad)


def test_heldout_bench_stage_seed_probe_and_cache(llaca_home, tmp_path):
    """The CLI-default stage on held-out digits with stage seed 1 (12 steps), on the tiny base: the run is recorded
    with its seed under a tagged key (seed 0 at full length keeps its old key), a probe per set, and a rerun reads
    the cache."""
    from llaca.bench import heldout as heldout_bench

    out = tmp_path / "heldout"
    args = ["--out", str(out), "--sets", "digits", "--skip-zero-shot", "--seeds", "1", "--max-steps", "12",
            "--variants", "frozen tower, llaca+replay, lr 3e-4"]
    assert heldout_bench.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["stages"]
    assert (run["set"], run["seed"], run["method"], run["n_test"]) == ("digits", 1, "llaca", 397)
    assert 0 <= run["test_accuracy"] <= 100 and run["steps"] == 12
    assert sum(run["answers_given"].values()) <= 397 and len(run["top_mistakes"]) <= 5
    assert 0 <= results["probe"]["digits"]["flat"] <= 100
    (cached,) = (out / "runs").iterdir()
    assert cached.name.endswith("-digits-frozen_tower_llaca+replay_lr_3e-4-seed1-steps12.json")
    stamp = cached.stat().st_mtime_ns
    assert heldout_bench.main(args) == 0
    assert cached.stat().st_mtime_ns == stamp and len(list((out / "runs").iterdir())) == 1
    assert "| digits | frozen tower, llaca+replay, lr 3e-4 | llaca | 1 |" in (out / "table.md").read_text()
    # a figure the cached run lacks (accuracy on its own training records) runs the stage again and records it
    assert heldout_bench.main(args + ["--train-eval", "20"]) == 0
    rerun = json.loads(cached.read_text())
    assert cached.stat().st_mtime_ns != stamp and 0 <= rerun["train_accuracy"] <= 100
    assert rerun["test_accuracy"] == run["test_accuracy"]  # the same stage: seed and steps fix it
    assert f"| {rerun['train_accuracy']} |" in (out / "table.md").read_text()


def test_the_small_demo_is_seq_against_smalls_default_recipe_and_says_it_is_reduced():
    """On `small` the button runs two arms from `small`: plain fine-tuning and small's own recipe (LoRA, its lr and
    replay), cut down to fit 10 minutes, and the plan says so (the UI shows `note`)."""
    from llaca.data import demo
    from llaca.train.recipes import SMALL_RECIPE, stage_fields
    from llaca.train.tuner import StageConfig

    plan = demo.DEMOS["small"]
    arms = list(plan.arms)
    assert len(arms) == 2 and plan.note and demo.DEMOS["tiny"].note == ""
    for arm in arms:
        configs = plan.stage_configs(Path("/data"), arm)
        assert [c["parent"] for c in configs] == ["small"] + [None] * (len(plan.tasks) - 1)
        for config in configs:
            cfg = StageConfig(**config)  # what the worker will run
            assert (cfg.lora, cfg.lora_r, cfg.lr, cfg.lora_dropout) == (
                True, SMALL_RECIPE["lora_r"], SMALL_RECIPE["lr"], SMALL_RECIPE["lora_dropout"])
            assert cfg.eval_limit and cfg.max_steps * cfg.batch_size <= 100  # the cut for two cores
    seq, default = (StageConfig(**plan.stage_configs(Path("/data"), arm)[0]) for arm in arms)
    assert (seq.method, seq.replay_fraction) == ("seq", 0.0)
    recipe = stage_fields(SMALL_RECIPE)
    assert (default.method, default.rule_hparams, default.replay_fraction) == (
        recipe["method"], recipe.get("rule_hparams", {}), recipe.get("replay_fraction", 0.0))


def test_heldout_answer_profile_counts_answers_and_mistakes():
    """Case and spaces do not make a mistake; the commonest answers and gold -> said pairs come first."""
    from llaca.bench.heldout import answer_profile

    prof = answer_profile(["Animal", "animal ", "food", "animal", "town"], ["animal", "plant", "food", "town", "town"])
    assert prof["answers_given"] == {"animal": 3, "food": 1, "town": 1}
    assert prof["top_mistakes"] == {"plant -> animal": 1, "town -> animal": 1}


def test_own_test_family_scores_by_hand():
    """`small`'s own-test score: overall and per answer family of the world (a box by IoU, text normalised)."""
    from llaca.bench.small import family_scores

    questions = ["What colour is the star?", "What colour is the ring?", "How many dogs are there?",
                 "Give the bounding box of the cat as [x1,y1,x2,y2] with one decimal."]
    golds = ["red", "blue", "3", "[0.1,0.1,0.5,0.5]"]
    predictions = ["Red.", "green", "three", "[0.1,0.1,0.5,0.6]"]  # right, wrong, right (number word), IoU 0.8
    scores = family_scores(questions, golds, predictions)
    assert scores["n"] == 4 and scores["accuracy"] == 75.0
    assert scores["per_family"] == {"box": {"accuracy": 100.0, "n": 1}, "colour": {"accuracy": 50.0, "n": 2},
                                    "count": {"accuracy": 100.0, "n": 1}}
    with pytest.raises(ValueError):
        family_scores(questions, golds, predictions[:3])
    with pytest.raises(ValueError, match="no test records"):
        family_scores([], [], [])

"""Learning quality on CoIN-mini: every update rule runs the whole task sequence from `base`, 3 seeds each.

    python -m llaca.bench quality            # the default config (8 tasks x STAGE_STEPS, 3 seeds, all methods)
    python -m llaca.bench quality --quick    # 3 tasks, few steps, 1 seed: a few minutes
    python -m llaca.bench quality --lora --lora-r 8 --lr 1e-4 --base assets/base_v1   # another regime / base

Each (method, seed) is one run in its own registry (a copy of `base` under the work dir): stage j starts from
stage j-1's version, exactly like `python -m llaca learn` chained by hand. After every stage the new version is
evaluated on EVERY task's test split (a full row of A; entries i > j are zero-shot information, the metrics read
only i <= j) and, after the last stage, on the base mixture's test split (are the base skills still there?).
`multitask` trains one stage on the union of all tasks (T x the per-stage steps): the joint-training upper bound.
Same data, steps and hyper-parameters for every method; only the rule differs.

Outputs (small, commit-friendly) in `--out` (default bench_results/quality/): results.json, table.md,
quality.png (mean A per method + Avg.ACC / Forgetting bars), alpha.png (LLaCA's alpha over steps and per tensor).
Runs are cached in the work dir by their full config, so an interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from ..train.recipes import NAMED_RECIPES
from ..train.rules.llaca import PAPER_LORA_NUMEL

# --- the per-stage recipe every method shares (the integrator calibrates these) ---------------------------------
STAGE_STEPS = 150       # optimizer steps per task (multitask: len(tasks) x this, one stage)
STAGE_LR = 1e-3
STAGE_BATCH = 16
SEEDS = (0, 1, 2)
TEST_LIMIT = None       # test records per task (None: all of them, N_TEST)
DATA_SEED = 0           # CoIN-mini content (fixed across training seeds: same data for every run)
N_TRAIN, N_TEST = 1500, 100
QUICK = {"tasks": "sciqa,imagenet,gqa", "steps": 60, "seeds": (0,), "test_limit": 30}   # 3 fast-learning tasks
TIME_BUDGET_S = 3600    # the default config must fit in this on 2 cores (a warning is printed otherwise)

# --- methods: display name -> (rule, rule hyper-parameters); "emaX" also parses for any beta X ------------------
METHODS: dict[str, tuple[str, dict]] = {
    "seq": ("seq", {}),
    "ema0.9": ("ema", {"beta": 0.9}),
    "ema0.99": ("ema", {"beta": 0.99}),        # the paper's "stable EMA" baseline
    "ema0.999": ("ema", {"beta": 0.999}),
    "replay": ("replay", {}),
    "llaca": ("llaca", {}),                   # faithful: the authors' code (scale 2, fallback 0.01)
    "llaca-port": ("llaca", {"scale": 0.01, "alpha_fallback": 0.001}),   # the later port's constants
    "llaca-grouped": ("llaca", {}),           # + the ICML version's instruction grouping (llaca.train.grouping)
    "llaca-norm": ("llaca", {"size_ref": PAPER_LORA_NUMEL}),   # scale x N / (4096 x 128): the paper's per-element alpha
    "llaca+replay": ("llaca", {}),            # the adaptive EMA over stages that mix in earlier records (REPLAY_MIX)
    "multitask": ("seq", {}),                 # all tasks jointly, one stage (upper bound)
}
DEFAULT_METHODS = ["seq", "ema0.9", "ema0.99", "ema0.999", "replay", "llaca", "multitask"]
VARIANTS = ["llaca-port", "llaca-grouped"]     # what the port / the ICML version add; `--methods all` runs them too
GROUPED = {"llaca-grouped": 0.90}             # TF-IDF similarity threshold (the ICML version's, fixed templates)
REPLAY_MIX = {"llaca+replay": 0.2}            # fraction of earlier records mixed into each stage (as `replay`)


def method_spec(name: str) -> tuple[str, dict]:
    if name in METHODS:
        rule, hp = METHODS[name]
        return rule, dict(hp)
    m = re.fullmatch(r"ema(0?\.\d+)", name)
    if m:
        return "ema", {"beta": float(m.group(1))}
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)} (or emaBETA, e.g. ema0.995)")


def is_llaca(name: str) -> bool:
    return name != "multitask" and method_spec(name)[0] == "llaca"


# ================================================================================================ one run

@functools.lru_cache(maxsize=None)
def _test_set(path: str):
    from ..data import load_instruction_set

    return load_instruction_set(path)


def _fresh_registry(base_registry_home, out_home, version: str = "base", name: str = "base"):
    """A private registry holding only a copy of the user's `version` as `name` (default `base`; each run writes its
    own versions; `version` must be a full-weight root, as `base` and a built `base-v2` are)."""
    from ..versions import Registry

    out_home = Path(out_home)
    shutil.rmtree(out_home, ignore_errors=True)
    src = Registry(base_registry_home).get(version).path
    shutil.copytree(src, out_home / "versions" / name)
    return Registry(out_home)


def _evaluate_row(registry, version_id: str, tests: list[str], test_limit: int | None, base_test: str | None,
                  router=None):
    """Accuracy of `version_id` on each test split (and the base mixture's); with a router, each question is
    answered by the version of the group its instruction routes to."""
    from ..evaluation.evaluate import evaluate
    from ..versions import load_version

    models = {}

    def model_for(vid):
        if vid not in models:
            models[vid] = load_version(registry, vid)
        return models[vid]

    def accuracy(path):
        ts = _test_set(path)
        records = ts.records[:test_limit] if test_limit else ts.records
        if router is None:
            return evaluate(*model_for(version_id), ts, limit=test_limit).accuracy
        correct = 0.0
        for vid, subset in _split(router, records).items():
            r = evaluate(*model_for(vid), dataclasses.replace(ts, records=subset))
            correct += r.accuracy * r.n
        return correct / len(records)

    row = [round(accuracy(t), 2) for t in tests]
    base_acc = round(accuracy(base_test), 2) if base_test else None
    numels = {n: p.numel() for n, p in model_for(version_id)[0].named_parameters()}
    return row, base_acc, numels


def _split(router, records) -> dict[str, list]:
    """Records by the version of the group their question is most similar to (`llaca.train.grouping`)."""
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(router.route(r.question).version, []).append(r)
    return out


def routing_accuracy(router, tasks_root, tasks, stages, test_limit=None) -> dict:
    """Per task: the share of its test questions routed to the group its own stage trained (%)."""
    group_of = {st["task"]: st["group"] for st in stages}
    per_task = {}
    for t in tasks:
        ts = _test_set(str(Path(tasks_root) / t / "test"))
        records = ts.records[:test_limit] if test_limit else ts.records
        hits = sum(router.route(r.question).group == group_of[t] for r in records)
        per_task[t] = round(100 * hits / len(records), 2)
    return {"accuracy": round(statistics.fmean(per_task.values()), 2), "per_task": per_task}


def _alpha_from_trace(trace_file: Path, numels: dict[str, int], fallback: float) -> dict[str, dict]:
    """Per tensor, over the steps after the first (the first step always uses the fallback, by definition):
    fraction of steps on the fallback, median alpha when not, and `kept` = prod(1 - alpha): the weight the stage's
    final EMA still puts on its starting point (1: the tensor learned nothing this stage, 0: it followed the raw
    weights)."""
    per: dict[str, list[float]] = {}
    move: dict[str, list[float]] = {}       # alpha * ||p - ema||_1 / N: how far the EMA moves per element per step
    with open(trace_file, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            if entry.get("alpha") and entry.get("step", 0) > 1:
                for name, a in entry["alpha"].items():
                    per.setdefault(name, []).append(a)
                    d = (entry.get("dist") or {}).get(name)
                    if d is not None and numels.get(name):
                        move.setdefault(name, []).append(a * d / numels[name])
    out = {}
    for name, alphas in per.items():
        real = [a for a in alphas if a != fallback]
        log_kept = sum(math.log1p(-a) if a < 1 else -math.inf for a in alphas)
        out[name] = {"numel": numels.get(name), "fallback_frac": 1 - len(real) / len(alphas),
                     "alpha_median": statistics.median(real) if real else None, "kept": math.exp(log_kept),
                     "alpha_all_median": statistics.median(alphas),
                     "move_median": statistics.median(move[name]) if move.get(name) else None}
    return out


def _stage_log(version) -> dict:
    log = json.loads((version.path / "train_log.json").read_text())
    tail = [e["loss"] for e in log[-10:]]
    out = {"final_loss": round(sum(tail) / len(tail), 4)}
    if log and "alpha_mean" in log[0]:
        out["alpha_trace"] = {k: [e[f"alpha_{k}"] for e in log] for k in ("mean", "min", "max", "fallback_frac")}
    return out


def _sig(x, n=4):
    return float(f"{x:.{n}g}") if isinstance(x, float) and math.isfinite(x) else x


def run_sequence(base_registry_home, tasks_root, tasks, method, rule_hparams, seed, steps, lr, batch_size, out_home,
                 *, label: str | None = None, test_limit: int | None = None, base_test: str | None = None,
                 grouping: float | None = None, keep_weights: bool = False, stage_kw: dict | None = None,
                 text_check: bool = False, log=print) -> dict:
    """Learn `tasks` one after another from `base` with rule `method`; return A, the metrics and alpha diagnostics.

    A[j][i] = accuracy (%) on task i's test split after stage j (full rows). `base_test`: the base mixture's test
    split, evaluated after the last stage. Stage weights are deleted once the next stage has loaded them.
    `grouping`: a similarity threshold turns on instruction grouping (`llaca.train.grouping.InstructionRouter`).
    `stage_kw`: more `StageConfig` fields for every stage (the regime: lora, lora_r, replay_fraction).
    `text_check`: a base with a pretrained LM (`small`): after the last stage, the language check of its build
    (agreement with the untouched SmolLM2 on `assets/small/text_check.json`).
    """
    from ..evaluation.metrics import cl_metrics
    from ..train.grouping import InstructionRouter
    from ..train.tuner import StageConfig, run_stage

    label = label or method
    t_run = time.time()
    registry = _fresh_registry(base_registry_home, out_home)
    tests = [str(Path(tasks_root) / t / "test") for t in tasks]
    fallback = float(rule_hparams.get("alpha_fallback", 0.01))
    router = InstructionRouter(grouping) if grouping else None
    parent, rows, stages, tensors, base_final = "base", [], [], {}, None
    for j, task in enumerate(tasks):
        data = Path(tasks_root) / task / "train"
        stage_method, stage_hp, start, group, texts = method, dict(rule_hparams), parent, None, []
        if router:
            texts = [r.question for r in _test_set(str(data)).records]
            group, sims = router.match(texts)
            if group is None:   # a new group: from the last version, without EMA
                stage_method, stage_hp = "seq", {}
            else:               # continue the group's own version with the rule
                start = router.groups[group].version
        traced = stage_method == "llaca"
        trace_dir = Path(out_home) / "trace" / f"stage{j}"
        t0 = time.time()
        version = run_stage(StageConfig(
            data=str(data), method=stage_method, parent=start, name=f"{label}-{task}",
            max_steps=steps, lr=lr, batch_size=batch_size, seed=seed, rule_hparams=stage_hp,
            evaluate_after=False, checkpoint_every=0, trace_dir=str(trace_dir) if traced else None,
            **(stage_kw or {})), registry)
        t1 = time.time()
        if router:
            group = router.add(group, texts, version.id)
        last = j == len(tasks) - 1
        row, base_acc, numels = _evaluate_row(registry, version.id, tests, test_limit, base_test if last else None,
                                              router)
        rows.append(row)
        base_final = base_acc if last else base_final
        stage = {"task": task, "version": version.id, "method": stage_method, "train_s": round(t1 - t0, 1),
                 "eval_s": round(time.time() - t1, 1), **_stage_log(version)}
        if router:
            stage["group"], stage["similarities"] = group, [round(x, 4) for x in sims]
        if traced:
            per_tensor = _alpha_from_trace(trace_dir / "rank0.jsonl", numels, fallback)
            for name, s in per_tensor.items():
                tensors.setdefault(name, []).append(s)
            tr = stage["alpha_trace"]
            stage["alpha"] = {"mean": _sig(statistics.fmean(tr["mean"])), "min": _sig(min(tr["min"])),
                              "max": _sig(max(tr["max"])), "fallback_frac": _sig(statistics.fmean(tr["fallback_frac"]))}
        stages.append(stage)
        if parent != "base" and not keep_weights and not router:  # loaded by the next stage; keep meta, log, replay
            shutil.rmtree(registry.get(parent).path / "model", ignore_errors=True)
        parent = version.id
        log(f"  [{label} s{seed}] stage {j + 1}/{len(tasks)} {task}: train {t1 - t0:.0f}s, eval "
            f"{stage['eval_s']:.0f}s, loss {stage['final_loss']:.3f}, row {row}")
    result = {
        "method": label, "rule": method, "rule_hparams": dict(rule_hparams), "seed": seed, "tasks": list(tasks),
        "steps": steps, "stage_kw": dict(stage_kw or {}), "A": rows,
        "metrics": {k: _round(v) for k, v in cl_metrics(rows).items()},
        "base_final": base_final, "stages": stages, "wall_s": round(time.time() - t_run, 1),
    }
    if text_check:
        result["text_final"] = _text_kept(registry, parent, base_registry_home)
    if tensors:
        result["tensors"] = _tensor_summary(tensors)
    if router:
        result["groups"] = [{"tasks": [st["task"] for st in stages if st.get("group") == k], "version": g.version}
                            for k, g in enumerate(router.groups)]
        result["routing"] = routing_accuracy(router, tasks_root, tasks, stages, test_limit)
    if not keep_weights:
        shutil.rmtree(out_home, ignore_errors=True)
    return result


def _tensor_summary(per_stage: dict[str, list[dict]]) -> list[dict]:
    out = []
    for name, stages in per_stage.items():
        medians = [s["alpha_median"] for s in stages if s["alpha_median"] is not None]
        moves = [s["move_median"] for s in stages if s.get("move_median") is not None]
        out.append({"name": name, "numel": stages[0]["numel"],
                    "fallback_frac": _sig(statistics.fmean(s["fallback_frac"] for s in stages)),
                    "alpha_all_median": _sig(statistics.median(s["alpha_all_median"] for s in stages)),
                    "move_median": _sig(statistics.median(moves)) if moves else None,
                    "alpha_median": _sig(statistics.median(medians)) if medians else None,
                    "kept": _sig(statistics.fmean(s["kept"] for s in stages))})
    return sorted(out, key=lambda t: (t["numel"] or 0, t["name"]))


def run_multitask(base_registry_home, multitask_data, tasks_root, tasks, seed, steps, lr, batch_size, out_home, *,
                  test_limit=None, base_test=None, stage_kw=None, text_check=False, log=print) -> dict:
    """One `seq` stage on the union of all tasks, len(tasks) x `steps` steps: A is a single row (Avg.ACC only)."""
    from ..train.tuner import StageConfig, run_stage

    t_run = time.time()
    registry = _fresh_registry(base_registry_home, out_home)
    total = steps * len(tasks)
    version = run_stage(StageConfig(data=str(multitask_data), method="seq", parent="base", name="multitask",
                                    max_steps=total, lr=lr, batch_size=batch_size, seed=seed, evaluate_after=False,
                                    checkpoint_every=0, **{k: v for k, v in (stage_kw or {}).items()
                                                           if k != "replay_fraction"}), registry)
    t1 = time.time()
    tests = [str(Path(tasks_root) / t / "test") for t in tasks]
    row, base_acc, _ = _evaluate_row(registry, version.id, tests, test_limit, base_test)
    log(f"  [multitask s{seed}] {total} steps: train {t1 - t_run:.0f}s, row {row}")
    stage = {"task": "all", "version": version.id, "train_s": round(t1 - t_run, 1),
             "eval_s": round(time.time() - t1, 1), **_stage_log(version)}
    text = _text_kept(registry, version.id, base_registry_home) if text_check else None
    shutil.rmtree(out_home, ignore_errors=True)
    return {"method": "multitask", "rule": "seq", "rule_hparams": {}, "seed": seed, "tasks": list(tasks),
            "steps": total, "A": [row],
            "metrics": {"avg_acc": _round(sum(row) / len(row)), "new_acc": None, "forgetting": None, "bwt": None},
            "base_final": base_acc, "stages": [stage], "wall_s": round(time.time() - t_run, 1),
            **({"text_final": text} if text else {})}


def _text_kept(registry, version_id: str, cache_home) -> dict:
    """The language check on `version_id` (agreement with SmolLM2, key accuracy); the reference's answers are
    computed once per base registry and cached there."""
    from ..versions import load_version

    return text_kept(*load_version(registry, version_id), cache_home)


def text_kept(model, processor, cache_home) -> dict:
    """`_text_kept` on a model already loaded (the reference's answers cached under `cache_home`)."""
    from .text_check import text_agreement

    r = text_agreement(model, processor, cache=Path(cache_home) / "cache")
    return {k: r[k] for k in ("n", "agreement", "small_key_accuracy", "smollm2_key_accuracy")}


LAMBDAS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def interpolation_probe(base_registry_home, tasks_root, tasks, steps, lr, batch_size, seed, out_home, *,
                        test_limit=None, base_test=None, log=print) -> dict:
    """Why an EMA of the weights keeps old skills or not: accuracy along straight lines between consecutive `seq`
    versions (base -> after task 1 -> after task 2). The EMA that LLaCA saves at the end of a stage is a weighted
    average of the stage's trajectory, i.e. close to such a line between the stage's start and its recent weights
    (`kept` in the alpha diagnostics is the weight on the start): if no point of the line keeps the old skill while
    gaining some of the new one, no choice of alpha can."""
    import torch

    from ..evaluation.evaluate import evaluate
    from ..train.tuner import StageConfig, run_stage
    from ..versions import load_version

    registry = _fresh_registry(base_registry_home, out_home)
    ids = ["base"]
    for task in tasks[:2]:
        v = run_stage(StageConfig(data=str(Path(tasks_root) / task / "train"), method="seq", parent=ids[-1],
                                  max_steps=steps, lr=lr, batch_size=batch_size, seed=seed, evaluate_after=False,
                                  checkpoint_every=0), registry)
        ids.append(v.id)
    states = [{k: t.clone() for k, t in load_version(registry, vid)[0].state_dict().items()} for vid in ids]
    model, processor = load_version(registry, "base")
    live = model.state_dict()
    tests = {t: str(Path(tasks_root) / t / "test") for t in tasks[:2]}
    if base_test:
        tests["base"] = base_test

    def curve(a: dict, b: dict) -> dict:
        out = {name: [] for name in tests}
        for lam in LAMBDAS:
            with torch.no_grad():
                for k, t in live.items():
                    if t.is_floating_point():
                        t.copy_(torch.lerp(a[k], b[k], lam))
            for name, path in tests.items():
                out[name].append(round(evaluate(model, processor, _test_set(path), limit=test_limit).accuracy, 2))
        log(f"  interpolation: {out}")
        return out

    result = {"lambdas": list(LAMBDAS), "tasks": list(tasks[:2]), "steps": steps, "seed": seed,
              "base_to_1": curve(states[0], states[1]), "1_to_2": curve(states[1], states[2])}
    shutil.rmtree(out_home, ignore_errors=True)
    return result


def _round(v, nd=2):
    return None if v is None else round(float(v), nd)


# ================================================================================================ the benchmark

def _worker_init() -> None:
    """One torch thread per process (2 processes on 2 cores beat 1 process on 2 threads for this tiny model)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run_job(job: dict) -> dict:
    _worker_init()
    common = dict(base_registry_home=job["home"], tasks_root=job["tasks_root"], tasks=job["tasks"], seed=job["seed"],
                  steps=job["steps"], lr=job["lr"], batch_size=job["batch_size"], out_home=job["run_home"],
                  test_limit=job["test_limit"], base_test=job["base_test"], text_check=bool(job.get("text_check")))
    log = functools.partial(print, flush=True)
    stage_kw = dict(job.get("stage_kw") or {})
    if job["method"] == "multitask":
        return run_multitask(multitask_data=job["multitask_data"], log=log, stage_kw=stage_kw, **common)
    rule, hp = job_rule(job)
    if job["method"] in REPLAY_MIX:
        stage_kw["replay_fraction"] = REPLAY_MIX[job["method"]]
    return run_sequence(method=rule, rule_hparams=hp, label=job["method"], grouping=GROUPED.get(job["method"]),
                        stage_kw=stage_kw, log=log, **common)


def job_rule(job: dict) -> tuple[str, dict]:
    """The rule and its hyper-parameters for a job: the method's, with --scale / --alpha-fallback on llaca rules."""
    rule, hp = method_spec(job["method"])
    if rule == "llaca":
        hp.update(job.get("llaca_hp") or {})
    return rule, hp


def prepare_data(root: Path, tasks: list[str], seed: int = DATA_SEED, n_train: int = N_TRAIN,
                 n_test: int = N_TEST, paraphrased: bool = False) -> Path:
    """CoIN-mini task folders (written once, reused by later benchmarks); `paraphrased`: the variant with ~10
    re-worded instruction templates per split (`llaca.data.paraphrase`)."""
    from ..data import coin_mini
    from ..data import paraphrase as coin_mini_paraphrase

    write = coin_mini_paraphrase.write_coin_mini_paraphrased if paraphrased else coin_mini.write_coin_mini
    root = Path(root)
    missing = [t for t in tasks if not all((root / t / s / "data.json").is_file() for s in ("train", "test"))]
    if missing:
        print(f"writing CoIN-mini tasks {missing} to {root} ...", flush=True)
        write(root, seed=seed, n_train=n_train, n_test=n_test, tasks=missing)
    return root


def _generator_fingerprint(paraphrased: bool = False) -> str:
    """Short hash of the CoIN-mini generator's source: data written by an older generator is not reused."""
    from ..data import coin_mini
    from ..data import paraphrase as coin_mini_paraphrase

    src = Path(coin_mini.__file__).read_bytes()
    if paraphrased:
        src += Path(coin_mini_paraphrase.__file__).read_bytes()
    return hashlib.sha256(src).hexdigest()[:8]


def data_root(registry, cfg: dict) -> Path:
    """Where the benchmark's CoIN-mini (or its paraphrased variant) lives under $LLACA_HOME/datasets."""
    kind = "coin-mini-paraphrased" if cfg.get("paraphrased") else "coin-mini"
    return registry.home / "datasets" / (f"{kind}-seed{DATA_SEED}-{N_TRAIN}x{N_TEST}-"
                                         f"{_generator_fingerprint(bool(cfg.get('paraphrased')))}")


def prepare_multitask(tasks_root: Path, tasks: list[str], out: Path) -> Path:
    """The union of the tasks' train sets as one instruction set (shuffled by the tuner like any stage)."""
    from ..data import load_instruction_set, write_instruction_set

    key = hashlib.sha256(json.dumps([str(tasks_root), tasks]).encode()).hexdigest()[:10]
    target = Path(out) / f"multitask-{key}" / "train"
    if not (target / "data.json").is_file():
        records = [r for t in tasks for r in _test_set(str(Path(tasks_root) / t / "train")).records]
        tmp = target.with_name("train.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_instruction_set(tmp, records)
        os.replace(tmp, target)
    load_instruction_set(target)  # validates
    return target


def base_test_split(registry, base) -> str | None:
    """The base mixture's test split (base meta `stage.test_path`), regenerated if that folder is gone; refused
    (`llaca.bases.splits.StaleTestSplit`) if its records differ from those the base was scored on."""
    from ..bases.splits import base_data_root, check_test_split

    build = base.meta.get("build") or {}
    tp = base.meta.get("stage", {}).get("test_path")
    if tp and Path(tp).is_dir():
        check_test_split(build, Path(tp))
        return tp
    if not build:
        return None  # an external checkpoint: no base mixture to check retention on
    return str(base_data_root(registry, build, strict=True) / "base" / "test")


def calibrate(registry, tasks_root: Path, tasks: list[str], batch_size: int, lr: float, test_limit, base_test,
              work: Path, stage_kw: dict | None = None) -> dict:
    """Seconds per training step and per evaluated sample on this machine now, plus the base's own row
    (zero-shot accuracy on every task, and its base-mixture accuracy): the reference the runs start from."""
    from ..evaluation.evaluate import evaluate
    from ..train.tuner import StageConfig, StageRecipe
    from ..versions import load_version

    model, processor = load_version(registry, "base")
    t0, n = time.time(), 0
    row = []
    for t in tasks:
        r = evaluate(model, processor, _test_set(str(Path(tasks_root) / t / "test")), limit=test_limit)
        row.append(round(r.accuracy, 2))
        n += r.n
    base_acc = None
    if base_test:
        r = evaluate(model, processor, _test_set(base_test), limit=test_limit)
        base_acc, n = round(r.accuracy, 2), n + r.n
    s_per_sample = (time.time() - t0) / n
    scratch = _fresh_registry(registry.home, work / "calibrate")
    times = []
    recipe = StageRecipe(StageConfig(data=str(Path(tasks_root) / tasks[0] / "train"), method="llaca", parent="base",
                                     max_steps=6, lr=lr, batch_size=batch_size, evaluate_after=False,
                                     checkpoint_every=0, **(stage_kw or {})), scratch,
                         on_event=lambda e: times.append(time.time()) if e["type"] == "step" else None)
    t_setup = time.time()
    recipe.setup()
    t_setup = time.time() - t_setup
    recipe.train()
    shutil.rmtree(work / "calibrate", ignore_errors=True)
    s_per_step = (times[-1] - times[1]) / (len(times) - 2)
    return {"s_per_step": s_per_step, "s_per_sample": s_per_sample, "s_stage_overhead": t_setup + 1.0,
            "zero_shot_row": row, "base_accuracy": base_acc}


def estimate_seconds(jobs: list[dict], cal: dict, n_workers: int) -> float:
    """Wall time if each worker keeps one core: per-job cost, longest first onto the least loaded worker."""
    costs = []
    for job in jobs:
        T = len(job["tasks"])
        n_test = (job["test_limit"] or N_TEST)
        if job["method"] == "multitask":
            steps, samples, stages = job["steps"] * T, T * n_test + 150, 1
        else:
            steps, samples, stages = job["steps"] * T, T * T * n_test + 150, T
        costs.append(steps * cal["s_per_step"] + samples * cal["s_per_sample"] + stages * cal["s_stage_overhead"])
    load = [0.0] * max(1, n_workers)
    for c in sorted(costs, reverse=True):
        load[load.index(min(load))] += c
    return max(load)


def _job_key(job: dict, base_meta: dict, legacy: bool = False) -> str:
    keep = {k: v for k, v in job.items() if k not in ("run_home",)}
    if job["method"] != "multitask" and not legacy:  # only multitask reads its set: a subset of methods reuses runs
        keep["multitask_data"] = None
    keep["base"] = [base_meta.get("created"), base_meta.get("stage", {}).get("sha256")]
    keep["spec"] = list(job_rule(job)) if job["method"] != "multitask" else "multitask"
    if job.get("base_id"):           # --base: the weights' hash names the base (its registry copy is re-creatable)
        keep["base"] = job["base_id"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cache_path(job: dict, cache: Path | None, base_meta: dict) -> Path | None:
    """The run's cache file; a run cached before 2026-11-26 under a key that also hashed the multitask set's path
    (when `multitask` was among the methods) is found there too."""
    if not cache:
        return None
    name = lambda legacy: f"{job['method']}-s{job['seed']}-{_job_key(job, base_meta, legacy)}.json"  # noqa: E731
    path, old = cache / name(False), cache / name(True)
    return old if not path.is_file() and old.is_file() else path


def run_jobs(jobs: list[dict], n_workers: int, cache: Path | None, base_meta: dict, fresh: bool = False) -> list[dict]:
    """Run (method, seed) jobs, `n_workers` spawn processes at a time; each result is cached as it finishes."""
    results: dict[int, dict] = {}
    todo = []
    for k, job in enumerate(jobs):
        path = _cache_path(job, cache, base_meta)
        if path and path.is_file() and not fresh:
            results[k] = {**json.loads(path.read_text()), "cached": True}
            print(f"cached: {job['method']} s{job['seed']} ({path.name})", flush=True)
        else:
            todo.append((k, job, path))

    def done(k, path, res):
        results[k] = res
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))
        m = res["metrics"]
        fg = "" if m["forgetting"] is None else f", Forgetting {m['forgetting']:.1f}"
        print(f"done [{len(results)}/{len(jobs)}] {res['method']} s{res['seed']}: Avg.ACC {m['avg_acc']:.1f}{fg}, "
              f"base {res['base_final']} ({res['wall_s']:.0f} s)", flush=True)

    if n_workers <= 1:
        _worker_init()
        for k, job, path in todo:
            done(k, path, _run_job(job))
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_run_job, job): (k, path) for k, job, path in todo}
            for fut in cf.as_completed(futures):
                k, path = futures[fut]
                done(k, path, fut.result())
    return [results[k] for k in range(len(jobs))]


# ================================================================================================ summaries

METRICS = ("avg_acc", "new_acc", "forgetting", "bwt", "base_final", "wall_s")


def _mean_std(values: list) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0   # sample std over seeds
    return {"mean": round(statistics.fmean(vals), 2), "std": round(std, 2), "n": len(vals)}


def summarize(runs: list[dict]) -> dict:
    """Per method: mean +- std over seeds of each metric, and the mean A matrix."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        s = {m: _mean_std([(r["metrics"].get(m) if m in r["metrics"] else r.get(m)) for r in mine]) for m in METRICS}
        A = [[round(statistics.fmean(r["A"][j][i] for r in mine), 2) for i in range(len(mine[0]["A"][0]))]
             for j in range(len(mine[0]["A"]))]
        s["text_final"] = _mean_std([(r.get("text_final") or {}).get("agreement") for r in mine])
        s["A_mean"] = A
        s["seeds"] = [r["seed"] for r in mine]
        out[name] = s
    return out


def check_targets(summary: dict) -> list[dict]:
    """The paper's effect, per LLaCA variant: Forgetting <= seq/4 (seq/2 on a pretrained base, issue 25) and <= best
    fixed EMA; Avg.ACC >= seq + 15 (+ 10) and >= best fixed EMA (best = lowest forgetting / highest accuracy among the EMA betas run)."""
    mean = lambda name, m: (summary[name][m] or {}).get("mean")   # noqa: E731
    emas = [n for n in summary if n != "multitask" and method_spec(n)[0] == "ema"]
    if "seq" not in summary or not emas:
        return []
    seq_f, seq_a = mean("seq", "forgetting"), mean("seq", "avg_acc")
    ema_f = min(mean(n, "forgetting") for n in emas) if seq_f is not None else None
    ema_a = max(mean(n, "avg_acc") for n in emas)
    out = []
    for name in [n for n in summary if is_llaca(n)]:
        f, a = mean(name, "forgetting"), mean(name, "avg_acc")
        # issue 25's bar on a pretrained base (half of seq's forgetting, +10) is implied by the original one
        checks = {"avg_acc >= seq + 10": a >= seq_a + 10, "avg_acc >= seq + 15": a >= seq_a + 15,
                  "avg_acc >= best EMA": a >= ema_a}
        if f is not None:
            checks.update({"forgetting <= seq / 2": f <= seq_f / 2, "forgetting <= seq / 4": f <= seq_f / 4,
                           "forgetting <= best EMA": f <= ema_f})
        out.append({"method": name, "checks": checks, "met": all(checks.values()), "avg_acc": a, "forgetting": f,
                    "seq": {"avg_acc": seq_a, "forgetting": seq_f}, "best_ema": {"avg_acc": ema_a, "forgetting": ema_f}})
    return out


def _fmt(s: dict | None, nd=1) -> str:
    if s is None:
        return "n/a"
    return f"{s['mean']:.{nd}f}" if s["n"] == 1 else f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


DISPLAY = {"ema0.99": "ema0.99: fixed EMA (what the released scripts likely ran)"}   # docs/llaca.md, released pipeline


def display_name(method: str) -> str:
    return DISPLAY.get(method, method)


def regime_label(cfg: dict) -> str:
    """'' for the default regime, else e.g. 'LoRA r=8, llaca scale 1.0, base base_v1-9c94...; '."""
    bits = []
    kw = cfg.get("stage_kw") or {}
    if cfg.get("recipe"):
        bits.append(f"recipe {cfg['recipe']}")
    if kw.get("lora"):
        bits.append(f"LoRA r={kw.get('lora_r', 16)}" + (f" alpha {kw['lora_alpha']}" if "lora_alpha" in kw else ""))
    if "projector_lr" in kw:
        bits.append(f"projector lr {kw['projector_lr']:g}")
    if kw.get("mixed_precision"):
        bits.append(kw["mixed_precision"])
    bits += [f"llaca {k} {v}" for k, v in (cfg.get("llaca_hp") or {}).items()]
    if cfg.get("base_id"):
        bits.append(f"base {cfg['base_id']}")
    return "; ".join(bits) + "; " if bits else ""


def markdown_table(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    ref = results["base_reference"]
    variant = " with paraphrased instructions (~10 templates per split, train and test disjoint)" if cfg.get(
        "paraphrased") else ""
    lines = [
        f"CoIN-mini{variant}, {len(cfg['tasks'])} tasks ({', '.join(cfg['tasks'])}), {cfg['steps']} steps/stage, "
        f"lr {cfg['lr']}, batch {cfg['batch_size']}, seeds {cfg['seeds']}, {cfg['test_n']} test records/task; "
        f"{regime_label(cfg)}mean ± sample std over seeds; accuracies in %.",
        "",
    ]
    text = any(s.get("text_final") for s in summary.values())  # a pretrained LM: its language check too
    lines += ["| method | Avg.ACC ↑ | New.ACC ↑ | Forgetting ↓ | BWT ↑ | base skills after last stage | "
              + ("text agreement with SmolLM2 after | " if text else "") + "s / run |",
              "|---|---|---|---|---|---|" + ("---|" if text else "") + "---|"]
    for name, s in summary.items():
        lines.append(f"| {display_name(name)} | {_fmt(s['avg_acc'])} | {_fmt(s['new_acc'])} | {_fmt(s['forgetting'])} | "
                     f"{_fmt(s['bwt'])} | {_fmt(s['base_final'])} | "
                     + (f"{_fmt(s.get('text_final'))} | " if text else "") + f"{_fmt(s['wall_s'], 0)} |")
    lines += ["", f"`base` itself: base-mixture accuracy {ref['base_accuracy']}, zero-shot on the tasks "
              f"{ref['zero_shot_row']}.", ""]
    for t in results.get("targets", []):
        got = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in t["checks"].items())
        lines.append(f"- target for `{t['method']}` {'met' if t['met'] else 'NOT met'} ({got}); seq "
                     f"{t['seq']['avg_acc']} / {t['seq']['forgetting']}, best EMA {t['best_ema']['avg_acc']} / "
                     f"{t['best_ema']['forgetting']} (Avg.ACC / Forgetting)")
    for r in results["runs"]:   # grouped runs: where each test question went, and which groups learning opened
        if r.get("routing"):
            groups = "; ".join(f"{k}: {'+'.join(g['tasks'])}" for k, g in enumerate(r["groups"]))
            lines.append(f"- `{r['method']}` seed {r['seed']}: routing accuracy {r['routing']['accuracy']:.1f}% "
                         f"(per task {r['routing']['per_task']}); groups {groups}")
    cached = sum(1 for r in results["runs"] if r.get("cached"))
    reused = f", {cached} of {len(results['runs'])} runs reused from an earlier invocation's cache" if cached else ""
    lines += ["", f"Wall time {results['wall_s'] / 60:.1f} min with --jobs {cfg['jobs']} ({results['machine']}{reused}); "
              f"estimate before starting {results['estimate_s'] / 60:.1f} min; the runs themselves took "
              f"{sum(r['wall_s'] for r in results['runs']) / 60:.0f} process-minutes."]
    return "\n".join(lines) + "\n"


# ================================================================================================ CLI

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llaca.bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small config: {QUICK}")
    p.add_argument("--methods", help=f"comma list (default {','.join(DEFAULT_METHODS)}), or 'all' to add "
                   f"{','.join(VARIANTS)}")
    p.add_argument("--tasks", help="comma list of CoIN-mini tasks, or N for the first N (default: all 8)")
    p.add_argument("--seeds", help=f"comma list of training seeds (default {','.join(map(str, SEEDS))})")
    p.add_argument("--steps", type=int, help=f"steps per stage (default {STAGE_STEPS})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {STAGE_LR})")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the LM (+ the projector) instead of "
                   "all non-vision weights; one adapter continued across stages")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: the tuner's, 16; implies --lora)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: the tuner's, 32; implies --lora)")
    p.add_argument("--projector-lr", type=float, help="the projector's own lr (LLaVA's mm_projector_lr)")
    p.add_argument("--recipe", choices=sorted(NAMED_RECIPES), help="a named stage recipe (llaca.train.recipes), e.g. "
                   "paper: LoRA r=128/alpha 256 + the projector at 2e-5, lr 2e-4, one epoch (= %d steps at batch %d); "
                   "--lr, --steps and the LoRA options still win" % (math.ceil(N_TRAIN / STAGE_BATCH), STAGE_BATCH))
    p.add_argument("--scale", type=float, help="llaca rules: the constant in alpha (default 2.0)")
    p.add_argument("--alpha-fallback", type=float, help="llaca rules: alpha outside (0, 1) (default 0.01)")
    p.add_argument("--base", help="a version folder to start from (e.g. assets/base_v1); default: the registry's "
                   "`base` (installed from assets/base)")
    p.add_argument("--batch-size", type=int, help=f"global batch (default {STAGE_BATCH})")
    p.add_argument("--test-limit", type=int, help="test records per task (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one torch thread each (default 2)")
    p.add_argument("--out", default="bench_results/quality", help="where results.json / table.md / PNGs go")
    p.add_argument("--home", help="registry with the `base` version (default $LLACA_HOME)")
    p.add_argument("--data", help="CoIN-mini folder (default $LLACA_HOME/datasets/coin-mini-...)")
    p.add_argument("--work", help="scratch registries + run cache (default $LLACA_HOME/bench/quality)")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--paraphrased", action="store_true", help="CoIN-mini with ~10 paraphrased instruction templates "
                   "per split, different in train and test (llaca.data.paraphrase)")
    p.add_argument("--interpolation", action="store_true",
                   help="only the weight-interpolation probe on the first two --tasks (interpolation.json/.png)")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    from ..data.coin_mini import DEFAULT_SEQUENCE

    q = QUICK if args.quick else {}
    tasks = args.tasks or q.get("tasks") or len(DEFAULT_SEQUENCE)
    tasks = DEFAULT_SEQUENCE[:int(tasks)] if str(tasks).isdigit() else [t.strip() for t in str(tasks).split(",")]
    unknown = [t for t in tasks if t not in DEFAULT_SEQUENCE]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {DEFAULT_SEQUENCE}")
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    if methods == ["all"]:
        methods = DEFAULT_METHODS[:-1] + VARIANTS + DEFAULT_METHODS[-1:]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(q.get("seeds") or SEEDS)
    if not seeds or not tasks or not methods:
        raise ValueError("need at least one seed, task and method")
    for m in methods:
        method_spec(m)
    if args.paraphrased and args.data:
        # --data is read as it is (whichever variant it holds): the fixed set's runs would be reused as paraphrased
        raise ValueError("--paraphrased writes and reads its own CoIN-mini variant under $LLACA_HOME/datasets; "
                         "--data would be used as it is: give one or the other")
    test_limit = args.test_limit or q.get("test_limit") or TEST_LIMIT
    batch_size = args.batch_size or STAGE_BATCH
    recipe = NAMED_RECIPES[args.recipe] if args.recipe else {}
    recipe_steps = math.ceil(recipe["epochs"] * N_TRAIN / batch_size) if recipe else None
    return {"tasks": tasks, "methods": methods, "seeds": list(seeds),
            "steps": args.steps or q.get("steps") or recipe_steps or STAGE_STEPS,
            "lr": args.lr or recipe.get("lr") or STAGE_LR, "batch_size": batch_size, "test_limit": test_limit,
            "test_n": min(test_limit or N_TEST, N_TEST), "jobs": args.jobs, "quick": bool(args.quick),
            "data_seed": DATA_SEED, "n_train": N_TRAIN, "n_test": N_TEST,
            **({"paraphrased": True} if args.paraphrased else {}), **regime_config(args)}


def regime_config(args) -> dict:
    """The regime knobs, only those set (so runs of the default regime keep their cache keys)."""
    out = {}
    recipe = NAMED_RECIPES[args.recipe] if args.recipe else {}
    kw = {k: recipe[k] for k in ("lora_r", "lora_alpha", "projector_lr", "mixed_precision") if k in recipe}
    if "mixed_precision" in kw:  # "auto" -> what this machine runs (bf16 or fp32): the cache key says what ran
        from ..train.tuner import resolve_mixed_precision

        kw["mixed_precision"] = resolve_mixed_precision(kw["mixed_precision"])
        if kw["mixed_precision"] is None:
            del kw["mixed_precision"]
    kw.update({k: v for k, v in (("lora_r", args.lora_r), ("lora_alpha", args.lora_alpha),
                                 ("projector_lr", args.projector_lr)) if v is not None})
    lora = args.lora or recipe.get("lora") or "lora_r" in kw or "lora_alpha" in kw
    if lora or kw:  # "lora" first: the regimes cached before these options keep their keys
        out["stage_kw"] = {**({"lora": True} if lora else {}), **kw}
    if args.recipe:
        out["recipe"] = args.recipe
    hp = {k: v for k, v in (("scale", args.scale), ("alpha_fallback", args.alpha_fallback)) if v is not None}
    if hp:
        out["llaca_hp"] = hp
    if args.base:
        from .bases import base_id

        out["base"], out["base_id"] = str(Path(args.base).resolve()), base_id(args.base)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.interpolation:
        return run_interpolation(cfg, out=Path(args.out), home=args.home, data=args.data, work=args.work)
    return run_benchmark(cfg, out=Path(args.out), home=args.home, data=args.data, work=args.work, fresh=args.fresh,
                         dry_run=args.dry_run)


def run_interpolation(cfg: dict, out: Path, home=None, data=None, work=None) -> int:
    from ..bases.install import ensure_base
    from ..versions import Registry
    from . import plots

    _worker_init()
    registry = Registry(home) if home else Registry()
    base = ensure_base(registry, base="tiny")
    work = Path(work) if work else registry.home / "bench" / "quality"
    tasks_root = prepare_data(Path(data) if data else registry.home / "datasets" /
                              f"coin-mini-seed{DATA_SEED}-{N_TRAIN}x{N_TEST}-{_generator_fingerprint()}", cfg["tasks"][:2])
    t0 = time.time()
    res = interpolation_probe(registry.home, tasks_root, cfg["tasks"], cfg["steps"], cfg["lr"], cfg["batch_size"],
                              cfg["seeds"][0], work / "interpolation", test_limit=cfg["test_limit"],
                              base_test=base_test_split(registry, base), log=functools.partial(print, flush=True))
    res["wall_s"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interpolation.json").write_text(json.dumps(res, indent=1))
    plots.plot_interpolation(res, out / "interpolation.png")
    print(f"wrote {out}/interpolation.json, interpolation.png ({res['wall_s'] / 60:.1f} min)")
    return 0


def run_benchmark(cfg: dict, out: Path, home=None, data=None, work=None, fresh=False, dry_run=False) -> int:
    """Run the benchmark described by `cfg` (see `resolve_config`) and write its outputs to `out`."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run_benchmark(cfg, Path(out), home, data, work, fresh, dry_run)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: dict, out: Path, home, data, work, fresh, dry_run) -> int:
    t_start = time.time()
    _worker_init()
    registry, base, work, tasks_root, base_test = setup_inputs(cfg, home, data, work)
    jobs = make_jobs(cfg, registry, tasks_root, base_test, work)
    print("calibrating (base reference row + a few training steps) ...", flush=True)
    cal = calibrate(registry, tasks_root, cfg["tasks"], cfg["batch_size"], cfg["lr"], cfg["test_limit"], base_test, work,
                    cfg.get("stage_kw"))
    todo = [j for j in jobs if fresh or not _cache_path(j, work / "cache", base.meta).is_file()]
    est = estimate_seconds(todo, cal, cfg["jobs"])
    print(f"{len(todo)} of {len(jobs)} runs to do ({len(cfg['methods'])} methods x {len(cfg['seeds'])} seeds) on {len(cfg['tasks'])} tasks x "
          f"{cfg['steps']} steps, --jobs {cfg['jobs']}; measured {cal['s_per_step']:.3f} s/step, "
          f"{cal['s_per_sample'] * 1000:.0f} ms/test sample -> expected wall time ~{est / 60:.0f} min "
          "(runs cached by an earlier invocation are reused)", flush=True)
    if est > TIME_BUDGET_S and not cfg["quick"]:
        print(f"warning: above the {TIME_BUDGET_S // 60} min budget at the speed measured now", flush=True)
    if dry_run:
        return 0
    runs = run_jobs(jobs, cfg["jobs"], work / "cache", base.meta, fresh=fresh)
    results = {
        "config": cfg,
        "machine": f"{os.cpu_count()} CPUs, {cfg['jobs']} jobs x 1 torch thread",
        "calibration": {k: round(v, 4) if isinstance(v, float) else v for k, v in cal.items()},
        "base_reference": {"zero_shot_row": cal["zero_shot_row"], "base_accuracy": cal["base_accuracy"]},
        "estimate_s": round(est, 1),
        "wall_s": round(time.time() - t_start, 1),
        "summary": summarize(runs),
        "runs": [_slim(r, keep_trace=r["seed"] == cfg["seeds"][0]) for r in runs],
    }
    results["targets"] = check_targets(results["summary"])
    write_outputs(results, out)
    print(markdown_table(results))
    print(f"wrote {out}/results.json, table.md, quality.png, alpha.png", flush=True)
    return 0


def setup_inputs(cfg: dict, home=None, data=None, work=None, bench="quality"):
    """(registry holding the base to start from, that base, work dir, CoIN-mini folder, base test split)."""
    from ..bases.install import ensure_base
    from ..versions import Registry

    registry = Registry(home) if home else Registry()
    work = Path(work) if work else registry.home / "bench" / bench
    tasks_root = prepare_data(Path(data) if data else data_root(registry, cfg), cfg["tasks"],
                              paraphrased=cfg.get("paraphrased", False))
    if cfg.get("base"):
        from .bases import registry_for_base

        registry = registry_for_base(cfg["base"], work)
    base = ensure_base(registry, base="tiny")
    return registry, base, work, tasks_root, base_test_split(registry, base)


def make_jobs(cfg: dict, registry, tasks_root, base_test, work: Path) -> list[dict]:
    """One job per (seed, method); its dict (minus run_home) plus the base is the run's cache key."""
    multitask = prepare_multitask(tasks_root, cfg["tasks"], work) if "multitask" in cfg["methods"] else None
    tag = f"{cfg['base_id']}-" if cfg.get("base_id") else ""
    return [{"method": m, "seed": s, "home": str(registry.home), "tasks_root": str(tasks_root), "tasks": cfg["tasks"],
             "steps": cfg["steps"], "lr": cfg["lr"], "batch_size": cfg["batch_size"], "test_limit": cfg["test_limit"],
             "base_test": base_test, "multitask_data": str(multitask) if multitask else None,
             "run_home": str(work / "runs" / f"{tag}{m}-s{s}"),
             **{k: cfg[k] for k in ("stage_kw", "llaca_hp", "base_id") if cfg.get(k)},
             # a pretrained LM underneath (small): check its language after the last stage (not in older cache keys)
             **({"text_check": True} if base_has_text_check(registry) else {})}
            for s in cfg["seeds"] for m in cfg["methods"]]


def base_has_text_check(registry) -> bool:
    return bool((registry.get("base").meta.get("build") or {}).get("lm"))


def _slim(run: dict, keep_trace: bool) -> dict:
    """Alpha traces (4 numbers per step) only for the first seed: enough to plot, small enough to commit."""
    run = json.loads(json.dumps(run))
    for st in run["stages"]:
        tr = st.pop("alpha_trace", None)
        if tr and keep_trace:
            st["alpha_trace"] = {k: [_sig(x) for x in v] for k, v in tr.items()}
    return run


def write_outputs(results: dict, out: Path) -> None:
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown_table(results))
    plots.plot_quality(results, out / "quality.png")
    plots.plot_alpha(results, out / "alpha.png")

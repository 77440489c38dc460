"""`python -m llaca.bench demo`: the Learn tab's demo, arm by arm, and what each arm keeps.

Each arm (`llaca.data.demo.ARMS`: a rule and a learning rate) learns the demo's CoIN-mini tasks in sequence from the
base (80 steps each, as the button does) in a private copy of the registry. After each stage the version is
evaluated on every demo task's test split (50 records each) and on the base's own test split, so the table reads
as the demo would in *Versions & evaluation*: Avg.ACC and Forgetting (`llaca.evaluation.metrics`) and what is left of the
base. `--tasks N` runs a longer demo (the first N CoIN-mini tasks); `--seeds 0 1 2` repeats each arm with the
stage seed changed. Runs are cached per (base weights, tasks, arm, seed) in `<out>/runs/`, so a run resumes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path


def arm_run(registry, arm: str, seed: int, tasks, root: Path, work: Path, base_test: str | None) -> dict:
    from ..data import demo
    from ..evaluation.evaluate import evaluate
    from ..train.tuner import StageConfig, run_stage
    from ..versions import load_version
    from .quality import _fresh_registry, _test_set

    home = work / f"{demo.slug(arm)}-seed{seed}"
    reg = _fresh_registry(registry.home, home)  # a private registry per arm
    tests = {t: _test_set(str(root / t / "test")) for t in tasks}
    base_set = _test_set(base_test) if base_test else None
    rows, t0 = [], time.time()
    for stage, config in enumerate(demo.stage_configs(root, arm, tasks), 1):
        version = run_stage(StageConfig(**config, seed=seed, evaluate_after=False), reg)
        model, processor = load_version(reg, version.id)
        row = {"stage": stage, **{t: round(evaluate(model, processor, s).accuracy, 1) for t, s in tests.items()}}
        if base_set:
            row["base"] = round(evaluate(model, processor, base_set).accuracy, 1)
        rows.append(row)
    shutil.rmtree(home, ignore_errors=True)
    return {"arm": arm, "seed": seed, **demo.ARMS[arm], "tasks": list(tasks), "after": rows,
            "seconds": round(time.time() - t0, 1)}


def run_metrics(run: dict) -> dict:
    """Avg.ACC / Forgetting of the run's accuracy matrix (rows: after each stage; columns: the tasks in order)."""
    from ..evaluation.metrics import cl_metrics

    tasks = [t for t in run["after"][0] if t not in ("stage", "base")]
    return cl_metrics([[row[t] for t in tasks] for row in run["after"]])


def table(runs: list[dict], base_row: dict) -> str:
    tasks = [t for t in runs[0]["after"][0] if t not in ("stage", "base")]
    lines = ["Base: " + ", ".join(f"{t} {base_row[t]}" for t in tasks) + f", own test {base_row.get('base')}.", "",
             f"| arm | seed | {' | '.join(tasks)} (after the last stage) | Avg.ACC | Forgetting | base test after "
             f"each stage | s |", "|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    by_arm: dict[str, list] = {}
    for r in runs:
        m = run_metrics(r)
        by_arm.setdefault(r["arm"], []).append(m)
        last = r["after"][-1]
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(str(last[t]) for t in tasks)
                     + f" | {m['avg_acc']:.1f} | {m['forgetting']:.1f} | "
                     + " / ".join(str(row.get("base")) for row in r["after"]) + f" | {r['seconds']} |")
    if any(len(ms) > 1 for ms in by_arm.values()):
        lines += ["", "| arm | seeds | Avg.ACC | Forgetting |", "|---|---|---|---|"]
        for arm, ms in by_arm.items():
            cell = lambda k: (f"{statistics.mean(m[k] for m in ms):.1f}" + (  # noqa: E731
                f" ± {statistics.stdev(m[k] for m in ms):.1f}" if len(ms) > 1 else ""))
            lines.append(f"| {arm} | {len(ms)} | {cell('avg_acc')} | {cell('forgetting')} |")
    return "\n".join(lines) + "\n"


def button_run(base: str, out: Path) -> dict:
    """The Learn tab's demo for `base` exactly as the button queues it (`llaca.data.demo.DEMOS`), its stages run one
    after another as the worker does (evaluation after each stage included) in a private copy of the registry: the
    wall time the UI promises, and the accuracy rows the jobs record."""
    import os

    import torch

    from ..bases.install import ensure_base
    from ..data import demo
    from ..models.catalog import base_version_id
    from ..train.tuner import StageConfig, run_stage
    from ..versions import Registry
    from .quality import _fresh_registry

    plan = demo.DEMOS[base]
    vid = base_version_id(plan.base)
    registry = Registry()
    ensure_base(registry, base=plan.base)
    root = demo.ensure_tasks(out / "work" / "data", plan.tasks)
    t0, arms = time.time(), {}
    for arm in plan.arms:
        home = out / "work" / f"button-{base}-{demo.slug(arm)}"
        reg = _fresh_registry(registry.home, home, version=vid, name=vid)  # the stages name `vid` as their parent
        stages, start = [], time.time()
        for config in plan.stage_configs(root, arm):
            version = run_stage(StageConfig(**config), reg)
            stages.append({"version": version.id, "seconds": round(time.time() - start, 1),
                           "test": reg.get(version.id).meta.get("metrics", {}).get("test", {})})
        arms[arm] = stages
        shutil.rmtree(home, ignore_errors=True)
    return {"base": base, "tasks": list(plan.tasks), "stage": plan.stage, "note": plan.note, "arms": arms,
            "wall_s": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
            "load_avg_end": os.getloadavg()[0]}


def main(argv=None) -> int:
    from ..bases.install import ensure_base
    from ..data import coin_mini, demo
    from ..evaluation.evaluate import evaluate
    from ..versions import Registry, load_version
    from .heldout import _base_fingerprint
    from .quality import _test_set, base_test_split

    p = argparse.ArgumentParser(prog="python -m llaca.bench demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/demo")
    p.add_argument("--arms", nargs="*", default=list(demo.ARMS), choices=list(demo.ARMS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--tasks", type=int, default=len(demo.TASKS),
                   help="the first N CoIN-mini tasks (default %(default)s: the demo's)")
    p.add_argument("--button", choices=list(demo.DEMOS), default=None,
                   help="time the Learn tab's demo on this base exactly as the button queues it (-> button_<base>.json)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.button:
        result = button_run(a.button, out)
        (out / f"button_{a.button}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    tasks = tuple(coin_mini.DEFAULT_SEQUENCE[:a.tasks])
    (out / "runs").mkdir(parents=True, exist_ok=True)
    registry = Registry()
    ensure_base(registry, base="tiny")
    fp = _base_fingerprint(registry, "base")
    base_test = base_test_split(registry, registry.get("base"))
    root = demo.ensure_tasks(out / "work" / "data", tasks)
    model, processor = load_version(registry, "base")
    base_row = {t: round(evaluate(model, processor, _test_set(str(root / t / "test"))).accuracy, 1) for t in tasks}
    if base_test:
        base_row["base"] = round(evaluate(model, processor, _test_set(base_test)).accuracy, 1)
    runs = []
    for arm in a.arms:
        for seed in a.seeds:
            cache = out / "runs" / f"{fp}-{len(tasks)}tasks-{demo.slug(arm)}-seed{seed}.json"
            if cache.is_file():
                run = json.loads(cache.read_text())
            else:
                run = arm_run(registry, arm, seed, tasks, root, out / "work", base_test)
                cache.write_text(json.dumps(run, indent=1))
            runs.append(run)
            print(json.dumps(run))
    stem = f"_{len(tasks)}tasks"
    (out / f"results{stem}.json").write_text(json.dumps({"base_sha256_12": fp, "base": base_row, "runs": runs},
                                                        indent=1) + "\n")
    text = table(runs, base_row)
    (out / f"table{stem}.md").write_text(text)
    print(text)
    return 0

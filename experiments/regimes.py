"""The regime map: where LLaCA's adaptive EMA keeps what it learned (issue 11). Runner only; the table and figures
are in `regimes_report.py`.

    python -m experiments.regimes                       # screening grid, 4 tasks, 1 seed (resumable)
    python -m experiments.regimes --dry-run             # the plan and the time estimate
    python -m experiments.regimes --report-only         # table + figures from the runs cached so far
    python -m experiments.regimes --confirm             # 3 seeds x 8 tasks on the best two screened regimes

A regime = (base, model, lr): the base to start from (a version folder: `assets/base_v1` = the previous base, and
`assets/base` = today's, both by default when they differ), full fine-tuning or LoRA (r = 8, 64), and the learning
rate. In every regime the same four methods learn the same tasks with the same steps: `seq`, `ema0.99` (the fixed EMA
that the authors' released scripts likely ran, docs/llaca.md), the faithful `llaca`, and `llaca+replay` (the adaptive
EMA over stages that also mix in 20% earlier records the registry already holds: what a product can do).

Next to the methods, a linear-connectivity probe per regime: the `seq` run keeps its stage weights and, for every
stage i, task i's accuracy (and task i+1's) is measured along the straight line from the stage-i weights to the
stage-(i+1) weights (lambda = 0, .25, .5, .75, 1; the ends are cells of `seq`'s A matrix). An EMA of weights ends a
stage near a point of that line (`kept` = the weight on the start), so it can only keep task i where the line does.
The line is drawn in the space the rule averages: all trained weights (full) or the adapter's A and B (LoRA).

Runs are the quality benchmark's (`quality.make_jobs` / `run_jobs`, same cache files under `--work`/cache), one at
a time with one torch thread; seq + probe is cached as one file. Interrupt at any time and re-run to resume.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from llaca.bench import quality as Q

# --- the screening grid (sized for 2 shared cores: see README "Regime map") ------------------------------------
SCREEN = {"tasks": 4, "steps": 80, "test_limit": 50, "seeds": [0]}
CONFIRM = {"tasks": 8, "steps": Q.STAGE_STEPS, "test_limit": None, "seeds": [0, 1, 2]}
MODELS = {"full": {}, "lora8": {"lora": True, "lora_r": 8}, "lora64": {"lora": True, "lora_r": 64}}
LRS = (1e-3, 1e-4, 3e-4)            # run in this order: 3e-4 last, the column to drop when time is short
METHODS = ["seq", "ema0.99", "llaca", "llaca+replay"]
CORE = ("seq", "llaca")             # run first in every regime, then the other methods (what a short budget keeps)
DEFAULT_BASES = ("assets/base_v1", "assets/base")   # base v1, then the shipped base (v2 since 2026-11-26)
PROBE_POINTS = (0.25, 0.5, 0.75)    # interior points; lambda 0 and 1 are cells of seq's A matrix


def regime_name(base_label: str, model: str, lr: float) -> str:
    return f"{base_label}/{model}/lr{lr:g}"


def resolve_bases(spec: str | None) -> list[tuple[str, str, str]]:
    """[(label, folder, base_id)]: the given comma list, or the default folders that exist; same weights once."""
    from llaca.bench.bases import base_id
    from llaca.paths import REPO_DIR

    paths = [Path(p) for p in spec.split(",")] if spec else [REPO_DIR / p for p in DEFAULT_BASES]
    out, seen = [], set()
    for p in paths:
        if not p.is_dir():
            if spec:
                raise ValueError(f"--bases: {p} is not a folder")
            continue
        bid = base_id(p)
        if bid.rsplit("-", 1)[1] in seen:
            continue
        seen.add(bid.rsplit("-", 1)[1])
        out.append((p.name, str(p.resolve()), bid))
    if not out:
        raise ValueError("no base folder found (give --bases)")
    return out


def grid(bases, models, lrs) -> list[dict]:
    """The regimes in run order: lr outermost (the last lr is the one to drop), then base, then model."""
    return [{"name": regime_name(label, m, lr), "base_label": label, "base": folder, "base_id": bid, "model": m,
             "lr": lr, "stage_kw": dict(MODELS[m])}
            for lr in lrs for (label, folder, bid) in bases for m in models]


def regime_cfg(regime: dict, size: dict, methods: list[str]) -> dict:
    from llaca.data.coin_mini import DEFAULT_SEQUENCE

    tasks = size["tasks"]
    tasks = list(DEFAULT_SEQUENCE[:tasks]) if isinstance(tasks, int) else list(tasks)
    cfg = {"tasks": tasks, "methods": methods, "seeds": list(size["seeds"]), "steps": size["steps"],
           "lr": regime["lr"], "batch_size": Q.STAGE_BATCH, "test_limit": size["test_limit"],
           "test_n": min(size["test_limit"] or Q.N_TEST, Q.N_TEST), "base": regime["base"],
           "base_id": regime["base_id"]}
    if regime["stage_kw"]:
        cfg["stage_kw"] = dict(regime["stage_kw"])
    return cfg


# ================================================================================================ seq + probe

def connectivity_probe(registry, version_ids: list[str], tests: list[str], A: list[list[float]], test_limit,
                       points=PROBE_POINTS, log=print) -> list[dict]:
    """For each stage i < T-1: accuracy on task i ("old") and task i+1 ("new") at lambda = 0, points..., 1 on the
    line from the stage-i to the stage-(i+1) weights. Only floating tensors that differ between the two versions
    move (the trained ones: all non-vision weights, or the LoRA adapter + projector)."""
    import torch

    from llaca.evaluation.evaluate import evaluate
    from llaca.versions import load_version

    model, processor = load_version(registry, version_ids[0])
    live = model.state_dict()
    out = []
    for i in range(len(version_ids) - 1):
        a = {k: t.clone() for k, t in load_version(registry, version_ids[i])[0].state_dict().items()}
        b = load_version(registry, version_ids[i + 1])[0].state_dict()
        moving = [k for k, t in a.items() if t.is_floating_point() and not torch.equal(t, b[k])]
        old, new = [A[i][i]], [A[i][i + 1]]
        for lam in points:
            with torch.no_grad():
                for k in moving:
                    live[k].copy_(torch.lerp(a[k], b[k], lam))
            old.append(round(evaluate(model, processor, Q._test_set(tests[i]), limit=test_limit).accuracy, 2))
            new.append(round(evaluate(model, processor, Q._test_set(tests[i + 1]), limit=test_limit).accuracy, 2))
        old.append(A[i + 1][i])
        new.append(A[i + 1][i + 1])
        out.append({"from_stage": i, "lambdas": [0.0, *points, 1.0], "old": old, "new": new,
                    "n_tensors": len(moving)})
        log(f"  probe stage {i}->{i + 1}: old {old}, new {new}")
    return out


def run_seq_with_probe(job: dict, log=print) -> dict:
    """The regime's `seq` run, keeping its stage weights for the connectivity probe, then deleting them."""
    Q._worker_init()
    res = Q.run_sequence(job["home"], job["tasks_root"], job["tasks"], "seq", {}, job["seed"], job["steps"], job["lr"],
                         job["batch_size"], job["run_home"], label="seq", test_limit=job["test_limit"],
                         base_test=job["base_test"], keep_weights=True, stage_kw=job.get("stage_kw"), log=log)
    from llaca.versions import Registry

    t0 = time.time()
    tests = [str(Path(job["tasks_root"]) / t / "test") for t in job["tasks"]]
    res["probe"] = connectivity_probe(Registry(job["run_home"]), [s["version"] for s in res["stages"]], tests,
                                      res["A"], job["test_limit"], log=log)
    res["probe_s"] = round(time.time() - t0, 1)
    res["wall_s"] = round(res["wall_s"] + res["probe_s"], 1)
    shutil.rmtree(job["run_home"], ignore_errors=True)
    return res


def probe_cache_path(job: dict, cache: Path, base_meta: dict) -> Path:
    key = hashlib.sha256(json.dumps([Q._job_key(job, base_meta), PROBE_POINTS]).encode()).hexdigest()[:12]
    return cache / f"seq-probe-s{job['seed']}-{key}.json"


# ================================================================================================ the grid

def plan(regimes: list[dict], size: dict, methods: list[str], home, data, work: Path) -> list[dict]:
    """Per regime: its config, base meta and jobs, each job with its cache path (nothing runs)."""
    out = []
    for r in regimes:
        cfg = regime_cfg(r, size, methods)
        registry, base, _, tasks_root, base_test = Q.setup_inputs(cfg, home, data, work, bench="regimes")
        jobs = Q.make_jobs(cfg, registry, tasks_root, base_test, work)
        for job in jobs:
            job["run_home"] = str(work / "runs" / f"{r['name'].replace('/', '_')}-{job['method']}-s{job['seed']}")
            path = (probe_cache_path(job, work / "cache", base.meta) if job["method"] == "seq"
                    else Q._cache_path(job, work / "cache", base.meta))
            job["_cache"] = str(path)
        out.append({"regime": r, "cfg": cfg, "base_meta": base.meta, "jobs": jobs, "registry": registry})
    return out


def estimate(planned: list[dict], cal: dict) -> float:
    todo = [j for p in planned for j in p["jobs"] if not Path(j["_cache"]).is_file()]
    s = Q.estimate_seconds(todo, cal, 1)
    for j in todo:   # the probe: (T - 1) transitions x interior points x 2 tasks
        if j["method"] == "seq":
            s += (len(j["tasks"]) - 1) * len(PROBE_POINTS) * 2 * (j["test_limit"] or Q.N_TEST) * cal["s_per_sample"]
    return s


def run_order(planned: list[dict]) -> list[tuple[dict, dict]]:
    """(plan entry, job) pairs: seq and llaca of every regime first (in grid order), then the other methods."""
    pairs = [(p, job) for p in planned for job in p["jobs"]]
    return sorted(pairs, key=lambda pj: pj[1]["method"] not in CORE)   # stable: grid order within each tier


def run_planned(planned: list[dict], fresh: bool = False, log=print) -> list[dict]:
    """Every job, one at a time (`run_order`); each result is written to its cache file as it finishes."""
    n = sum(len(p["jobs"]) for p in planned)
    k = 0
    for p, job in run_order(planned):
        k += 1
        path = Path(job["_cache"])
        if path.is_file() and not fresh:
            continue
        t0 = time.time()
        clean = {key: v for key, v in job.items() if key != "_cache"}
        res = run_seq_with_probe(clean, log=log) if job["method"] == "seq" else Q._run_job(clean)
        res["regime"] = p["regime"]["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
        m = res["metrics"]
        log(f"done [{k}/{n}] {p['regime']['name']} {job['method']}: Avg.ACC {m['avg_acc']:.1f}, Forgetting "
            f"{m['forgetting']:.1f} ({time.time() - t0:.0f} s)")
    return collect(planned)


def collect(planned: list[dict]) -> list[dict]:
    """Cached runs of the plan, each tagged with its regime; missing runs are left out (the report says n/a)."""
    runs = []
    for p in planned:
        for job in p["jobs"]:
            path = Path(job["_cache"])
            if path.is_file():
                res = json.loads(path.read_text())
                res["regime"] = p["regime"]["name"]
                for st in res.get("stages", []):
                    st.pop("alpha_trace", None)
                runs.append(res)
    return runs


# ================================================================================================ CLI

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.regimes", description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", help=f"comma list of version folders (default: those of {', '.join(DEFAULT_BASES)} that "
                   "exist, the same weights once)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="comma list, run in this order")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (seq is always run: it carries the probe)")
    p.add_argument("--tasks", help="comma list or N (default: screening 4, --confirm 8)")
    p.add_argument("--steps", type=int, help=f"steps per stage (default: screening {SCREEN['steps']}, --confirm "
                   f"{CONFIRM['steps']})")
    p.add_argument("--test-limit", type=int, help=f"test records per task (default: screening {SCREEN['test_limit']}, "
                   "--confirm all)")
    p.add_argument("--seeds", help="comma list (default: screening 0, --confirm 0,1,2)")
    p.add_argument("--confirm", action="store_true", help="3 seeds x 8 tasks on the best two regimes of the screening "
                   "results in --out (or those named by --regimes)")
    p.add_argument("--regimes", help="comma list of regime names to run (e.g. base_v1/full/lr0.0001)")
    p.add_argument("--out", default="bench_results/regimes")
    p.add_argument("--home", help="registry for the default data folder (default $LLACA_HOME)")
    p.add_argument("--data", help="CoIN-mini folder (default $LLACA_HOME/datasets/coin-mini-...)")
    p.add_argument("--work", help="scratch registries + run cache (default $LLACA_HOME/bench/regimes)")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="table + figures from the cached runs, run nothing")
    p.add_argument("--no-estimate", action="store_true", help="skip the calibration (a few steps + the base's row) "
                   "that the time estimate needs")
    return p.parse_args(argv)


def _size(args) -> dict:
    size = dict(CONFIRM if args.confirm else SCREEN)
    if args.tasks:
        size["tasks"] = int(args.tasks) if args.tasks.isdigit() else [t.strip() for t in args.tasks.split(",")]
    if args.steps:
        size["steps"] = args.steps
    if args.test_limit:
        size["test_limit"] = args.test_limit
    if args.seeds:
        size["seeds"] = [int(s) for s in args.seeds.split(",")]
    return size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models = args.models.split(",")
        bad = [m for m in models if m not in MODELS]
        if bad:
            raise ValueError(f"--models: unknown {bad}; known: {', '.join(MODELS)}")
        methods = ["seq"] + [m for m in args.methods.split(",") if m != "seq"]
        for m in methods:
            Q.method_spec(m)
        lrs = [float(x) for x in args.lrs.split(",")]
        regimes = grid(resolve_bases(args.bases), models, lrs)
        out = Path(args.out) / ("confirm" if args.confirm else "")
        if args.confirm and not args.regimes:
            args.regimes = ",".join(best_regimes(Path(args.out) / "results.json", 2))
        if args.regimes:
            wanted = args.regimes.split(",")
            unknown = [w for w in wanted if w not in {r["name"] for r in regimes}]
            if unknown:
                raise ValueError(f"--regimes: unknown {unknown}; known: {', '.join(r['name'] for r in regimes)}")
            regimes = [r for r in regimes if r["name"] in wanted]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_map(regimes, _size(args), methods, out, home=args.home, data=args.data, work=args.work,
                   fresh=args.fresh, dry_run=args.dry_run, report_only=args.report_only, confirm=args.confirm,
                   calibrate=not args.no_estimate)


def best_regimes(screen_results: Path, k: int) -> list[str]:
    """The k screened regimes where llaca measured best: most of the issue's two targets met (Forgetting <= seq/2,
    Avg.ACC >= seq + 10), then the largest Avg.ACC gain over seq."""
    if not screen_results.is_file():
        raise ValueError(f"--confirm needs the screening results ({screen_results}); run the screening first or "
                         "name --regimes")
    rows = [r for r in json.loads(screen_results.read_text())["regimes"] if r.get("llaca_gain") is not None]
    rows.sort(key=lambda r: (-r["targets_met"], -r["llaca_gain"]["avg_acc"]))
    return [r["name"] for r in rows[:k]]


def run_map(regimes, size, methods, out: Path, home=None, data=None, work=None, fresh=False, dry_run=False,
            report_only=False, confirm=False, calibrate=True, log=None) -> int:
    import torch

    from experiments import regimes_report
    from llaca.versions import Registry

    log = log or functools.partial(print, flush=True)
    threads = torch.get_num_threads()
    t_start = time.time()
    Q._worker_init()
    try:
        work = Path(work) if work else (Registry(home) if home else Registry()).home / "bench" / "regimes"
        planned = plan(regimes, size, methods, home, data, work)
        todo = [j for p in planned for j in p["jobs"] if fresh or not Path(j["_cache"]).is_file()]
        cfg0 = planned[0]["cfg"]
        log(f"{len(regimes)} regimes x {len(methods)} methods x {len(cfg0['seeds'])} seeds on {len(cfg0['tasks'])} "
            f"tasks x {cfg0['steps']} steps, {cfg0['test_n']} test records/task: {len(todo)} of "
            f"{sum(len(p['jobs']) for p in planned)} runs to do, one at a time")
        est = None
        if todo and not report_only and calibrate:
            p0 = planned[0]
            cal = Q.calibrate(p0["registry"], Path(p0["jobs"][0]["tasks_root"]), cfg0["tasks"], cfg0["batch_size"],
                              cfg0["lr"], cfg0["test_limit"], p0["jobs"][0]["base_test"], work)
            est = estimate(planned, cal)
            log(f"measured {cal['s_per_step']:.3f} s/step, {cal['s_per_sample'] * 1000:.0f} ms/test sample -> "
                f"expected wall time ~{est / 60:.0f} min")
        if dry_run:
            return 0
        runs = collect(planned) if report_only else run_planned(planned, fresh=fresh, log=log)
        results = regimes_report.build(planned, runs, size, confirm=confirm, wall_s=time.time() - t_start,
                                       estimate_s=est)
        regimes_report.write(results, out)
        log(regimes_report.markdown(results))
        log(f"wrote {out}/results.json, table.md, regimes.png, alpha_scale.png")
        return 0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())

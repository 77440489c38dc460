"""`python -m experiments.contention`: the training worker's speed when another process holds a core.

The job worker trains niced (`nice 10`) so that chat stays responsive. PyTorch's OpenMP threads spin-wait for each
other; when a busier process holds one core, the niced worker's other thread gets few time slices and every op waits
for it. This bench times a short `seq` stage (s/step, after 5 warm-up steps) in a niced subprocess, idle and beside
one busy core (a one-thread matmul loop at normal priority), for each thread setting: PyTorch's default, the
worker's `llaca.jobs.WORKER_THREAD_ENV`, OpenMP's passive waiting, and one thread. Both cases of a setting run
back to back, so its ratio is measured side by side; the machine's other load is printed with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGE = r"""
import json, os, sys, time
os.nice(10)
import torch
if os.environ.get("LLACA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LLACA_BENCH_THREADS"]))
from llaca.train.tuner import StageConfig, run_stage
from llaca.versions import Registry
stamps = []
config = StageConfig(data=sys.argv[1], parent="base", method="seq", max_steps=int(sys.argv[3]), lr=3e-4,
                     checkpoint_every=0, evaluate_after=False)
run_stage(config, Registry(sys.argv[2]), on_event=lambda e: e.get("type") == "step" and stamps.append(time.time()))
print(json.dumps({"threads": torch.get_num_threads(), "s_per_step": (stamps[-1] - stamps[4]) / (len(stamps) - 5)}))
"""
BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()"


def settings() -> dict[str, dict]:
    from llaca.jobs import WORKER_THREAD_ENV

    return {"PyTorch default": {}, f"worker ({' '.join(f'{k}={v}' for k, v in WORKER_THREAD_ENV.items())})":
            dict(WORKER_THREAD_ENV), "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "one thread": {"LLACA_BENCH_THREADS": "1"}}


def time_stage(data: Path, base_home: Path, home: Path, steps: int, env: dict, busy: bool) -> dict:
    from llaca.bench.quality import _fresh_registry

    _fresh_registry(base_home, home)  # the base alone: the stage always writes v1
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    repo = str(Path(__file__).resolve().parents[2])
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        time.sleep(1.0 if busy else 0.0)
        out = subprocess.run([sys.executable, "-c", STAGE, str(data), str(home), str(steps)], capture_output=True,
                             text=True, env={**clean, **env, "PYTHONPATH": repo}, cwd=repo, timeout=1800)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"stage subprocess failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    from llaca.bases.install import ensure_base
    from llaca.data import coin_mini
    from llaca.versions import Registry

    p = argparse.ArgumentParser(prog="python -m experiments.contention", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/contention")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    out = Path(a.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    registry = Registry()
    ensure_base(registry, base="tiny")
    data = coin_mini.write_task(work / "data", "sciqa", 400, 10, 0) / "train"
    load = os.getloadavg()[0]
    rows = []
    for name, env in settings().items():
        idle = time_stage(data, registry.home, work / "home", a.steps, env, busy=False)
        busy = time_stage(data, registry.home, work / "home", a.steps, env, busy=True)
        rows.append({"setting": name, "env": env, "threads": idle["threads"], "idle_s_per_step": idle["s_per_step"],
                     "busy_s_per_step": busy["s_per_step"], "slowdown": busy["s_per_step"] / idle["s_per_step"]})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    result = {"cpus": os.cpu_count(), "load_before": round(load, 2), "steps": a.steps, "rows": rows}
    (out / "contention.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Niced `seq` stage, {a.steps} steps ({os.cpu_count()} CPUs, 1-min load before: {load:.2f}); s/step "
             "idle and beside one busy core:", "",
             "| setting | threads | idle s/step | beside a busy core | slowdown |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['threads']} | {r['idle_s_per_step']:.3f} | {r['busy_s_per_step']:.3f} | "
              f"{r['slowdown']:.1f}x |" for r in rows]
    (out / "contention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does a small set of chat corrections get learned, without wrecking the rest? Measured on the shipped base.

    python -m llaca.bench corrections     # -> bench_results/corrections/results.json, table.md

30 corrections of one kind (default: counting questions, CoIN-mini's `vqav2` template, which the base cannot
answer) go through the product path: `CorrectionStore.add` (as the chat's Correct does), then
`corrections.learn` with the product's default method (`llaca`). The new version's own evaluation gives the two
numbers: the share of corrected answers it reproduces on those images, and its base test accuracy (the base's
150-record test split) against the base's. Goal: reproduced >= 80%, base test drop <= 5 points.

Next to the default recipe (`SmallSetRecipe()`), variants show why it is what it is: the CLI's plain defaults on
30 records (6 steps), the minimum steps without replay, and more steps. Each variant learns from `base` on the
same 30 corrections; results are cached per variant in results.json (`--fresh` recomputes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

GOAL_REPRODUCED = 80.0
GOAL_BASE_DROP = 5.0

# name -> (method, overrides of the base's own recipe); "default" is the product's recipe as shipped
# (`CORRECTION_RECIPES[base]`). The first rows are the recipe tuned on base v1, which tiny v2 lost 23 points with.
V1 = {"min_steps": 240, "replay_per_correction": 2.0, "lr": 2e-3}
VARIANTS = {
    "default": ("llaca", {}),
    "v1-recipe": ("llaca", V1),
    "plain-cli-defaults": ("llaca", {**V1, "min_steps": 0, "replay_per_correction": 0.0, "lr": 1e-3}),
    "60-steps-no-replay": ("llaca", {**V1, "min_steps": 60, "replay_per_correction": 0.0, "lr": 1e-3}),
    "60-steps": ("llaca", {**V1, "min_steps": 60, "lr": 1e-3}),
    "120-steps": ("llaca", {**V1, "min_steps": 120, "lr": 1e-3}),
    "240-steps": ("llaca", {**V1, "min_steps": 240, "lr": 1e-3}),
    "240-steps-replay1": ("llaca", {**V1, "min_steps": 240, "replay_per_correction": 1.0, "lr": 1e-3}),
    "seq-60-steps": ("seq", {**V1, "min_steps": 60, "lr": 1e-3}),
    # lower rates, more replay, fewer steps (issue 25): all reproduce the corrections; the drop is over-training
    "lr1e-3-replay4": ("llaca", {**V1, "lr": 1e-3, "replay_per_correction": 4.0}),
    "lr5e-4-replay4": ("llaca", {**V1, "lr": 5e-4, "replay_per_correction": 4.0}),
    "lr5e-4-replay2": ("llaca", {**V1, "lr": 5e-4}),
    "lr5e-4-60-steps": ("llaca", {**V1, "lr": 5e-4, "min_steps": 60}),
    "lr5e-4-60-steps-replay4": ("llaca", {**V1, "lr": 5e-4, "min_steps": 60, "replay_per_correction": 4.0}),
    "lr5e-4-120-steps-replay4": ("llaca", {**V1, "lr": 5e-4, "min_steps": 120, "replay_per_correction": 4.0}),
    "lr1e-3-60-steps-replay4": ("llaca", {**V1, "lr": 1e-3, "min_steps": 60, "replay_per_correction": 4.0}),
    "lr2e-4-60-steps-replay4": ("llaca", {**V1, "lr": 2e-4, "min_steps": 60, "replay_per_correction": 4.0}),
    "lr5e-4-60-steps-replay6": ("llaca", {**V1, "lr": 5e-4, "min_steps": 60, "replay_per_correction": 6.0}),
    "lr5e-4-3-epochs-replay4": ("llaca", {**V1, "lr": 5e-4, "min_steps": 0, "replay_per_correction": 4.0}),
    "lr5e-4-2-epochs-replay4": ("llaca", {**V1, "lr": 5e-4, "min_steps": 0, "epochs": 2.0, "replay_per_correction": 4.0}),
    "lr5e-4-20-steps-replay4": ("llaca", {**V1, "lr": 5e-4, "min_steps": 20, "epochs": 0.0, "replay_per_correction": 4.0}),
    "lr3e-4-3-epochs-replay6": ("llaca", {**V1, "lr": 3e-4, "min_steps": 0, "replay_per_correction": 6.0}),
    "lr2e-4-3-epochs-replay6": ("llaca", {**V1, "lr": 2e-4, "min_steps": 0, "replay_per_correction": 6.0}),
    "lr1e-4-3-epochs-replay4": ("llaca", {**V1, "lr": 1e-4, "min_steps": 0, "replay_per_correction": 4.0}),
    "seq-lr5e-4-3-epochs-replay4": ("seq", {**V1, "lr": 5e-4, "min_steps": 0, "replay_per_correction": 4.0}),
    "control-lr0": ("llaca", {"lr": 0.0}),  # nothing changes: the base test must read as before
    # small (LoRA): the stage recipe's lr and above
    "lr5e-4": ("llaca", {"lr": 5e-4}),
    "lr1e-3": ("llaca", {"lr": 1e-3}),
    # tiny with LoRA: a low-rank update learns less and forgets less
    "lora16-lr2e-3": ("llaca", {"lora": True, "lora_r": 16, "lora_alpha": 32, "lr": 2e-3}),
    "lora16-lr1e-3": ("llaca", {"lora": True, "lora_r": 16, "lora_alpha": 32, "lr": 1e-3}),
    "lora16-lr5e-3": ("llaca", {"lora": True, "lora_r": 16, "lora_alpha": 32, "lr": 5e-3}),
    "ema-lr1e-3-60-steps": ("ema", {"lr": 1e-3, "min_steps": 60}),
    "replay8": ("llaca", {"replay_per_correction": 8.0}),
    "lora16-lr1e-3-5-epochs": ("llaca", {"lora": True, "lora_r": 16, "lora_alpha": 32, "lr": 1e-3, "epochs": 5.0}),
    "lora16-lr1e-3-replay8-5-epochs": ("llaca", {"lora": True, "lora_r": 16, "lora_alpha": 32, "lr": 1e-3,
                                                 "epochs": 5.0, "replay_per_correction": 8.0}),
    "lr3e-4-replay8-4-epochs": ("llaca", {"lr": 3e-4, "epochs": 4.0, "replay_per_correction": 8.0}),
    # small on a kind it gets wrong (gqa regions: 63% reproduced, no base cost at its default): longer or faster
    "6-epochs": ("llaca", {"epochs": 6.0}),
    "10-epochs": ("llaca", {"epochs": 10.0}),
    "seq": ("seq", {}),  # the base's recipe with plain steps: is the EMA's lag what holds reproduction back?
}


def make_corrections(out: Path, task: str, n: int, seed: int) -> list[tuple[Path, str, str]]:
    """`n` (image, question, true answer) of one CoIN-mini task, written as PNGs."""
    from ..data import coin_mini

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for k in range(n):
        image, question, answer = coin_mini.get_task(task).sample(rng)
        path = out / f"{task}-{k:03d}.png"
        image.save(path)
        items.append((path, question, answer))
    return items


def run(home: Path, out: Path, variants: list[str], task: str = "vqav2", n: int = 30, seed: int = 123,
        fresh: bool = False, base_name: str = "tiny") -> dict:
    from ..bases.install import ensure_base
    from ..evaluation.metrics import is_correct
    from ..serve.chat import answer_once
    from ..models.catalog import BASES
    from ..train.corrections import CORRECTION_RECIPES, CorrectionStore, learn
    from .quality import base_test_split
    from ..versions import Registry, load_version

    results_file = out / "results.json"
    cached = {} if fresh or not results_file.is_file() else json.loads(results_file.read_text())
    key = f"{task}-{n}-{seed}" + ("" if base_name == "tiny" else f"-{base_name}")
    if cached.get("key") != key:
        cached = {}
    registry = Registry(home)
    base = ensure_base(registry, base=base_name)
    parent = BASES[base_name]
    store = CorrectionStore(home)
    items = make_corrections(home / "bench-images", task, n, seed)
    model, processor = load_version(registry, parent)
    base_answers = [answer_once(model, processor, str(p), q, max_new_tokens=32) for p, q, _ in items]
    from ..data import load_instruction_set
    from ..evaluation.evaluate import evaluate

    base_eval = evaluate(model, processor, load_instruction_set(base_test_split(registry, base)))  # measured here
    before = {"base_test": round(base_eval.accuracy, 2), "base_test_n": base_eval.n,
              "reproduced": round(100 * sum(is_correct(a, g) for a, (_, _, g) in zip(base_answers, items)) / n, 1),
              "example": {"question": items[0][1], "answer": base_answers[0], "corrected": items[0][2]}}
    results = {"key": key, "task": task, "n": n, "seed": seed, "base": base_name, "before": before,
               "variants": dict(cached.get("variants", {}))}
    for name in variants:
        method, overrides = VARIANTS[name]
        recipe = dataclasses.replace(CORRECTION_RECIPES[base_name], **overrides)
        done = results["variants"].get(name)
        if done and done["method"] == method and done["recipe"] == dataclasses.asdict(recipe):
            continue  # cached, with the same method and recipe
        for stale in store.list():  # left by an interrupted run: every variant learns exactly these n
            store.remove(stale.id)
        for (path, question, answer), said in zip(items, base_answers):
            store.add(path, [(question, answer)], version=parent, original=said)
        t0 = time.time()
        version = learn(store, registry, method=method, parent=parent, recipe=recipe)
        seconds = time.time() - t0
        tests = version.meta["metrics"]["test"]
        reproduced = next(d["accuracy"] for k, d in tests.items() if k.startswith("corrections-"))
        base_test = tests["base-test"]["accuracy"]
        results["variants"][name] = {
            "method": method, "recipe": dataclasses.asdict(recipe), "steps": version.meta["steps"],
            "n_train": version.meta["stage"]["n_records"], "version": version.id, "reproduced": reproduced,
            "base_test": base_test, "base_drop": round(before["base_test"] - base_test, 2),
            "met": reproduced >= GOAL_REPRODUCED and before["base_test"] - base_test <= GOAL_BASE_DROP,
            "seconds": round(seconds, 1), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"{name}: reproduced {reproduced:.1f}%  base test {base_test:.1f}%  ({seconds:.0f} s)", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
    for r in results["variants"].values():  # against this run's measurement of the base
        r["base_drop"] = round(before["base_test"] - r["base_test"], 2)
        r["met"] = r["reproduced"] >= GOAL_REPRODUCED and r["base_drop"] <= GOAL_BASE_DROP
    results["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results))
    return results


def table(results: dict) -> str:
    b = results["before"]
    lines = [f"{results['n']} corrections of one kind (CoIN-mini `{results['task']}`: "
             f"\"{b['example']['question'].splitlines()[0]}\"), learned from the shipped `{results.get('base', 'tiny')}` "
             f"(base test {b['base_test']:.2f}%, reproduces {b['reproduced']:.1f}% of the corrected answers before).",
             "", "| recipe | method | steps | lr | replay per correction | train records | reproduced % | base test % "
             "| drop (points) | goal met | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["variants"].items():
        lines.append(f"| {name} | {r['method']} | {r['steps']} | {r['recipe']['lr']:g} | "
                     f"{r['recipe']['replay_per_correction']:g} | {r['n_train']} | {r['reproduced']:.1f} | "
                     f"{r['base_test']:.2f} | {r['base_drop']:+.2f} | {'yes' if r['met'] else 'no'} | {r['seconds']} |")
    lines += ["", f"Goal: reproduced >= {GOAL_REPRODUCED:.0f}% and base test drop <= {GOAL_BASE_DROP:.0f} points.",
              f"Table written {results.get('measured', '?')}; the variants ran on a shared 2-core machine under varying "
              "load (the seconds are not comparable)" + (", one torch thread." if results.get("base", "tiny") == "tiny"
                                                          else ", two torch threads.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench corrections", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/corrections")
    p.add_argument("--home", default=None, help="a $LLACA_HOME to work in (default: a fresh temp dir, removed after)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--task", default="vqav2")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--base", choices=("tiny", "small"), default="tiny", help="the embedded base to correct")
    p.add_argument("--fresh", action="store_true", help="ignore cached variants")
    args = p.parse_args(argv)
    import torch

    if args.base == "tiny":
        torch.set_num_threads(1)  # tiny is too small to gain from a second thread
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="llaca-bench-corrections-"))
    try:
        results = run(home, Path(args.out), variants, task=args.task, n=args.n, fresh=args.fresh, base_name=args.base)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    print(table(results))
    return 0

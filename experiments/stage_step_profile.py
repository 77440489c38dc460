"""What a stage step of `small` costs with and without the tuner's two step changes, side by side in one process.

Runs the stage's own components (StageRecipe with small's CLI recipe) step by step, with a timer around each part
(encode, forward, backward, optimizer, rule), in turn for each arm of `ARMS`, alternating `--rounds` times:
- the frozen tower in train mode (what `model.train()` did: drop-connect on) or eval mode (`keep_frozen_in_eval`);
- the LM's attention as sdpa or eager (`training_attention`: eager for bf16 on CPU);
- the frozen Linear weights cast to bf16 once or by autocast on every forward (`frozen_linears_cast`);
- the frozen front of the tower computed on every step, or once per image (`tower_memo`; a first pass over a set
  computes it, a later pass reuses it).
`--profile-steps N` then prints torch.profiler's ops with the most self CPU time for the tuner's setting.

    LLACA_HOME=bench_results/small_build5/work/home PYTHONPATH=. python -m experiments.stage_step_profile \
        --out bench_results/small_batch2/step_changes.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch


def timed_steps(stage, steps: int) -> dict:
    """Per-part seconds of `steps` optimizer steps (the tuner's loop body, unrolled with timers)."""
    from llaca.train.loss import answer_loss

    parts = {k: [] for k in ("encode", "forward", "backward", "optimizer", "rule", "zero_grad", "total")}
    for step in range(steps):
        t0 = time.perf_counter()
        batches = [stage._encode(idx) for idx in stage._batches_for_step(step)]
        n_tokens = stage._global_label_tokens(batches)
        t1 = time.perf_counter()
        fwd = bwd = 0.0
        for batch in batches:
            a = time.perf_counter()
            with stage._autocast():
                loss = answer_loss(stage.model, batch, n_tokens)
            b = time.perf_counter()
            stage.accelerator.backward(loss)
            fwd, bwd = fwd + b - a, bwd + time.perf_counter() - b
        t2 = time.perf_counter()
        stage.optimizer.step()
        t3 = time.perf_counter()
        stage.rule.after_step(stage.params)
        stage.scheduler.step()
        t4 = time.perf_counter()
        stage.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, fwd, bwd, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            parts[k].append(v)
    return {k: round(statistics.median(v[1:]), 4) for k, v in parts.items()}


def set_tower_mode(model, eval_mode: bool) -> None:
    """Eval mode (`keep_frozen_in_eval`), or what the tuner did before: train mode with the frozen BatchNorms in eval."""
    for name, m in model.named_modules():
        if name.endswith("vision_tower"):
            m.train(not eval_mode)
            for bn in m.modules():
                if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                    bn.eval()


@contextlib.contextmanager
def arm(model, tower_eval: bool, attention: str, precast: bool, memo: str | None = None):
    """The stage's model set up as one arm of `ARMS`, with the tuner's own context managers."""
    from llaca.train.tower_memo import memoized_frozen_tower
    from llaca.train.tuner import frozen_linears_cast, training_attention

    set_tower_mode(model, tower_eval)
    with contextlib.ExitStack() as stack:
        if attention == "eager":
            stack.enter_context(training_attention(model, "cpu", "bf16"))
        if precast:
            stack.enter_context(frozen_linears_cast(model, torch.bfloat16))
        if memo:
            stack.enter_context(memoized_frozen_tower(model))
        yield


ARMS = {  # name -> (tower in eval mode, LM attention, frozen Linear weights pre-cast to bf16, frozen tower memo)
    "before: tower in train mode, sdpa": (False, "sdpa", False),
    "tower eval, sdpa": (True, "sdpa", False),
    "tower eval, eager": (True, "eager", False),
    "tower eval, eager, pre-cast weights": (True, "eager", True),
    # the memo: a first pass over a set computes and remembers each image's frozen tower front, a later pass reuses it
    "+ frozen tower memo, first pass": (True, "eager", True, "first"),
    "+ frozen tower memo, later passes (the tuner now)": (True, "eager", True, "later"),
}
NOW = "+ frozen tower memo, later passes (the tuner now)"


def small_stage():
    """A stage of `small` with its CLI recipe on the base's own test records (only time is read), set up for training
    as the tuner sets it up: (stage, the unwrapped model)."""
    from llaca.bench.quality import base_test_split
    from llaca.train.recipes import RECIPES, stage_fields
    from llaca.train.tuner import StageConfig, StageRecipe, keep_frozen_in_eval
    from llaca.versions import Registry

    registry = Registry()
    data = base_test_split(registry, registry.get("small"))
    cfg = StageConfig(data=str(data), parent="small", checkpoint_every=0, evaluate_after=False,
                      **{**stage_fields(RECIPES["small"]), "max_steps": 1000})
    stage = StageRecipe(cfg, registry)
    stage.setup()
    stage.model.train()
    keep_frozen_in_eval(stage.model)
    return stage, stage.accelerator.unwrap_model(stage.model)


def main(argv=None) -> int:
    from llaca.train.loss import answer_loss
    from llaca.train.recipes import RECIPES

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="steps per arm and round (the first is dropped)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=0, help="then profile this many steps of the tuner's setting")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    recipe = RECIPES["small"]
    stage, model = small_stage()
    load_start = os.getloadavg()
    batch = stage._encode(stage._batches_for_step(0)[0])
    loss = {}  # one batch's loss per arm, before any step: pre-casting is exact, eager attention nearly
    for name, setting in ARMS.items():
        with arm(model, *setting), torch.no_grad(), stage._autocast():
            loss[name] = answer_loss(stage.model, batch, 1.0).item()
    per = {name: [] for name in ARMS}
    for _ in range(args.rounds):
        for name, setting in ARMS.items():
            with arm(model, *setting):
                if setting[3:] == ("later",):
                    timed_steps(stage, args.steps)  # the same steps' images seen once: every one a memo hit below
                per[name].append(timed_steps(stage, args.steps))
    total = {name: statistics.median(p["total"] for p in runs) for name, runs in per.items()}
    before = next(iter(total.values()))
    out = {"recipe": recipe, "threads": torch.get_num_threads(), "load_avg_start": load_start,
           "load_avg_end": os.getloadavg(), "s_per_step": {k: round(v, 3) for k, v in total.items()},
           "speedup_vs_before": {k: round(before / v, 2) for k, v in total.items()},
           "parts": per, "loss_one_batch": loss}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        with arm(model, *ARMS[NOW]):
            timed_steps(stage, args.profile_steps)  # the memo's later passes: these images seen once
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                timed_steps(stage, args.profile_steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m experiments.answer_loss_speed --home DIR`: a stage step on `small` with the LM head on label positions
only (`llaca.train.loss.answer_loss`, the tuner's loss) against the head on every position (the model's own `.loss`,
what the tuner computed before), alternating, in one process: the ratio is the figure, not either time alone.

`DIR` is a $LLACA_HOME holding `small`. Both variants give the same loss and gradients (tests/test_tuner.py), so only
the time differs. Writes bench_results/small/answer_loss_speed.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from llaca.paths import atomic_write_json


def every_position(model, batch, n_tokens):
    return model(**batch, num_items_in_batch=n_tokens).loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.answer_loss_speed")
    p.add_argument("--home", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="bench_results/small/answer_loss_speed.json")
    a = p.parse_args(argv)
    os.environ["LLACA_HOME"] = str(Path(a.home).resolve())
    from llaca.bench.quality import base_test_split
    from llaca.bench.small import machine_stamp, step_seconds
    from llaca.train import tuner
    from llaca.train.loss import answer_loss
    from llaca.train.recipes import RECIPES
    from llaca.versions import Registry

    registry, recipe = Registry(), RECIPES["small"]
    data = base_test_split(registry, registry.get("small"))
    variants = {"label positions (answer_loss)": answer_loss, "every position (model .loss)": every_position}
    per = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            tuner.answer_loss = fn  # the one line of the loop that differs
            per[name].append(step_seconds(registry, data, recipe, a.steps, recipe["mixed_precision"]))
    tuner.answer_loss = answer_loss
    s = {k: round(statistics.median(v), 2) for k, v in per.items()}
    new, old = s.values()
    out = {"s_per_step": s, "runs": {k: [round(x, 2) for x in v] for k, v in per.items()},
           "speedup": round(old / new, 2), "batch": 16, **machine_stamp()}
    atomic_write_json(Path(a.out), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

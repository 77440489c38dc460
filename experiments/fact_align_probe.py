"""Stage 0' alone (`small_build.fact_align`), no LM pass: how its figures move with epochs, images and `keep`.

A build costs ~1.5-2 h on 2 cores; stage 0' alone a few minutes, on the build's own stage-2 images and cached tower
fronts (the home must hold a build's mixture and front cache: `$LLACA_HOME/cache/small-tower-*-front20`). Reports
the test images' "things" (labelled tokens whose nearest table word is one of theirs), "words" (written words read
off the bag) and, with `--keep`, the share of the untouched tail's feature variance a linear read of the tokens keeps.

    LLACA_HOME=<a build's home> PYTHONPATH=. python -m experiments.fact_align_probe --epochs 2 --keep 0 1 \\
        --out bench_results/small/fact_align_probe.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home


def main(argv=None) -> int:
    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp
    from llaca.models.small import assemble

    from .stage0_data import build_records, front_cache

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--keep", type=float, nargs="+", default=[0.0], help="one run per weight, each from the base")
    p.add_argument("--images", type=int, default=0, help="the first N of the build's stage-2 images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    home = llaca_home()
    _, tune, test, scenes = build_records(home, a.seed)
    images = sorted({str(r.image) for r in tune})[:a.images or None]
    runs = []
    for keep in a.keep:
        t0 = time.time()
        torch.manual_seed(a.seed)
        model, processor = assemble(a.seed)
        cache = front_cache(home, model, processor, images + [str(r.image) for r in test])
        info = B.fact_align(model, [Path(i) for i in images], [scenes[i] for i in images], cache,
                            processor.tokenizer, a.epochs, seed=a.seed,
                            test=([r.image for r in test], [scenes[str(r.image)] for r in test]), keep=keep)
        runs.append({"epochs": a.epochs, **info, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(runs[-1]), flush=True)
        atomic_write_json(a.out, {"home": str(home), "runs": runs, **machine_stamp()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

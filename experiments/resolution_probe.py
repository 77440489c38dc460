"""Does `small`'s frozen tower see the held-out sets better at another input size?

`small` feeds EfficientNet-Lite2 224 px images (its 7x7 stride-32 head map = 49 image tokens), while Lite2 was trained
at 260 px. A held-out stage answers Tux Paint about as well as a linear probe of the flat map (docs/base-models.md), so
the probe at each input size is the quick measure of what a larger map would give the LM, before any rebuild. For each
size: logistic-regression probes (`llaca.bench.heldout.linear_probe`) of the head map mean-pooled and flattened, on
the held-out sets' own train/test splits, plus the tower's time per image.

    LLACA_HOME=<home with small> python -m experiments.resolution_probe --sizes 224 256 288 320 \
        --out bench_results/small/resolution_probe.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def head_maps(tower, processor, images, size: int) -> tuple[torch.Tensor, float]:
    """The tower's head maps (N, C, h, w) at `size` px and the seconds its passes took."""
    maps, seconds = [], 0.0
    for i in range(0, len(images), 32):
        pix = processor.image_processor(images[i:i + 32], return_tensors="pt",
                                        size={"height": size, "width": size})["pixel_values"]
        start = time.perf_counter()
        with torch.no_grad():
            maps.append(tower(pix).last_hidden_state)
        seconds += time.perf_counter() - start
    return torch.cat(maps), seconds


def main(argv=None) -> int:
    from llaca.bench.heldout import linear_probe
    from llaca.data import heldout
    from llaca.versions import Registry, load_version

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="small")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 288, 320])
    p.add_argument("--sets", nargs="+", default=["tuxpaint", "digits"])
    p.add_argument("--out", default="bench_results/small/resolution_probe.json")
    args = p.parse_args(argv)

    model, processor = load_version(Registry(), args.version)
    tower = model.model.vision_tower.eval()
    result = {"threads": torch.get_num_threads(), "sets": {}}
    for name in args.sets:
        train, test = getattr(heldout, f"{name}_records")(0)
        y_tr, y_te = [r[2] for r in train], [r[2] for r in test]
        rows = {}
        for size in args.sizes:
            tr, sec_tr = head_maps(tower, processor, [r[0] for r in train], size)
            te, _ = head_maps(tower, processor, [r[0] for r in test], size)
            rows[size] = {"tokens": tr.shape[-1] * tr.shape[-2],
                          "pooled": linear_probe(tr.mean((2, 3)).numpy(), y_tr, te.mean((2, 3)).numpy(), y_te),
                          "flat": linear_probe(tr.flatten(1).numpy(), y_tr, te.flatten(1).numpy(), y_te),
                          "tower_ms_per_image": round(1000 * sec_tr / len(train), 1)}
            print(json.dumps({name: {size: rows[size]}}), flush=True)
        result["sets"][name] = {"n_train": len(train), "n_test": len(test), "sizes": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

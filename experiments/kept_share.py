"""How much of the untouched tower's features a linear read of stage 0''s image tokens keeps, per taught tail.

`fact_align(keep=w)` reports the share its own decoder keeps; this measures any stage-0' result the same way from
outside, with a closed-form ridge fit (tokens -> the untouched tail's per-channel standardised features) on N of the
build's stage-2 images, scored on the 300 test images: 1 - the missed share of `small_build.keep_loss`. Also the
share kept for a count probe: a ridge fit from the image's mean and max token to its number of things.

    LLACA_HOME=<a build's home> PYTHONPATH=. python -m experiments.kept_share --weights <run>/fact_align.safetensors ...
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    """(n, d) x (n, k) -> the (d + 1, k) least-squares map with a bias row and an L2 penalty `lam` x mean diagonal."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = x1.T @ x1
    gram += lam * gram.diagonal().mean() * torch.eye(len(gram), dtype=x.dtype)
    return torch.linalg.solve(gram, x1.T @ y)


def apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def count_probe_exact(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                      y_test: torch.Tensor) -> float:
    """Exact-count accuracy (%) on the test images of a ridge fit from each image's mean and max token ((n, tokens, D),
    float64) to its number of things ((n,), float64), rounded."""
    pooled = lambda x: torch.cat([x.mean(1), x.amax(1)], 1)  # noqa: E731
    guess = apply(ridge(pooled(x_train), y_train[:, None]), pooled(x_test)).squeeze(1).round()
    return round(100 * (guess == y_test).double().mean().item(), 1)


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp
    from llaca.models.small import assemble

    from .stage0_data import build_records, front_cache

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, nargs="+", required=True,
                   help="stage 0' results (fact_align.safetensors); 'none': the untouched tail's features")
    p.add_argument("--level", choices=("tokens", "head"), default="tokens",
                   help="read the image tokens (after the projector) or the taught tail's head features (before it)")
    p.add_argument("--images", type=int, default=1500, help="stage-2 images the ridge maps are fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    home = llaca_home()
    tune_all, _, test, scenes = build_records(home, a.seed)
    train = sorted({str(r.image) for r in random.Random(a.seed).sample(tune_all, a.images)})
    test_images = sorted({str(r.image) for r in test})
    model, processor = assemble(a.seed)
    everything = train + test_images
    cache = front_cache(home, model, processor, everything)
    before = B.TailFeatures(cache, model, 1, everything)  # the untouched tail

    def stack(features, images):
        return torch.stack([features[i] for i in images]).float()

    sample = stack(before, train).flatten(0, 1)
    mean, std = sample.mean(0), sample.std(0).clamp(min=1e-3)
    counts = {i: float(len(scenes[i].things)) for i in everything}
    read = B.fact_tokens if a.level == "tokens" else lambda m, f, n: B.tower_tail(m, f, n).float()
    rows = []
    for weights in a.weights:
        if str(weights) == "none":  # the reference: the untouched tail's features themselves
            tokens = before
        else:
            model.load_state_dict(load_file(str(weights)), strict=False)
            with torch.no_grad():
                tokens = {i: t for k in range(0, len(everything), 64)
                          for i, t in zip(everything[k:k + 64], read(model, stack(cache, everything[k:k + 64]), 1))}
        x_train, x_test = stack(tokens, train).double(), stack(tokens, test_images).double()
        w = ridge(x_train.flatten(0, 1), ((stack(before, train) - mean) / std).flatten(0, 1).double())
        missed = B.keep_loss(apply(w, x_test.flatten(0, 1)).float(), stack(before, test_images).flatten(0, 1),
                             mean, std)
        exact = count_probe_exact(x_train, torch.tensor([counts[i] for i in train], dtype=torch.float64), x_test,
                                  torch.tensor([counts[i] for i in test_images], dtype=torch.float64))
        rows.append({"weights": str(weights), "level": a.level, "kept_share": round(1 - missed.item(), 3),
                     "count_probe_exact": exact})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(a.out, {"home": str(home), "train_images": len(train), "test_images": len(test_images),
                              "rows": rows, **machine_stamp()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

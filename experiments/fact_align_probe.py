"""Stage 0' alone (`small_build.fact_align`), no LM pass: how its figures move with epochs, images, `keep`, a
centre word and how many of the tower's blocks it teaches (`--blocks`).

A build costs ~1.5-2 h on 2 cores; stage 0' alone a few minutes, on the build's own stage-2 images and cached tower
fronts (the home must hold a build's mixture and front cache: `$LLACA_HOME/cache/small-tower-*-front20`). Reports
the test images' "things" (labelled tokens whose nearest table word is one of theirs), "words" (written words read
off the bag), with `--keep` the share of the untouched tail's feature variance a linear read of the tokens keeps,
and two reads of how many things an image of things holds: a ridge fit from its mean and max token (as
`experiments.kept_share`, on `--count-images` stage-2 images) and, with a centre word, the number of its tokens
nearer to that word's embedding than a threshold fitted on the same images.

    LLACA_HOME=<a build's home> PYTHONPATH=. python -m experiments.fact_align_probe --epochs 4 --images 6400 \\
        --centre-word - one --out bench_results/small/fact_align_probe_centre.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home


def image_tokens(model, cache, images: list, blocks: int) -> torch.Tensor:
    """(n, tokens, D): the image tokens the LM would read for `images` (cached fronts -> tail -> projector), 64 at a
    time, no gradients."""
    from llaca.bases.small_build import fact_tokens

    with torch.no_grad():
        return torch.cat([fact_tokens(model, torch.stack([cache[i] for i in images[k:k + 64]]).float(), blocks)
                          for k in range(0, len(images), 64)])


def word_direction(model, tokenizer, word: str) -> torch.Tensor:
    """The unit vector of `word`'s mean token embedding: where stage 0' puts a token that says it."""
    from llaca.bases.small_build import answer_tokens

    emb = model.get_input_embeddings().weight.detach().float()[answer_tokens(tokenizer, word)].mean(0)
    return torch.nn.functional.normalize(emb, dim=0)


def count_reads(x_train: torch.Tensor, x_test: torch.Tensor, train_counts: list[int], test_counts: list[int],
                marker: torch.Tensor | None) -> dict:
    """Exact-count accuracy (%) on the test images' tokens `x_test` of the ridge read and, given the centre word's unit
    embedding `marker`, of counting the tokens whose cosine to it passes the threshold that counts the train images'
    tokens `x_train` best."""
    from .kept_share import count_probe_exact

    y_train = torch.tensor(train_counts, dtype=torch.float64)
    y_test = torch.tensor(test_counts, dtype=torch.float64)
    out = {"count_ridge_exact": count_probe_exact(x_train.double(), y_train, x_test.double(), y_test)}
    if marker is not None:
        cos_train = torch.nn.functional.normalize(x_train, dim=-1) @ marker
        cos_test = torch.nn.functional.normalize(x_test, dim=-1) @ marker
        best = max((((cos_train > t).sum(1) == y_train).double().mean().item(), t)
                   for t in torch.linspace(-0.2, 0.9, 111).tolist())
        out["count_marker_threshold"] = round(best[1], 3)
        out["count_marker_exact"] = round(100 * ((cos_test > best[1]).sum(1) == y_test).double().mean().item(), 1)
    return out


def main(argv=None) -> int:
    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp
    from llaca.models.small import assemble

    from .stage0_data import build_records, front_cache

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--keep", type=float, nargs="+", default=[0.0], help="one run per weight, each from the base")
    p.add_argument("--centre-word", nargs="+", default=["-"],
                   help="one run per word ('-': none) said on each thing's centre patch, each from the base")
    p.add_argument("--images", type=int, default=0, help="the first N of the build's stage-2 images (0: all)")
    p.add_argument("--count-images", type=int, default=1500, help="images of things the count reads are fitted on")
    p.add_argument("--blocks", type=int, default=0,
                   help="the tower's last N blocks + head conv that stage 0' teaches (0: the build's FACT_BLOCKS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    blocks = a.blocks or B.FACT_BLOCKS
    torch.set_num_threads(2)
    home = llaca_home()
    _, tune, test, scenes = build_records(home, a.seed)
    images = sorted({str(r.image) for r in tune})[:a.images or None]
    things = lambda pool: [i for i in pool if scenes[i].kind == "objects"]  # noqa: E731
    count_train = sorted(random.Random(a.seed).sample(things(images), min(a.count_images, len(things(images)))))
    count_test = things(sorted({str(r.image) for r in test}))
    counts = {i: len(scenes[i].things) for i in count_train + count_test}
    runs = []
    for keep in a.keep:
        for word in a.centre_word:
            word = None if word == "-" else word
            t0 = time.time()
            torch.manual_seed(a.seed)
            model, processor = assemble(a.seed)
            cache = front_cache(home, model, processor, images + [str(r.image) for r in test], blocks)
            info = B.fact_align(model, [Path(i) for i in images], [scenes[i] for i in images], cache,
                                processor.tokenizer, a.epochs, seed=a.seed,
                                test=([r.image for r in test], [scenes[str(r.image)] for r in test]), keep=keep,
                                centre_word=word, blocks=blocks)
            marker = word_direction(model, processor.tokenizer, word) if word else None
            info.update(count_reads(image_tokens(model, cache, count_train, blocks),
                                    image_tokens(model, cache, count_test, blocks),
                                    [counts[i] for i in count_train], [counts[i] for i in count_test], marker))
            runs.append({"epochs": a.epochs, "blocks": blocks, **info, "count_test_images": len(count_test),
                         "seconds": round(time.time() - t0, 1)})
            print(json.dumps(runs[-1]), flush=True)
            atomic_write_json(a.out, {"home": str(home), "runs": runs, **machine_stamp()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

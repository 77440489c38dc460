"""How many things a build's stage-0' map says an image of things holds, read off its image tokens with no LM.

`small_build --fact-count-word` teaches every token a thing owns to say the scene's number of things ("three"). This
reads the taught tokens of a build's run folder (`fact_align.safetensors`) on the test split's images of things:
- `count_word_max_exact`: the number word ("one".."six") that some token of the image is nearest to by cosine;
- `count_word_bag_exact`: the number word with the most probability summed over the tokens (each token's softmax
  over the six, weighed by how near it is to any of them), so one stray token does not decide;
- `count_ridge_exact`: `experiments.fact_align_probe`'s ridge read from the mean and max token (any build).
Exact-count accuracy in %, beside the share of the test's images of things each count answers (the prior).

    LLACA_HOME=<the build's home> PYTHONPATH=. python -m experiments.count_word_read \\
        --run <home>/cache/small-build-seed0-a150-t550-b16-twin-facts10-count --out bench_results/small/count_read.json
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home


def number_word_reads(tokens: torch.Tensor, numbers: torch.Tensor, temperature: float = 0.05) -> tuple:
    """(B, T, D) image tokens, (6, D) unit embeddings of "one".."six" -> (max read, bag read), each (B,) counts 1-6."""
    cos = torch.nn.functional.normalize(tokens, dim=-1) @ numbers.T  # (B, T, 6)
    max_read = cos.flatten(1).argmax(1) % numbers.shape[0] + 1
    weight = cos.max(-1).values.clamp(min=0)  # a background token, far from every number, weighs ~nothing
    bag = (torch.softmax(cos / temperature, -1) * weight[..., None]).sum(1)
    return max_read, bag.argmax(1) + 1


def main(argv=None) -> int:
    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp
    from llaca.data.world import NUMBER_WORDS

    from .fact_align_probe import count_reads, image_tokens, word_direction
    from .stage0_data import build_records, front_cache, readout_of, stage0_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a build's run folder holding fact_align.safetensors")
    p.add_argument("--count-images", type=int, default=1500, help="images of things the ridge read is fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    home = llaca_home()
    _, tune, test, scenes = build_records(home, a.seed)
    readout = readout_of(a.run)
    model, processor = stage0_model(a.run, a.seed, readout)
    things = lambda pool: [i for i in pool if scenes[i].kind == "objects"]  # noqa: E731
    images = sorted({str(r.image) for r in tune})
    count_train = sorted(random.Random(a.seed).sample(things(images), min(a.count_images, len(things(images)))))
    count_test = things(sorted({str(r.image) for r in test}))
    counts = {i: len(scenes[i].things) for i in count_train + count_test}
    cache = front_cache(home, model, processor, count_train + count_test, readout=readout)
    tokens = image_tokens(model, cache, count_test, B.FACT_BLOCKS)  # the test's tokens, read both ways below
    test_counts = [counts[i] for i in count_test]
    out = count_reads(image_tokens(model, cache, count_train, B.FACT_BLOCKS), tokens,
                      [counts[i] for i in count_train], test_counts, marker=None)
    numbers = torch.stack([word_direction(model, processor.tokenizer, w) for w in NUMBER_WORDS[1:]])
    max_read, bag_read = number_word_reads(tokens, numbers)
    truth = torch.tensor(test_counts)
    prior = collections.Counter(truth.tolist())
    out.update({"count_word_max_exact": round(100 * (max_read == truth).float().mean().item(), 1),
                "count_word_bag_exact": round(100 * (bag_read == truth).float().mean().item(), 1),
                "count_bag_confusion": {str(n): dict(collections.Counter(bag_read[truth == n].tolist()))
                                        for n in sorted(prior)},
                "count_test_prior": {str(n): round(100 * c / len(count_test), 1) for n, c in sorted(prior.items())},
                "count_test_images": len(count_test), "run": str(a.run), "readout": readout,
                "seconds": round(time.time() - t0, 1), **machine_stamp()})
    atomic_write_json(a.out, out)
    print(json.dumps({k: v for k, v in out.items() if k.startswith("count")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A multiple-choice-only set of base v2's world, on seeds apart from the build's: does a stage teach the matching?

`PYTHONPATH=. python bench_results/small/scripts/mcq_set.py DIR` writes DIR/train (1,200 records) and DIR/test (200).
"""
import random
import sys

from llaca.data import world
from llaca.data.coin_mini import write_split


def draws(n: int, seed: int) -> list:
    """n (image, question, answer) of the world's multiple-choice families: a scene's family is drawn up to 20 times."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        scene = world.sample_scene(rng)
        for _ in range(20):
            fam, question, answer = world._ask_family(rng, scene)
            if fam.startswith("mcq"):
                out.append((world.render(scene), question, answer))
                break
    return out


write_split(sys.argv[1] + "/train", draws(1200, 91_001), "mcq-train")
write_split(sys.argv[1] + "/test", draws(200, 91_002), "mcq-test")

"""An MCQ-only set from the base world (seeds apart from the build's): does a stage teach the letter pointer?"""
import random, sys
from llaca.data import world as W
from llaca.data.coin_mini import write_split

def draws(n, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        scene = W.sample_scene(rng)
        for _ in range(20):
            fam, q, a = W._ask_family(rng, scene)
            if fam.startswith("mcq"):
                out.append((W.render(scene), q, a))
                break
    return out

write_split(sys.argv[1] + "/train", draws(1200, 91_001), "mcq-train")
write_split(sys.argv[1] + "/test", draws(200, 91_002), "mcq-test")

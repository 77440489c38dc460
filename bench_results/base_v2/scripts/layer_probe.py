"""Linear probes on each layer of a tower (held-out Tux Paint and digits): would LLaVA-1.5's penultimate-layer
features (`vision_feature_layer=-2`) transfer better than the last layer the base reads? Session script, 2026-11-26.

    PYTHONPATH=. .venv/bin/python bench_results/base_v2/scripts/layer_probe.py [VERSION_DIR (default assets/base)]
"""
import json
import sys
from pathlib import Path

import torch

from llaca.bases import tiny as b2
from llaca.data import heldout
from llaca.bench.heldout import linear_probe
from llaca.models.llava import load_pretrained

torch.set_num_threads(1)
model, processor = load_pretrained(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/base") / "model")
tower = model.model.vision_tower.eval()


def features(images):
    """Per layer (0 = embeddings): mean-pooled and flattened patch tokens."""
    per = {}
    with torch.no_grad():
        for i in range(0, len(images), 64):
            hs = tower(b2.pixels(processor, images[i:i + 64]), output_hidden_states=True).hidden_states
            for k, h in enumerate(hs):
                per.setdefault(k, {"mean": [], "flat": []})
                per[k]["mean"].append(h[:, 1:].mean(1))
                per[k]["flat"].append(h[:, 1:].flatten(1))
    return {k: {w: torch.cat(v).numpy() for w, v in d.items()} for k, d in per.items()}


res = {}
for name in ("tuxpaint", "digits"):
    train, test = getattr(heldout, f"{name}_records")(0)
    ftr, fte = features([r[0] for r in train]), features([r[0] for r in test])
    for k in ftr:
        for which in ("mean", "flat"):
            res[f"{name} layer {k} {which}"] = linear_probe(ftr[k][which], [r[2] for r in train],
                                                            fte[k][which], [r[2] for r in test])
            print(name, k, which, res[f"{name} layer {k} {which}"], flush=True)
print(json.dumps(res))

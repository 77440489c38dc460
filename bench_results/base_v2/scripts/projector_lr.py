"""Does a faster projector help a fresh LM read the tower? The grounding bench's v2 run with the projector's lr x K.

    PYTHONPATH=. .venv/bin/python bench_results/base_v2/scripts/projector_lr.py K TOWER_DIR WORK OUT.json

(the tuner's AdamW gets two groups: the projector at K x the lr, everything else at the lr; the cosine schedule
scales both). Session experiment, 2026-11-26.
"""
import json
import sys
from pathlib import Path

import torch

from experiments import grounding

K, tower, work, out = float(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(1)
AdamW = torch.optim.AdamW


class ProjectorFasterAdamW(AdamW):
    def __init__(self, params, lr, **kw):
        named = params.mapping  # the tuner passes `dict.values()` of name -> parameter
        proj = [p for n, p in named.items() if "multi_modal_projector" in n]
        rest = [p for n, p in named.items() if "multi_modal_projector" not in n]
        assert proj, "no projector parameters found"
        super().__init__([{"params": rest, "lr": lr}, {"params": proj, "lr": lr * K}], lr=lr, **kw)


torch.optim.AdamW = ProjectorFasterAdamW
data = grounding.write_data("v2", work, 8000, 200)
r = grounding.run_one("v2", data, tower, 800, 200, shuffled_control=True, lr=5e-4)
r["projector_lr_factor"] = K
out.write_text(json.dumps(r, indent=1))
print(json.dumps({k: r[k] for k in ("accuracy", "accuracy_shuffled_images", "final_loss", "per_family")}))

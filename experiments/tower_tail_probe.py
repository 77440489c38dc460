"""Is `small`'s reading bounded by its 7x7 read-out, or by a tower that never learned to read?

`experiments.tower_readout_bound` found that a linear probe decodes ~22% of the world's written words from the frozen
stride-32 head map and concluded the read-out bounds the own test's reading family. A linear probe of *frozen*
ImageNet features cannot tell two causes apart: the 7x7 geometry, or features that were never asked to keep a word.
This trains, on the same images and split, the tower's last N blocks + head conv (BatchNorm statistics frozen, as a
stage runs them) together with one small read-out head shared by every arm: a 1x1 conv to 64 channels per image
token, flattened (49 x 64) into a linear classifier. N = 0 is the frozen tower under that head. If tuning the tail
lifts reading far above N = 0, the 7x7 map can carry the words and the next build should let the tail learn.

The blocks before the tail are frozen and run once per image (their output cached in memory), so each arm costs
only its tail. One thread per arm is enough; the result is written to --out.

    LLACA_HOME=<home with small> PYTHONPATH=. python -m experiments.tower_tail_probe \
        --out bench_results/small/tower_tail_probe.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from experiments.tower_readout_bound import in_test, records_by_family, training_split


class TailClassifier(nn.Module):
    """The tower's blocks from `first` on + head conv, then 1x1 conv -> 64 per token -> flatten -> linear."""

    def __init__(self, tower, first: int, n_classes: int):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(list(tower.encoder.blocks[first:])))
        self.top = nn.Sequential(copy.deepcopy(tower.encoder.top_conv), copy.deepcopy(tower.encoder.top_bn),
                                 copy.deepcopy(tower.encoder.top_activation))
        self.squeeze = nn.Conv2d(tower.config.hidden_dim, 64, 1)
        self.classify = nn.Linear(64 * 49, n_classes)

    def forward(self, hidden):
        for block in self.blocks:
            hidden = block(hidden)
        hidden = self.top(hidden)
        return self.classify(nn.functional.gelu(self.squeeze(hidden)).flatten(1))


def front_features(tower, processor, images: list[str], first: int, batch: int = 32) -> torch.Tensor:
    """The frozen front's output (embeddings + blocks before `first`) for every image, once."""
    from llaca.data import load_image
    from llaca.models.vision import efficientnet_front

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pix = processor.image_processor([load_image(p) for p in images[i:i + batch]],
                                            return_tensors="pt")["pixel_values"]
            out.append(efficientnet_front(tower, pix, first))
    return torch.cat(out)


def train_arm(tower, first: int, tail_blocks: int, x_tr, y_tr, x_te, y_te, n_classes: int, epochs: int,
              lr: float, seed: int) -> dict:
    """Train the last `tail_blocks` blocks (+ head conv when > 0) and the read-out head; test accuracy per epoch."""
    torch.manual_seed(seed)
    model = TailClassifier(tower, first, n_classes)
    model.eval()  # BatchNorm statistics and drop-connect as in a stage: frozen
    learn_from = len(model.blocks) - tail_blocks
    for i, block in enumerate(model.blocks):
        block.requires_grad_(i >= learn_from and tail_blocks > 0)
    model.top.requires_grad_(tail_blocks > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    head = set(map(id, [*model.squeeze.parameters(), *model.classify.parameters()]))
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) in head], "lr": 1e-3},
                             {"params": [p for p in params if id(p) not in head], "lr": lr}], weight_decay=0.01)
    curve, t0 = [], time.time()
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=g).split(32):
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = torch.cat([model(x_te[i:i + 64]).argmax(-1) for i in range(0, len(x_te), 64)])
        curve.append(round(100 * (pred == y_te).float().mean().item(), 1))
        print(json.dumps({"tail_blocks": tail_blocks, "epoch": epoch + 1, "test": curve[-1]}), flush=True)
    return {"test_per_epoch": curve, "best": max(curve), "last": curve[-1],
            "trainable": sum(p.numel() for p in params), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    from llaca.versions import Registry, load_version

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="small")
    p.add_argument("--families", nargs="*", default=["read", "group"])
    p.add_argument("--limit", type=int, default=3000, help="images per family")
    p.add_argument("--tails", nargs="*", type=int, default=[0, 1, 6], help="tower blocks that learn, per arm")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-4, help="the tower tail's rate (the head's is 1e-3)")
    p.add_argument("--out", default="bench_results/small/tower_tail_probe.json")
    a = p.parse_args(argv)
    registry = Registry()
    model, processor = load_version(registry, a.version)
    tower = model.model.vision_tower.float().eval()
    first = len(tower.encoder.blocks) - max(a.tails)
    rows_by_family = records_by_family(training_split(registry, a.version), a.limit)
    result = {"version": a.version, "threads": torch.get_num_threads(), "lr": a.lr, "epochs": a.epochs,
              "front_blocks": first, "families": {}}
    for fam in a.families:
        rows = rows_by_family[fam]
        train = [r for r in rows if not in_test(r[0])]
        test = [r for r in rows if in_test(r[0])]
        classes = sorted({r[1] for r in rows})
        y_tr = torch.tensor([classes.index(r[1]) for r in train])
        y_te = torch.tensor([classes.index(r[1]) for r in test])
        t0 = time.time()
        x_tr = front_features(tower, processor, [r[0] for r in train], first)
        x_te = front_features(tower, processor, [r[0] for r in test], first)
        entry = {"classes": len(classes), "n_train": len(train), "n_test": len(test),
                 "majority": round(100 * y_te.bincount().max().item() / len(y_te), 1),
                 "front_seconds": round(time.time() - t0, 1), "arms": {}}
        for n in a.tails:
            entry["arms"][f"last {n} blocks learn"] = train_arm(tower, first, n, x_tr, y_tr, x_te, y_te, len(classes),
                                                                a.epochs, a.lr, seed=0)
        result["families"][fam] = entry
        print(json.dumps({fam: entry}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What `small`'s frozen tower lets a linear read-out decode, per read-out: is the own test bounded by the tower?

`small` answers 2.5% of its own reading questions and 25% of its category ("group") questions however long its LM
trains (docs/base-models.md). Before a rebuild with another read-out (a 14x14 map: 4x the image tokens, ~3x the LM cost
per record), this measures what each read-out carries, on base v2's world (the build's own training images, never its
test split): a logistic regression from the tower's features to the written word (41 words) and to the object's
category (14 groups), split by image. Read-outs:

- `224 px, stride 32` (what `small` ships: the 1280-channel head map, 7x7 = 49 image tokens);
- `448 px, stride 32` (the same map at twice the input size, 14x14 = 196 tokens);
- `224 px, stride 16` (the last 14x14 block output of the same pass, fewer channels, 196 tokens);
- `224 px, stride 32 + stride 16 pooled to 7x7` (both maps of that pass side by side: 49 tokens of 1280 + 120
  channels, the LM cost of the shipped read-out).
- `224 px, stride 16, 2x2 space-to-depth` (the stride-16 map with each 2x2 patch stacked into one token: 49 tokens of
  480 channels, all of the map at the shipped LM cost; `llaca.models.vision.efficientnet_lite_s2d_tower`). Its
  "flat" probe is the whole stride-16 map, not its 7x7 average.

`--heldout` adds the held-out sets (Tux Paint, digits; `llaca.data.heldout`, their own train/test splits) for the
stride-32 head map and the space-to-depth read-out.

The two 224 px read-outs come from one pass. Each read-out is probed mean-pooled over its tokens and flattened after average-pooling its map to 7x7 (so the
flat probes have the same number of positions and the regression stays small). A probe well under the target says
the tower's read-out limits that family; one near 100% says the LM side (projector, LoRA, data) does.

    LLACA_HOME=bench_results/small/work/home python -m experiments.tower_readout_bound \
        --out bench_results/small/tower_readout_bound.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

FAMILIES = ("read", "group")
READOUTS = {"224 px, stride 32": (224, "head"), "448 px, stride 32": (448, "head"), "224 px, stride 16": (224, 16),
            "224 px, stride 32 + stride 16 pooled to 7x7": (224, "head+16"),
            "224 px, stride 16, 2x2 space-to-depth": (224, "s2d")}
PARTS = {"head+16": ("head", 16)}  # a multi-scale read-out: its parts' features side by side (49 tokens, 1400 ch)


def training_split(registry, version: str) -> Path:
    """The training split of the mixture `version` was built on (its meta's `build`), written first if missing:
    installing a base writes only the test split."""
    from llaca.data.world import ensure_mixture

    b = registry.get(version).meta["build"]
    root = ensure_mixture(registry, b["seed"], b["n_train"], b["n_test"], splits=("train",), rehearsal=b["rehearsal"])
    return root / "base" / "train"


def records_by_family(data: Path, limit: int) -> dict[str, list[tuple[str, str]]]:
    """(image path, answer) per family, one record per image, at most `limit` images per family."""
    from llaca.data import load_instruction_set
    from llaca.data.world import family

    out: dict[str, dict[str, str]] = {f: {} for f in FAMILIES}
    for r in load_instruction_set(str(data)).records:
        f = family(r.question.replace("<image>\n", ""), r.answer)
        if f in out and len(out[f]) < limit:
            out[f].setdefault(str(r.image), r.answer)
    return {f: sorted(v.items()) for f, v in out.items()}


def in_test(image: str) -> bool:
    """A fixed ~25% of images, by a hash of the path: the same split for every read-out."""
    return int(hashlib.sha256(image.encode()).hexdigest(), 16) % 4 == 0


def features(model, processor, images: list[str], size: int, layers: list, batch: int = 32) -> dict:
    """{layer: (pooled, flat, map shape)} from one tower pass per batch: each read-out's map mean-pooled, and
    average-pooled to 7x7 then flattened (float32 arrays)."""
    from llaca.data import load_image
    from llaca.models.vision import space_to_depth_reference

    tower = model.model.vision_tower.to(memory_format=torch.channels_last)
    pooled: dict = {k: [] for k in layers}
    flat: dict = {k: [] for k in layers}
    shape, index = {}, None
    for i in range(0, len(images), batch):
        pix = processor.image_processor([load_image(p) for p in images[i:i + batch]], return_tensors="pt",
                                        size={"height": size, "width": size})["pixel_values"]
        pix = pix.to(memory_format=torch.channels_last)
        with torch.no_grad():
            stride16 = bool({16, "s2d"} & set(layers))
            out = tower(pix, output_hidden_states=stride16)
            if stride16 and index is None:
                index = max(j for j, h in enumerate(out.hidden_states) if h.shape[-1] == size // 16)
        for layer in layers:
            fmap = out.last_hidden_state if layer == "head" else out.hidden_states[index]
            if layer == "s2d":
                fmap = space_to_depth_reference(fmap)
            shape[layer] = list(fmap.shape[1:])
            pooled[layer].append(fmap.mean((2, 3)))
            flat[layer].append(torch.nn.functional.adaptive_avg_pool2d(fmap, 7).flatten(1))
    return {k: (torch.cat(pooled[k]).float().numpy(), torch.cat(flat[k]).float().numpy(), shape[k]) for k in layers}


def with_parts(feats: dict, layers: list) -> dict:
    """`feats` plus each multi-scale read-out in `layers`, its parts' pooled and flat features concatenated (for a
    linear probe, the same as concatenating channels at every one of the 49 positions)."""
    import numpy as np

    for layer in layers:
        if layer in PARTS:
            parts = [feats[p] for p in PARTS[layer]]
            shape = [sum(p[2][0] for p in parts), 7, 7]
            feats[layer] = (np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), shape)
    return feats


def heldout_probes(model, processor, sets=("tuxpaint", "digits")) -> dict:
    """{set: {read-out: {"pooled", "flat"}}} on the held-out sets' own splits, for the shipped head map and the
    stride-16 space-to-depth read-out (one tower pass each)."""
    from llaca.bench.heldout import linear_probe
    from llaca.data import heldout
    from llaca.models.vision import space_to_depth_reference

    tower = model.model.vision_tower

    def feats(images):
        out = {"head": ([], []), "s2d": ([], [])}
        for i in range(0, len(images), 32):
            pix = processor.image_processor(images[i:i + 32], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                o = tower(pix, output_hidden_states=True)
            index = max(j for j, h in enumerate(o.hidden_states) if h.shape[-1] == pix.shape[-1] // 16)
            for name, fmap in (("head", o.last_hidden_state), ("s2d", space_to_depth_reference(o.hidden_states[index]))):
                out[name][0].append(fmap.mean((2, 3)))
                out[name][1].append(fmap.flatten(1))
        return {k: (torch.cat(v[0]).numpy(), torch.cat(v[1]).numpy()) for k, v in out.items()}

    result = {}
    for name in sets:
        train, test = getattr(heldout, f"{name}_records")(0)
        tr, te = feats([r[0] for r in train]), feats([r[0] for r in test])
        y_tr, y_te = [r[2] for r in train], [r[2] for r in test]
        result[name] = {k: {"pooled": linear_probe(tr[k][0], y_tr, te[k][0], y_te),
                            "flat": linear_probe(tr[k][1], y_tr, te[k][1], y_te)} for k in tr}
        result[name]["n_train"], result[name]["n_test"] = len(train), len(test)
        result[name]["majority"] = round(100 * max(y_te.count(c) for c in set(y_te)) / len(y_te), 1)
        print(json.dumps({name: result[name]}), flush=True)
    return result


def main(argv=None) -> int:
    from llaca.bench.heldout import linear_probe
    from llaca.versions import Registry, load_version

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="small")
    p.add_argument("--limit", type=int, default=800, help="images per family")
    p.add_argument("--readouts", nargs="*", default=list(READOUTS), choices=list(READOUTS))
    p.add_argument("--out", default="bench_results/small/tower_readout_bound.json")
    p.add_argument("--merge", action="store_true", help="add to the read-outs already in --out instead of replacing")
    p.add_argument("--heldout", action="store_true", help="also probe Tux Paint and digits (head map vs space-to-depth)")
    a = p.parse_args(argv)
    registry = Registry()
    model, processor = load_version(registry, a.version)
    model.eval()
    fams = records_by_family(training_split(registry, a.version), a.limit)
    result = {"version": a.version, "threads": torch.get_num_threads(), "families": {}}
    if a.merge and Path(a.out).is_file():
        result = json.loads(Path(a.out).read_text())
    for fam, rows in fams.items():
        train = [(img, ans) for img, ans in rows if not in_test(img)]
        test = [(img, ans) for img, ans in rows if in_test(img)]
        y_tr, y_te = [r[1] for r in train], [r[1] for r in test]
        majority = max(set(y_te), key=y_te.count)
        entry = {"classes": len(set(y_tr)), "n_train": len(train), "n_test": len(test),
                 "majority": round(100 * y_te.count(majority) / len(y_te), 1), "readouts": {}}
        for size in sorted({READOUTS[n][0] for n in a.readouts}):
            names = [n for n in a.readouts if READOUTS[n][0] == size]
            layers = [READOUTS[n][1] for n in names]
            passes = sorted({part for layer in layers for part in PARTS.get(layer, (layer,))}, key=str)
            t0 = time.time()
            tr = with_parts(features(model, processor, [r[0] for r in train], size, passes), layers)
            te = with_parts(features(model, processor, [r[0] for r in test], size, passes), layers)
            tower_s = round(time.time() - t0, 1)
            for name, layer in zip(names, layers):
                (p_tr, f_tr, shape), (p_te, f_te, _) = tr[layer], te[layer]
                entry["readouts"][name] = {"map": shape, "pooled": linear_probe(p_tr, y_tr, p_te, y_te),
                                           "flat_7x7": linear_probe(f_tr, y_tr, f_te, y_te),
                                           "tower_s (all read-outs of this size)": tower_s}
                print(json.dumps({"family": fam, "readout": name, **entry["readouts"][name]}), flush=True)
        if a.merge and fam in result["families"]:
            entry["readouts"] = {**result["families"][fam]["readouts"], **entry["readouts"]}
        result["families"][fam] = entry
    if a.heldout:
        result["heldout"] = heldout_probes(model, processor)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

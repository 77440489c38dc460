"""Does stage 0 (`small_build.embed_align`) put image tokens where the LM reads them as words?

Assembles `small` from the wheels with a fresh projector, fits stage 0 on the build's alignment records (cached tower
features) and reports, on the alignment set's test split (unseen images): the bag top-1 (does the most probable
vocabulary entry of the 49 tokens' mean belong to the answer?) and the untouched LM's zero-shot answers through that
projector, per attribute, against the fresh projector. Usage:
`PYTHONPATH=. python -m experiments.embed_align_probe --home /tmp/probe --epochs 3
--out bench_results/small/embed_align_probe.json`
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llaca import data as D
from llaca.bases import small_build as B
from llaca.bases.tiny import ALIGN_PHASES
from llaca.data.world import ensure_alignment, family
from llaca.evaluation import metrics
from llaca.evaluation.evaluate import generate_answers
from llaca.models.small import IMAGE_SIZE, TOWER_VARIANT, assemble
from llaca.paths import atomic_write_json
from llaca.versions import Registry


def zero_shot(model, processor, records) -> dict:
    model.eval()
    preds = generate_answers(model, processor, [D.load_image(r.image) for r in records],
                             [r.question for r in records], batch_size=16, max_new_tokens=12)
    per: dict[str, list[bool]] = {}
    for r, p in zip(records, preds):
        per.setdefault(family(r.question, r.answer), []).append(metrics.is_correct(p, r.answer))
    return {"accuracy": round(100 * sum(sum(v) for v in per.values()) / len(records), 1),
            "per_attribute": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(per.items())},
            "examples": [{"q": r.question, "a": r.answer, "p": p} for r, p in list(zip(records, preds))[:12]]}


def bag_top1(model, records, cache, tokenizer) -> float:
    table = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)
    hits = 0
    with torch.no_grad():
        for i in range(0, len(records), 32):
            chunk = records[i:i + 32]
            tokens = B.projector_of(model)(torch.stack([cache[r.image] for r in chunk]).float())
            best = B.token_bag(tokens, table).argmax(-1)
            hits += sum(int(b) in B.answer_tokens(tokenizer, r.answer) for b, r in zip(best.tolist(), chunk))
    return round(100 * hits / len(records), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    registry = Registry(a.home)
    model, processor = assemble(0)
    root = ensure_alignment(registry, 0, ALIGN_PHASES[0], B.N_ALIGN)
    train = D.load_instruction_set(root / "train").records
    test = D.load_instruction_set(root / "test").records[:a.n_test]
    cache = B.FeatureCache(registry.home / "cache" / f"small-tower-{TOWER_VARIANT}-{IMAGE_SIZE}", model, processor)
    t0 = time.time()
    cache.fill([r.image for r in train + test])
    result = {"n_train": len(train), "n_test": len(test), "cache_seconds": round(time.time() - t0, 1)}
    result["fresh"] = zero_shot(model, processor, test)
    t0 = time.time()
    result["stage0"] = B.embed_align(model, train, cache, processor.tokenizer, a.epochs)
    result["stage0"]["seconds"] = round(time.time() - t0, 1)
    result["stage0"]["bag_top1_test"] = bag_top1(model, test, cache, processor.tokenizer)
    result["after_stage0"] = zero_shot(model, processor, test)
    atomic_write_json(a.out, result)
    print(json.dumps({k: v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "examples"}
                      for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()

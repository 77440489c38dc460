"""`python -m llaca.bench heldout`: what the base brings to data it never saw.

Two questions the base v2 issue asks, measured on the version `base` of a registry:

1. Zero-shot: accuracy on every CoIN-mini task's test split before any stage (LLaVA-1.5 on CoIN is partly
   right zero-shot; base v1 was at 0% on 7 of 8), plus the base's own test split.
2. Real images of a new kind (`llaca.data.heldout`: Tux Paint drawings, scanned handwritten digits — sources the
   base never pre-trained on): one stage with the CLI defaults (`python -m llaca learn DATA/train`: the variant
   "CLI defaults"; "frozen tower" is the faithful rule alone at lr 1e-3 for 3 epochs, the default until
   2026-11-26), test-split accuracy, with other variants (the tower trained, LoRA, other rules), and what the
   stage costs the base skills (its base test after the stage).

Runs are cached per (base weights, set, variant) in `<out>/runs/`, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from ..evaluation.evaluate import zero_shot

VARIANTS = {"frozen tower": {"train_vision": False}, "tower trained": {"train_vision": True},
            # the same with plain fine-tuning, to tell what the tower does from what the update rule does
            "frozen tower, seq": {"train_vision": False, "method": "seq"},
            "tower trained, seq": {"train_vision": True, "method": "seq"},
            # only the blocks nearest the LM adapt (`--vision-blocks N`), full weights or LoRA (`--lora`)
            "last block trained": {"vision_blocks": 1}, "last 2 blocks trained": {"vision_blocks": 2},
            "LoRA": {"lora": True}, "LoRA + last 2 tower blocks": {"lora": True, "vision_blocks": 2},
            # 20% of the stage's records replayed from the base's own mixture (`replay/` of the base version)
            "frozen tower, replay": {"method": "replay"}, "frozen tower, llaca+replay": {"replay_fraction": 0.2},
            # the same at the rate where replay forgot least over CoIN-mini (docs/method.md 'The default recipe')
            "frozen tower, replay, lr 3e-4": {"method": "replay", "lr": 3e-4},
            "frozen tower, llaca+replay, lr 3e-4": {"replay_fraction": 0.2, "lr": 3e-4},
            # `learn` with no options: the version's base recipe (llaca.train.recipes), resolved when the stage runs
            "CLI defaults": {}}
DEFAULT_VARIANTS = ["CLI defaults", "frozen tower", "tower trained"]


def linear_probe(x_train, y_train, x_test, y_test) -> float:
    """Test accuracy (%) of a logistic regression fitted on standardised training features (the tower probes' read-out)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000).fit((x_train - mu) / sd, y_train)
    return round(100 * clf.score((x_test - mu) / sd, y_test), 1)


def readout_probes(model, processor, readouts=("mean", "flat"), sets=("tuxpaint", "digits")) -> dict:
    """`{"<set>_<readout>": accuracy}`: linear probes of the tower's last layer on the held-out sets, built in memory
    (`llaca.data.heldout.<set>_records(0)`), for tower experiments that have no version on disk. Readouts: "cls" (CLIP's
    CLS token), "mean" (patch tokens mean-pooled), "flat" (patch tokens flattened)."""
    import torch

    from ..bases.tiny import pixels
    from ..data import heldout

    tower = model.model.vision_tower

    def features(images, readout):
        outs = []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                h = tower(pixels(processor, images[i:i + 64]), output_hidden_states=True).hidden_states[-1]
                patches = h[:, 1:]
                outs.append(h[:, 0] if readout == "cls" else patches.mean(1) if readout == "mean" else patches.flatten(1))
        return torch.cat(outs).numpy()

    out = {}
    for name in sets:
        train, test = getattr(heldout, f"{name}_records")(0)
        for readout in readouts:
            out[f"{name}_{readout}"] = linear_probe(features([r[0] for r in train], readout), [r[2] for r in train],
                                                    features([r[0] for r in test], readout), [r[2] for r in test])
    return out


def tower_probe(model, processor, data_root: Path, name: str) -> dict:
    """Linear probe (logistic regression on standardised features) of the frozen tower, train split -> test split.

    The features are those LLaVA reads (hidden state `vision_feature_layer`, CLS dropped), mean-pooled and
    flattened: a reference for a frozen-tower stage (not a bound: the LM reads them non-linearly). A stage far
    below the probe is limited by the stage recipe; one at the probe, by the tower's features.
    """
    import torch

    from ..data import load_image, load_instruction_set
    from ..models.llava import image_tokens

    def features(split: str):
        records = load_instruction_set(str(data_root / name / split)).records
        pooled, flat = [], []
        with torch.no_grad():
            for i in range(0, len(records), 64):
                images = [load_image(r.image) for r in records[i:i + 64]]
                tokens = image_tokens(model, processor.image_processor(images, return_tensors="pt")["pixel_values"])
                pooled.append(tokens.mean(1).float())
                flat.append(tokens.flatten(1).float())
        return torch.cat(pooled).numpy(), torch.cat(flat).numpy(), [r.answer for r in records]

    (p_tr, f_tr, y_tr), (p_te, f_te, y_te) = features("train"), features("test")
    out = {kind: linear_probe(x_tr, y_tr, x_te, y_te) for kind, x_tr, x_te in (("pooled", p_tr, p_te),
                                                                                ("flat", f_tr, f_te))}
    majority = max(set(y_te), key=y_te.count)
    out["majority"] = round(100 * y_te.count(majority) / len(y_te), 1)
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`["lr=1e-3", "method=replay", "epochs=2"]` -> {"lr": 0.001, "method": "replay", "epochs": 2}: whole numbers
    as ints, other numbers as floats, true/false as bools, anything else as text; a pair without '=' or with a key
    that is not a stage option is an error."""
    from ..train.tuner import StageConfig

    known = set(StageConfig.__dataclass_fields__)
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY one of the stage's options "
                             f"({', '.join(sorted(known))})")
        low = text.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            for kind in (int, float, str):
                try:
                    out[key] = kind(text)
                    break
                except ValueError:
                    continue
    return out


def _base_fingerprint(registry, version: str) -> str:
    weights = registry.get(version).path / "model" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "external"


def stage_run(registry, version: str, data_root: Path, name: str, variant: str, work: Path,
              base_test: str | None, seed: int = 0, max_steps: int | None = None, config: dict | None = None,
              text_check: bool = False, train_eval: int = 0) -> dict:
    """One stage from `version` on `<data_root>/<name>/train`, scored on its test split and the base's test; with
    `text_check`, also the language check on the stage's version (does the chat LM still answer text questions as
    SmolLM2 does after learning images?), and with `train_eval` the accuracy on that many of the stage's own
    training records (underfit or overfit?)."""
    from ..evaluation.evaluate import evaluate
    from ..train.progress import progress_printer
    from ..train.tuner import StageConfig, run_stage
    from ..versions import load_version
    from .quality import _fresh_registry, _test_set, text_kept

    reg = _fresh_registry(registry.home, work / f"{name}-{variant.replace(' ', '_').replace(',', '')}", version)
    t0 = time.time()
    cfg = StageConfig(data=str(data_root / name / "train"), parent="base", checkpoint_every=0,
                      evaluate_after=False, seed=seed, max_steps=max_steps, **(config or VARIANTS[variant]))
    learned = run_stage(cfg, reg, on_event=progress_printer(f"{name}, {variant}, seed {seed}"))
    seconds = time.time() - t0
    model, processor = load_version(reg, learned.id)
    test_set = _test_set(str(data_root / name / "test"))
    test = evaluate(model, processor, test_set)
    retained = evaluate(model, processor, _test_set(base_test)).accuracy if base_test else None
    extra = {}
    if train_eval:
        train = _test_set(str(data_root / name / "train"))
        train.records = train.records[:train_eval]
        extra["train_accuracy"] = round(evaluate(model, processor, train).accuracy, 1)
    if text_check:
        extra["text_after"] = text_kept(model, processor, registry.home)
    shutil.rmtree(reg.home, ignore_errors=True)
    return {"set": name, "variant": variant, "seed": seed, "method": cfg.method, "steps": learned.meta.get("steps"),
            "test_accuracy": round(test.accuracy, 1), "n_test": test.n,
            "base_test_after": None if retained is None else round(retained, 1), "seconds": round(seconds, 1), **extra,
            **answer_profile(test.predictions, [r.answer for r in test_set.records])}


def answer_profile(predictions: list[str], answers: list[str], top: int = 5) -> dict:
    """What the stage answers and its commonest mistakes: tells 'never learned the labels' from 'confuses two'."""
    from collections import Counter

    said = Counter(p.strip().lower() for p in predictions)
    wrong = Counter(f"{a.strip().lower()} -> {p.strip().lower()}" for p, a in zip(predictions, answers)
                    if p.strip().lower() != a.strip().lower())
    return {"answers_given": dict(said.most_common(top)), "top_mistakes": dict(wrong.most_common(top))}


def main(argv=None) -> int:
    from ..bases.install import ensure_base
    from ..data import coin_mini, heldout
    from ..models.catalog import BASES
    from ..train.recipes import recipe_for, stage_fields
    from ..versions import Registry, load_version
    from .quality import base_test_split

    p = argparse.ArgumentParser(prog="python -m llaca.bench heldout", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/heldout")
    p.add_argument("--sets", nargs="*", default=list(heldout.SETS))
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--version", default="base", help="the base version to start from (e.g. base-v2)")
    p.add_argument("--zero-shot-limit", type=int, default=100, help="test records per CoIN-mini task")
    p.add_argument("--skip-zero-shot", action="store_true")
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="stage seeds (batch order, replayed records)")
    p.add_argument("--max-steps", type=int, default=None, help="cap each stage (a quick check; default: the CLI's "
                   "epochs)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="change the 'CLI defaults' recipe, e.g. --set lr=1e-3 method=replay (to find a better default)")
    p.add_argument("--text-check", action="store_true", help="after each stage, the language check on its version "
                   "(agreement with SmolLM2-135M-Instruct on assets/small/text_check.json; a pretrained base only)")
    p.add_argument("--train-eval", type=int, default=0, metavar="N",
                   help="also score each stage on N of its own training records (tells underfitting from overfitting)")
    a = p.parse_args(argv)
    overrides = parse_overrides(a.overrides)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    work = out / "work"
    registry = Registry()
    ensure_base(registry, base=next((n for n, vid in BASES.items() if vid == a.version), None))
    fp = _base_fingerprint(registry, a.version)
    results = {"version": a.version, "base_sha256_12": fp, "stages": []}
    model, processor = load_version(registry, a.version)
    base_test = base_test_split(registry, registry.get(a.version))  # once: checked against the base's fingerprint
    data = work / "data"
    if not a.skip_zero_shot:
        coin_root = data / "coin-mini"
        if not (coin_root / "ocrvqa" / "test" / "data.json").is_file():
            coin_mini.write_coin_mini(coin_root)
        results.update(zero_shot(model, processor, coin_root, a.zero_shot_limit, base_test))
        print(json.dumps({k: results[k] for k in ("zero_shot", "tasks_in_10_70", "base_test")}))
    results["probe"] = {}
    for name in a.sets:
        if not (data / name / "test" / "data.json").is_file():
            heldout.write_sets(data, [name])
        results["probe"][name] = tower_probe(model, processor, data, name)
        print(json.dumps({"probe": name, **results["probe"][name]}))
        for variant in a.variants:
            for seed in a.seeds:
                # seed 0 at full length keeps the key it was cached under before these options
                tag = (f"-seed{seed}" if seed else "") + (f"-steps{a.max_steps}" if a.max_steps else "")
                label = variant + "".join(f", {k}={v}" for k, v in overrides.items())
                slug = label.replace(" ", "_").replace(",", "").replace("=", "")
                if variant == "CLI defaults":  # what `learn` runs from this version: its base's recipe, which changes
                    config = stage_fields({**recipe_for(registry, a.version), **overrides})
                    slug += "-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
                else:
                    config = {**VARIANTS[variant], **overrides}
                cache = out / "runs" / f"{fp}-{name}-{slug}{tag}.json"
                wanted = ["text_after"] * a.text_check + ["train_accuracy"] * bool(a.train_eval)
                cached = json.loads(cache.read_text()) if cache.is_file() else None
                if cached is not None and all(k in cached for k in wanted):
                    run = {"seed": 0, **cached}
                else:  # not run yet, or run without a figure asked for now
                    run = stage_run(registry, a.version, data, name, label, work, base_test, seed, a.max_steps, config,
                                    text_check=a.text_check, train_eval=a.train_eval)
                    cache.write_text(json.dumps(run, indent=1))
                results["stages"].append(run)
                print(json.dumps(run))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| set | tower | method | seed | steps | test accuracy | base test after | own training records | "
             "text agreement after | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['variant']} | {r['method']} | {r['seed']} | {r['steps']} | {r['test_accuracy']} "
              f"(n={r['n_test']}) | {r['base_test_after']} | {r.get('train_accuracy', '')} | "
              f"{r['text_after']['agreement'] if 'text_after' in r else ''} | {r['seconds']} |"
              for r in results["stages"]]
    lines += ["", "Linear probe of the frozen tower (logistic regression, train -> test split: what a linear read-out of "
              "the features the LM sees reaches):", "",
              "| set | pooled features | flat features | majority class |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['pooled']} | {r['flat']} | {r['majority']} |" for n, r in results["probe"].items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0

"""`python -m experiments.grounding`: which instruction data teaches a fresh language model to read a frozen tower.

Base v2 (`--recipe v2`) scores 31% on its own test although linear probes on its tower read colour (96%), region
(87%) and scanned digits (98%): its LM answers from the question's prior. This benchmark isolates why. Every run
starts from the same point — a *fresh* projector + LM (v2's sizes and tokenizer) on a *frozen* pre-trained tower
taken from a version folder — trains it as a `seq` stage through the tuner for `--steps` steps (batch 16, at each of
`--lrs`; 3e-3 is what the base build used until 2026-11-26), and reports test accuracy per answer family. What
varies is the data:

- `v2`        the base-v2 instruction mixture (`llaca.data.world`, every scene kind and phrasing);
- `v2-easy`   the same families and phrasings on easy scenes only: one large object (sprite or shape), a word, or
              an empty frame, on a plain background;
- `v2-1phrase` the v2 scenes with one phrasing per family and no answer-format lines;
- `v1`        base v1's own mixture (captions + colour + shape QA on CoIN-mini-like scenes; what v1 grounds on);
- `attr:T,U,..` one fixed question per attribute T in {colour, shape, group, read, region, count}, in equal shares,
              on v2-world scenes (one shape or sprite anywhere, a word, or 1-6 copies of one thing for count): how
              many attributes can be learned together in the step budget.

Plus a shuffled-image control on the `v2` run (same questions, images permuted across records): the drop from the
true images is what the model reads from the picture at all. Runs are cached in `<out>/runs/`; one torch thread.

    python -m experiments.grounding --tower-from DIR [--variants v2 v2-easy v2-1phrase v1] [--steps 800]
        [--text-size 384x4x4] [--max-grad-norm 1] [--train-vision]   # the LM's size, clipping, the tower learning
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

VARIANTS = ("v2", "v2-easy", "v2-1phrase", "v1")
from llaca.data.world import ATTRIBUTES, family

PHRASE_LISTS = ("CAPTION_QS", "NAME_QS", "GROUP_QS", "REGION_QS", "COLOUR_QS", "BOX_QS", "COUNT_QS", "COUNT_ALL_QS",
                "READ_QS", "YESNO_QS", "MCQ_QS", "SENTENCE_QS", "UNANS_HINTS", "UNANS_LINES")


def easy_scene(rng: random.Random):
    """One large thing on a plain background, a word, or an empty frame (base_world's parts, no clutter)."""
    from llaca.data import image_pack
    from llaca.data import world as bw

    r = rng.random()
    if r < 0.08:
        return bw.Scene("empty", rng.choice(["blank", "dark", "noise", "blur"]), seed=rng.getrandbits(31))
    if r < 0.3:
        return bw.Scene("text", "plain", text=rng.choice(bw.WORDS), font=rng.choice(bw.FONTS), seed=rng.getrandbits(31))
    _, sprites = image_pack.load()
    box = bw._free_box(rng, rng.randint(28, 56), [])
    thing = (bw._sprite_thing(rng, rng.randrange(len(sprites)), box) if rng.random() < 0.5
             else bw._shape_thing(rng, box))
    return bw.Scene("objects", "plain", things=[thing], seed=rng.getrandbits(31))


def check_variant(variant: str) -> str:
    if variant in VARIANTS:
        return variant
    attrs = variant.removeprefix("attr:").split(",")
    if not variant.startswith("attr:") or not all(a in ATTRIBUTES for a in attrs):
        raise argparse.ArgumentTypeError(f"{variant!r}: one of {', '.join(VARIANTS)} or attr:A,B,... with A, B in "
                                         f"{', '.join(ATTRIBUTES)}")
    return variant


@contextlib.contextmanager
def world_variant(variant: str):
    """Narrow `base_world` for one data generation (scene sampler / phrasings), restored afterwards."""
    from llaca.data import world as bw

    saved = {name: getattr(bw, name) for name in (*PHRASE_LISTS, "_HINT_KIND", "sample_scene")}
    try:
        if variant == "v2-easy":
            bw.sample_scene = easy_scene
        if variant == "v2-1phrase":
            for name in PHRASE_LISTS:
                setattr(bw, name, getattr(bw, name)[:1])
            bw._HINT_KIND = {}
        yield bw
    finally:
        for name, value in saved.items():
            setattr(bw, name, value)


def write_data(variant: str, root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """`root/<variant>/{train,test}` (written once)."""
    from llaca.data.coin_mini import write_base_mixture, write_split

    out = root / variant.replace(":", "-").replace(",", "+")
    if (out / "test" / "data.json").is_file():
        return out
    if variant == "v1":
        write_base_mixture(root / "v1-mixture", seed=seed, n_train=n_train, n_test=n_test)
        (root / "v1-mixture" / "base").rename(out)
        return out
    if variant.startswith("attr:"):
        from llaca.data.world import write_attribute_set

        return write_attribute_set(out, variant.removeprefix("attr:").split(","), n_train, n_test, seed)
    with world_variant(variant) as bw:
        for split, n, s in (("train", n_train, 0), ("test", n_test, 1)):
            rng = random.Random(seed * 1000 + 4242 + s)
            write_split(out / split, [bw.sample(rng) for _ in range(n)], f"{variant}-{split}")
    return out


def fresh_model_on_tower(tower_from: Path, seed: int = 0, text_size: tuple[int, int, int] | None = None):
    """v2's tokenizer and sizes (or LM `text_size` = hidden, layers, heads), a fresh projector + LM, the tower copied
    from `tower_from/model`."""
    from llaca.bases.tiny import SPEC, tokenizer
    from llaca.models.llava import build_model, build_processor, load_pretrained

    source, _ = load_pretrained(Path(tower_from) / "model")
    vc = source.config.vision_config
    spec = dataclasses.replace(SPEC, vision_hidden=vc.hidden_size, vision_layers=vc.num_hidden_layers,
                               vision_heads=vc.num_attention_heads,
                               feature_strategy=source.config.vision_feature_select_strategy)
    if text_size:
        spec = dataclasses.replace(spec, text_hidden=text_size[0], text_layers=text_size[1], text_heads=text_size[2])
    processor = build_processor(tokenizer(seed, SPEC), spec)
    model = build_model(processor, spec, seed=seed)
    model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())
    return model, processor


def run_one(variant: str, data: Path, tower_from: Path, steps: int, test_n: int, shuffled_control: bool,
            lr: float = 3e-3, text_size: tuple[int, int, int] | None = None,
            max_grad_norm: float | None = None, train_vision: bool = False) -> dict:
    import torch

    from llaca.data import load_image, load_instruction_set
    from llaca.evaluation.evaluate import generate_answers
    from llaca.evaluation.metrics import accuracy
    from llaca.models.llava import count_parameters, save_pretrained
    from llaca.train.tuner import StageConfig, run_stage
    from llaca.versions import Registry, load_version

    model, processor = fresh_model_on_tower(tower_from, text_size=text_size)
    n_params = count_parameters(model)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="grounding-") as home:
        reg = Registry(home)
        reg.create({"name": "init", "parent": None, "weights": "full"},
                   lambda tmp: save_pretrained(model, processor, tmp / "model"), version_id="init")
        cfg = StageConfig(data=str(data / "train"), method="seq", parent="init", lr=lr, batch_size=16,
                          max_steps=steps, warmup_ratio=0.05, seed=0, checkpoint_every=0, evaluate_after=False,
                          max_grad_norm=max_grad_norm, train_vision=train_vision, name=variant)
        version = run_stage(cfg, reg)
        log = json.loads((version.path / "train_log.json").read_text())
        trained, proc = load_version(reg, version.id)
        train_s = time.time() - t0
        records = load_instruction_set(data / "test").records[:test_n]
        images = [load_image(r.image) for r in records]
        questions, golds = [r.question for r in records], [r.answer for r in records]
        with torch.inference_mode():
            preds = generate_answers(trained, proc, images, questions)
            out = {"variant": variant, "steps": steps, "lr": lr, "train_seconds": round(train_s, 1),
                   "text_size": list(text_size) if text_size else None, "max_grad_norm": max_grad_norm,
                   "train_vision": train_vision,
                   "parameters": n_params,
                   "final_loss": round(sum(x["loss"] for x in log[-50:]) / max(len(log[-50:]), 1), 4),
                   "accuracy": accuracy(preds, golds), "n_test": len(records)}
            if shuffled_control:
                order = list(range(len(images)))
                random.Random(0).shuffle(order)
                shuffled = generate_answers(trained, proc, [images[i] for i in order], questions)
                out["accuracy_shuffled_images"] = accuracy(shuffled, golds)
    per = defaultdict(lambda: [0, 0])
    for q, g, p in zip(questions, golds, preds):
        f = family(q, g)
        per[f][0] += accuracy([p], [g]) > 50
        per[f][1] += 1
    out["per_family"] = {f: {"accuracy": round(100 * c / n, 1), "n": n} for f, (c, n) in sorted(per.items())}
    out["examples"] = [{"question": q, "gold": g, "prediction": p} for q, g, p in list(zip(questions, golds, preds))[:8]]
    return out


def report(results: list[dict], tower: str) -> str:
    fams = sorted({f for r in results for f in r["per_family"]})
    lines = [f"Fresh projector + LM on the frozen tower of `{tower}`, batch 16, one torch thread; "
             "accuracy on each variant's own test split (%).", "",
             "| data | steps | lr | test acc. | shuffled images | final loss | " + " | ".join(fams) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(fams)]
    for r in results:
        cells = [f"{r['per_family'][f]['accuracy']:.0f} (n={r['per_family'][f]['n']})" if f in r["per_family"] else ""
                 for f in fams]
        size = "x".join(map(str, r["text_size"])) if r.get("text_size") else "192x4x4"
        clip = f", clip {r['max_grad_norm']:g}" if r.get("max_grad_norm") else ""
        clip += ", tower trained" if r.get("train_vision") else ""
        lines.append(f"| {r['variant']} ({size}{clip}) | {r['steps']} | {r.get('lr', 3e-3):g} | {r['accuracy']:.1f} "
                     f"| {r.get('accuracy_shuffled_images', '')} "
                     f"| {r['final_loss']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    from llaca.paths import llaca_home

    p = argparse.ArgumentParser(prog="python -m experiments.grounding", description=__doc__.split("\n\n")[0])
    p.add_argument("--tower-from", required=True, help="a version folder whose vision tower is used (frozen)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), type=check_variant,
                   help=f"{', '.join(VARIANTS)} or attr:A,B,... (A, B in {', '.join(ATTRIBUTES)})")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3],
                   help="peak learning rates; each variant runs at each (3e-3: the base build's until 2026-11-26)")
    p.add_argument("--text-size", type=lambda v: tuple(int(x) for x in v.split("x")), default=None,
                   help="LM hidden x layers x heads, e.g. 256x6x4 (default: base v2's 192x4x4)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients (default: none, as the build)")
    p.add_argument("--train-vision", action="store_true", help="the tower learns too (default: frozen, as the build)")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--out", default="bench_results/base_v2/grounding", help="run JSONs + table_<tower>.md")
    p.add_argument("--work", default=None, help="generated data (default $LLACA_HOME/bench/grounding)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else llaca_home() / "bench" / "grounding"
    results = []
    for variant, lr in [(v, lr) for v in a.variants for lr in a.lrs]:
        suffix = "" if lr == 3e-3 else f"-lr{lr:g}"  # runs cached before --lrs (and the options below) keep their names
        if a.text_size:
            suffix += "-lm" + "x".join(map(str, a.text_size))
        if a.max_grad_norm:
            suffix += f"-clip{a.max_grad_norm:g}"
        if a.train_vision:
            suffix += "-tower"
        name = variant.replace(':', '-').replace(',', '+')
        key = f"{name}-{a.steps}-{a.n_train}-{a.test_n}-{Path(a.tower_from).resolve().name}{suffix}"
        cached = out / "runs" / f"{key}.json"
        if cached.is_file():
            results.append(json.loads(cached.read_text()))
            continue
        data = write_data(variant, work, a.n_train, max(a.test_n, 8))
        r = run_one(variant, data, Path(a.tower_from), a.steps, a.test_n, shuffled_control=variant == "v2", lr=lr,
                    text_size=a.text_size, max_grad_norm=a.max_grad_norm, train_vision=a.train_vision)
        cached.write_text(json.dumps(r, indent=1))
        print(json.dumps({k: r[k] for k in ("variant", "lr", "accuracy", "per_family")}), flush=True)
        results.append(r)
    # the table keeps every run cached for this tower, not only this invocation's
    tower_name = Path(a.tower_from).resolve().name
    earlier = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))
               if f.stem.endswith(f"-{tower_name}") or f"-{tower_name}-" in f.stem]
    results += [r for r in earlier if r not in results]
    table = out / f"table_{tower_name}.md"  # one table per tower
    table.write_text(report(results, a.tower_from))
    print(table.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

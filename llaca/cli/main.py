"""`python -m llaca ...`: build the base model, learn stages, list versions, ask, evaluate, make CoIN-mini.

Bad input exits with status 2 and one line `error: <what and where>`, never a traceback
(set LLACA_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..train.progress import progress_printer
from .common import registry_with_base


def cmd_build_base(args) -> int:
    from ..bases.tiny import build_base_v2
    from ..bases.tiny_v1 import build_base
    from ..versions import Registry

    registry = Registry()
    if registry.exists("base") and not args.force:
        print("base already exists (use --force to build another one as a new version id "
              f"'base-{args.recipe}-<seed>-<time>')", file=sys.stderr)
        print("base")
        return 0
    vid = "base" if not registry.exists("base") else f"base-{args.recipe}-{args.seed}-{int(time.time())}"
    build = build_base_v2 if args.recipe == "v2" else build_base
    v = build(registry, seed=args.seed, on_event=progress_printer(f"build-base {args.recipe}"), version_id=vid)
    b = v.meta["build"]
    print(f"parameters {b['parameters']:,}  build {b['seconds']:.0f}s  base-task accuracy "
          f"{v.meta['metrics']['base_accuracy']}%", file=sys.stderr)
    print(v.id)
    return 0


def _model_root(args):
    """(registry, root version) for `--model` / $LLACA_MODEL: the checkpoint registered as a lineage root (once;
    only its meta.json is written). Without a model: the embedded tiny base (built if missing), root None."""
    from ..versions import Registry

    model = getattr(args, "model", None) or os.environ.get("LLACA_MODEL")
    if not model:
        return registry_with_base(), None
    registry = Registry()
    return registry, registry.register_external(model)


def _pick_version(registry, root, ref):
    """An explicit version wins; otherwise the newest version of `root`'s lineage (or the newest overall)."""
    if ref not in (None, "latest") or root is None:
        return ref
    return registry.latest_in_lineage(root.id).id


def _bits(args):
    from ..models.llava import quant_bits

    return quant_bits(args.load_in_4bit, args.load_in_8bit) or "auto"


def cmd_register(args) -> int:
    from ..versions import Registry

    version = Registry().register_external(args.model, name=args.name)
    print(version.id)
    return 0


def cmd_learn(args) -> int:
    from ..train.recipes import NAMED_RECIPES, recipe_for, resolve_rule
    from ..train.tuner import StageConfig, run_stage

    if args.model and args.from_version:
        raise ValueError("use either --from VERSION (continue a version) or --model PATH_OR_ID (its lineage), not both")
    registry, root = _model_root(args)
    rule_hparams = {}
    if args.beta is not None:
        rule_hparams["beta"] = args.beta
    if args.scale is not None:
        rule_hparams["scale"] = args.scale
    if args.alpha_fallback is not None:
        rule_hparams["alpha_fallback"] = args.alpha_fallback
    parent = _pick_version(registry, root, args.from_version)
    if args.recipe:  # a named recipe (e.g. the paper's) instead of the parent base's own
        recipe = dict(NAMED_RECIPES[args.recipe])
    else:
        recipe = recipe_for(registry, parent or (registry.list()[-1].id if registry.list() else None))
    args.method, replay_fraction, rule_hparams = resolve_rule(recipe, args.method, args.replay_fraction, args.grouped,
                                                              rule_hparams)
    lora = recipe.get("lora", False) if args.lora is None else args.lora
    lora_options = {k: recipe[k] for k in ("lora_r", "lora_alpha", "lora_dropout") if k in recipe and lora}
    if args.lora_dropout is not None:
        lora_options["lora_dropout"] = args.lora_dropout
    epochs = recipe["epochs"] if args.epochs is None else args.epochs
    if args.min_records is None:  # the recipe's least records per stage, unless the passes were given
        args.min_records = recipe.get("min_records", 0) if args.epochs is None and args.max_steps is None else 0
    lr = recipe["lr"] if args.lr is None else args.lr
    if args.batch_size is None:  # the recipe's (small: 2); tiny and external checkpoints: 16
        args.batch_size = recipe.get("batch_size", 16)
    projector_lr = recipe.get("projector_lr") if args.projector_lr is None else args.projector_lr
    precision = recipe.get("mixed_precision") if args.mixed_precision is None else args.mixed_precision
    if args.vision_blocks is None:  # the recipe's (small: its last block), unless the tower was set with --vision
        args.vision_blocks = recipe.get("vision_blocks", 0) if args.vision is None else 0
    if args.grouped:
        if replay_fraction:
            raise ValueError("--replay-fraction with --grouped applies to --method replay only")
        args.epochs, args.lr, args.lora = epochs, lr, lora  # the base's recipe where the options were not given
        return _learn_grouped(args, registry, parent, rule_hparams, mixed_precision=precision,
                              min_records=args.min_records, image_jitter=args.image_jitter,
                              vision_blocks=args.vision_blocks, **lora_options)
    if args.threshold is not None or args.max_groups is not None:
        raise ValueError("--threshold and --max-groups apply to --grouped learning only")
    cfg = StageConfig(data=args.data, method=args.method, parent=parent, name=args.name,
                      epochs=epochs, max_steps=args.max_steps, min_records=args.min_records, lr=lr,
                      projector_lr=projector_lr, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, seed=args.seed, lora=lora, rule_hparams=rule_hparams, **lora_options,
                      load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, trace_dir=args.trace_dir,
                      evaluate_after=not args.no_eval,
                      vision_blocks=args.vision_blocks, replay_fraction=replay_fraction, mixed_precision=precision,
                      image_jitter=args.image_jitter,
                      **({} if args.vision is None else {"train_vision": args.vision == "train"}))
    version = run_stage(cfg, registry, on_event=progress_printer(f"learn {args.method}"))
    if version is not None:  # None on non-main ranks under accelerate launch
        print(version.id)
    return 0


def _learn_grouped(args, registry, parent, rule_hparams, **stage_kw) -> int:
    """`learn --grouped`: the decision (group, best similarity, continue / new) first, the new version id last."""
    from ..train.grouping import learn_grouped

    progress = progress_printer(f"learn grouped {args.method}")

    def on_event(event):
        if event.get("type") == "grouping":
            print(event["text"], flush=True)
        progress(event)

    version, _ = learn_grouped(
        registry, args.data, from_version=parent, threshold=args.threshold, method=args.method,
        max_groups=args.max_groups, on_event=on_event, evaluate_after=not args.no_eval, name=args.name,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seed=args.seed, lora=args.lora, rule_hparams=rule_hparams,
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, trace_dir=args.trace_dir, **stage_kw)
    if version is not None:
        g = version.meta["grouped"]
        print(f"{version.id}: group {g['group']} of {g['groups']} ({g['decision']}); members "
              + " ".join(f"{k}={m}" for k, m in enumerate(g["members"])), file=sys.stderr)
        print(version.id)
    return 0


def cmd_versions(args) -> int:
    from ..versions import Registry

    versions = Registry().list()
    if args.json:
        print(json.dumps([v.meta | {"id": v.id} for v in versions], indent=1))
        return 0
    if not versions:
        print("no versions yet (python -m llaca build-base)")
    for v in versions:
        stage = v.meta.get("stage", {}).get("name", "-")
        test = v.meta.get("metrics", {}).get("test", {})
        accs = " ".join(f"{k}={d['accuracy']:.0f}" for k, d in test.items())
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created))
        print(f"{v.id:10s} {v.name[:16]:16s} parent={v.parent or '-':8s} {v.meta.get('method', '-'):8s} "
              f"{stage[:22]:22s} {created}  {accs}")
        if v.meta.get("grouped"):  # a grouped stage (llaca.train.grouping): its group and every group's member
            g = v.meta["grouped"]
            best = "-" if g["best_similarity"] is None else g["best_similarity"]
            print(f"{'':10s} grouped: group {g['group']} ({g['decision']}, best similarity {best}), "
                  f"members " + " ".join(f"{k}={m}" for k, m in enumerate(g["members"])))
    return 0


def cmd_ask(args) -> int:
    from ..serve.chat import answer_once
    from ..serve.half_decode import enable_half_decode
    from ..versions import load_version

    registry, root = _model_root(args)
    ref = _pick_version(registry, root, args.version)
    from ..train.grouping import route_question

    route = route_question(registry, ref, args.question)
    if route is not None:  # a grouped version: the most similar group's member answers
        print(f"routed to group {route.group} ({route.version}), similarity {route.similarity:.3f}", file=sys.stderr)
        ref = route.version
    model, processor = load_version(registry, ref, bits=_bits(args))
    enable_half_decode(model)  # the app's ModelPool decodes this way: `ask` gives the answer the app gives
    print(answer_once(model, processor, args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_export_data(args) -> int:
    from ..data.formats.export import export_data

    out, n, detected = export_data(args.data, args.out, args.format)
    print(f"read {n} records ({detected}); wrote {args.format} to {out}")
    return 0


def cmd_eval(args) -> int:
    from ..data import load_instruction_set
    from ..evaluation.evaluate import evaluate
    from ..versions import load_version

    registry, root = _model_root(args)
    dataset = load_instruction_set(args.data)
    version = registry.get(_pick_version(registry, root, args.version))
    from ..train.grouping import evaluate_routed, is_grouped

    if is_grouped(version):  # every record answered by its group's member; --json lists the routing
        result, routing = evaluate_routed(registry, version.id, dataset, limit=args.limit, progress=True)
        groups = {}
        for r in routing:
            groups.setdefault(str(r["group"]), {"version": r["version"], "n": 0})["n"] += 1
        if args.json:
            print(json.dumps({"version": version.id, **result.as_dict(), "groups": groups, "routing": routing}))
        else:
            print(f"{version.id} on {result.dataset}: {result.accuracy:.2f}% of {result.n}; routed "
                  + ", ".join(f"group {k} ({g['version']}) {g['n']}" for k, g in groups.items()))
        return 0
    model, processor = load_version(registry, version.id, bits=_bits(args))
    result = evaluate(model, processor, dataset, limit=args.limit, progress=True)
    if args.json:
        print(json.dumps({"version": version.id, **result.as_dict()}))
    else:
        print(f"{version.id} on {result.dataset}: {result.accuracy:.2f}% of {result.n}")
    return 0


def cmd_coin_mini(args) -> int:
    from ..data import coin_mini

    paths = coin_mini.write_coin_mini(args.out_dir, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
    for p in paths:
        print(p)
    return 0


def _add_model_args(s, model_help: str) -> None:
    s.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help=f"a LLaVA checkpoint folder or cached hub id (default $LLACA_MODEL): {model_help}")
    s.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights via bitsandbytes (QLoRA with --lora)")
    s.add_argument("--load-in-8bit", action="store_true", help="int8 base weights via bitsandbytes")


VALUE_OPTIONS = {"--max-new-tokens", "--model"}


def _split_options(args: list[str]) -> tuple[list[str], list[str]]:
    """(positionals, options with their values): argparse cannot place an optional positional between options."""
    positional, options = [], []
    it = iter(args)
    for a in it:
        if a in VALUE_OPTIONS:
            options += [a, next(it, "")]
        elif a.startswith("--"):
            options.append(a)
        else:
            positional.append(a)
    return positional, options


def build_parser() -> argparse.ArgumentParser:
    from ..train.recipes import NAMED_RECIPES, RECIPES, describe
    from ..train.rules import RULES
    from ..train.tuner import StageConfig

    p = argparse.ArgumentParser(prog="python -m llaca", description="LLaCA Studio: continual instruction tuning of LLaVA")
    p.add_argument("--base", choices=("small", "tiny"), default=None,
                   help="the embedded base to start from when none is installed yet: small (default; EfficientNet-Lite "
                        "+ SmolLM2-135M-Instruct, pretrained) or tiny (3M, trained from nothing; fast, for tests and "
                        "sweeps). Same as $LLACA_BASE")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("build-base", help="build the embedded default model (version 'base')")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="build again even if 'base' exists")
    s.add_argument("--recipe", choices=("v1", "v2"), default="v2",
                   help="v2 (default, the shipped base): real drawings, emoji, fonts and eleven instruction families; "
                        "v1: the previous base on CoIN-mini-like scenes (docs/base-models.md)")
    s.set_defaults(func=cmd_build_base)

    s = sub.add_parser("register", help="register a LLaVA checkpoint (folder or cached hub id) as a root version")
    s.add_argument("model", help="checkpoint folder, or a hub id already in the Hugging Face cache")
    s.add_argument("--name", default=None, help="version name (default: the folder / repo name)")
    s.set_defaults(func=cmd_register)

    s = sub.add_parser("learn", help="learn an instruction set as a new stage -> new version")
    s.add_argument("data", help="instruction set: folder, .zip or data file (LLaVA/ShareGPT JSON(L), CSV/TSV, Parquet; see docs/data-formats.md)")
    s.add_argument("--method", choices=RULES, default=None,
                   help=("update rule (default: the base's recipe, llaca.train.recipes: tiny %s, small %s; "
                         "--grouped: llaca)" % (describe(RECIPES["tiny"]).split(",")[0],
                                                describe(RECIPES["small"]).split(",")[0])).replace("%", "%%"))
    s.add_argument("--from", dest="from_version", default=None, help="parent version (default: newest)")
    s.add_argument("--name", default=None)
    s.add_argument("--epochs", type=float, default=None,
                   help="passes over the set (default: the base's recipe, llaca.train.recipes: tiny %g, small %g)"
                        % (RECIPES["tiny"]["epochs"], RECIPES["small"]["epochs"]))
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--min-records", type=int, default=None,
                   help="a smaller set takes more passes, up to this many records in all (default: the base's recipe "
                        "when --epochs and --max-steps are not given: small %d, tiny none; 0: off)"
                        % RECIPES["small"]["min_records"])
    s.add_argument("--lr", type=float, default=None,
                   help="default: the base's recipe (tiny %g: where replay and llaca + replay forgot least, "
                        "docs/benchmarks.md; small %g)" % (RECIPES["tiny"]["lr"], RECIPES["small"]["lr"]))
    s.add_argument("--projector-lr", type=float, default=None,
                   help="the projector's own lr (LLaVA's mm_projector_lr; default: the recipe's, else --lr)")
    s.add_argument("--recipe", choices=sorted(NAMED_RECIPES), default=None,
                   help="a named recipe instead of the base's own (options given here still win): %s" % "; ".join(
                       f"{k}: {describe(v)}" for k, v in sorted(NAMED_RECIPES.items())))
    s.add_argument("--batch-size", type=int, default=None,
                   help="default: the base's recipe (small %d, tiny 16)" % RECIPES["small"]["batch_size"])
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=None,
                   help="autocast the forward (weights and the rule stay fp32; default: the base's recipe: small auto = "
                        "bf16 where the hardware runs it natively (GPU, AVX512-BF16 CPU: ~2x a step), else fp32; tiny "
                        "no; `accelerate launch --mixed_precision` also applies)")
    s.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters (peft) + projector instead of full weights (default: the base's recipe: "
                        "small uses LoRA r=%d, tiny full weights)" % RECIPES["small"]["lora_r"])
    s.add_argument("--lora-dropout", type=float, default=None,
                   help="dropout on each adapter's input (peft's lora_dropout; default: the base's recipe: small %g, "
                        "else %g; off, a LoRA step of small is ~1.25x faster)" % (
                            RECIPES["small"].get("lora_dropout", StageConfig.lora_dropout), StageConfig.lora_dropout))
    s.add_argument("--vision", choices=("frozen", "train"), default=None,
                   help="the vision tower in full fine-tuning: 'train' adapts it to images of a new kind "
                        "(default: %s, see docs/base-models.md)" % ("train" if StageConfig.train_vision else "frozen"))
    s.add_argument("--vision-blocks", type=int, default=None, metavar="N",
                   help="adapt only the tower's last N blocks (full weights: trained; with --lora: LoRA on them; "
                        "default: the base's recipe: small %d, tiny 0; 0 keeps the tower frozen; see "
                        "docs/base-models.md 'The tower's last block')" % RECIPES["small"].get("vision_blocks", 0))
    s.add_argument("--image-jitter", type=float, default=0.0, metavar="F",
                   help="frame each training image anew every step: zoom by up to F of its sides and shift (no flips "
                        "or colour changes; e.g. 0.1 for photographs). Off by default: on held-out drawings and digit "
                        "scans it did not help (docs/base-models.md 'Framing jitter')")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--beta", type=float, default=None, help="ema: weight on the past (default 0.99)")
    s.add_argument("--scale", type=float, default=None, help="llaca: the constant in alpha (default 2.0)")
    s.add_argument("--alpha-fallback", type=float, default=None, help="llaca: alpha when out of (0,1) (default 0.01)")
    s.add_argument("--replay-fraction", type=float, default=None,
                   help="share of earlier records mixed into the stage (default: the base's recipe when --method is "
                        "its method or left out, tiny %g, small %g; else 0, and 0 with --grouped; `replay` alone: "
                        "0.2). `--replay-fraction 0` runs a rule alone, e.g. the paper's llaca (docs/method.md "
                        "'The default recipe')" % (RECIPES["tiny"]["replay_fraction"], RECIPES["small"]["replay_fraction"]))
    s.add_argument("--no-eval", action="store_true", help="skip the automatic evaluation after the stage")
    s.add_argument("--trace-dir", default=None, help="every process appends its per-tensor alpha to DIR/rank<k>.jsonl")
    s.add_argument("--grouped", action="store_true", help="instruction grouping (llaca.train.grouping): continue the most "
                   "similar group with --method, or open a new group (seq from the newest version)")
    s.add_argument("--threshold", type=float, default=None, help="--grouped: TF-IDF cosine to continue a group "
                   "(default: the lineage's, 0.90 for a new one)")
    s.add_argument("--max-groups", type=int, default=None, help="--grouped: cap on groups (default 16 full-weight, "
                   "64 LoRA)")
    _add_model_args(s, "continue the newest version learned from this checkpoint (registering it first)")
    s.set_defaults(func=cmd_learn)

    s = sub.add_parser("versions", help="list versions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_versions)

    s = sub.add_parser("ask", help="answer a question about an image")
    s.add_argument("version", nargs="?", default=None, help="version id or name (default: newest)")
    s.add_argument("image")
    s.add_argument("question")
    s.add_argument("--max-new-tokens", type=int, default=32)
    _add_model_args(s, "without a version: the newest version learned from this checkpoint")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("eval", help="accuracy of a version on an instruction set (its answers are the gold)")
    s.add_argument("version", nargs="?", default=None)
    s.add_argument("data")
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=None)
    _add_model_args(s, "without a version: the newest version learned from this checkpoint")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("export-data", help="validate a set in any accepted format and write it as llava, sharegpt or parquet")
    s.add_argument("data", help="instruction set: folder, .zip, or .json/.jsonl/.csv/.tsv/.parquet file")
    s.add_argument("out", help="output folder (llava, sharegpt) or .parquet file; must not exist")
    s.add_argument("--format", choices=["llava", "sharegpt", "parquet"], required=True)
    s.set_defaults(func=cmd_export_data)

    s = sub.add_parser("coin-mini", help="write the CoIN-mini task folders (train/test each)")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", type=int, default=1500)
    s.add_argument("--n-test", type=int, default=100)
    s.set_defaults(func=cmd_coin_mini)

    from .corrections import add_parser as add_corrections_parser

    add_corrections_parser(sub)
    return p


def _close_progress_bars() -> None:
    """End a bar the failure interrupted, so the error is the last line (not a bar redrawn after it)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `ask IMAGE QUESTION` without a version: shift the positionals.
    if len(argv) >= 1 and argv[0] == "ask":
        positional, options = _split_options(argv[1:])
        argv = ["ask"] + (["latest"] if len(positional) == 2 else []) + positional + options
    args = build_parser().parse_args(argv)
    if args.base:  # read by llaca.models.catalog.default_base(), also in worker processes this one starts
        os.environ["LLACA_BASE"] = args.base
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted (a stage resumes from its last checkpoint when run again)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line for the user, traceback on request
        if os.environ.get("LLACA_DEBUG"):
            raise
        _close_progress_bars()
        from safetensors import SafetensorError  # e.g. a corrupt weights file (failed writes are WriteError)

        from ..data import InvalidDataset
        from ..versions import VersionError

        if isinstance(e, (InvalidDataset, VersionError, ValueError, OSError, SafetensorError)):
            print(f"error: {e}", file=sys.stderr)
            if isinstance(e, InvalidDataset):
                for problem in e.problems[1:20]:
                    print(f"  {problem}", file=sys.stderr)
            return 2
        print(f"error: {type(e).__name__}: {e} (LLACA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1

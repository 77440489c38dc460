"""The stage recipe `learn`, the Learn tab and the demo start from, per base.

`tiny` (3M parameters, trained from nothing) learns by full fine-tuning: `llaca.train.tuner.DEFAULT_RECIPE`, measured on
it (llaca + 20% replay at lr 3e-4, 5 epochs). `small` (140M, a pretrained LM) takes the paper's shape instead: LoRA
adapters on every LM Linear + the projector (no adapter dropout), and on the tower's last block and head conv (the rest of
the tower frozen), one epoch (the paper's), at lr
3e-4 (the paper's 2e-4 until 2026-12-05) in batches of 2, and a set under 2,000 records passed over until the stage
has trained on 2,000 (below). Its rule is plain `replay` (20% of each stage replays earlier
records), because that is what issue 25 measured on `small` (docs/benchmarks.md, "The paper's setting on small"):
- 4 CoIN-mini stages x 3 seeds (bf16, r64): replay Avg.ACC 58.6 / forgetting 4.5, llaca + 20% replay 51.7 / 12.2,
  the paper's llaca alone 53.6 / 18.1, seq 38.6 / 40.0;
- held-out sets, one stage from `small`: digits 68.0% with replay vs 28.5% with llaca + replay; Tux Paint 55.4 vs 49.4.
The rule halves seq's forgetting there, but replay forgets less still, and in a one-epoch held-out stage at lr 2e-4
the EMA held the LoRA back from a new 10-way mapping (digits: 5 of 10 digits ever answered); `--method llaca
--replay-fraction 0` (or the Learn tab's *llaca*) still runs the paper's rule alone.
"""
from __future__ import annotations

from .tuner import DEFAULT_RECIPE

# Batches of 4 (2026-12-05): one epoch of the same records in four times the steps, at about the same cost per
# record, learned held-out digits to 92.9% (batch 16: 68.0) and Tux Paint to 62.0% (54.8), base test after 33.7 / 35.7
# (35.3 before), on small's build 2; on build 5 (shipped since) the same stage: digits 80.4, Tux Paint 57.8;
# `python -m llaca.bench heldout ... --set batch_size=4`, docs/base-models.md.
# lr 3e-4 and at least 1,000 records per stage (2026-12-05, build 5): a set smaller than the stage budget takes more
# passes over itself (`StageConfig.min_records`; held-out Tux Paint, 493 records, 2.03 epochs: 57.8 -> 69.3%, base
# test after 35.0 -> 35.7), and lr 3e-4 learns a larger set faster (digits, 1,400 records, one epoch: 80.4 -> 91.2%,
# base test after 37.0 -> 33.7; 5e-4 also 90.9 but 27.0). Sweep: docs/base-models.md "One stage, more passes or a
# higher lr". The CoIN-mini figures in the docstring above were measured at 2e-4.
# Batches of 2, no LoRA dropout, at least 1,500 records (2026-12-05, later): the stage above *underfits* its own
# records (Tux Paint: 84.5% of its training records answered right after 2 passes, 69.3% of the test; six passes
# reach 100 / 82.5), so it needs more updates per minute, not a higher rate. peft's LoRA dropout costs 1.24-1.28x a
# step of small (a copy of every adapted Linear's input) and buys nothing while the stage underfits; batches of 2 give
# twice the updates per record at 1.2x the cost per record. Together, 1,500 records: Tux Paint 78.3% (text
# agreement with SmolLM2 after the stage 90.0, was 85.0), `bench heldout --set ...`, docs/base-models.md.
# At least 1,800 records (2026-12-05, night): a step 1.18x faster (the tower in eval mode, eager attention, frozen
# weights cast once; docs/base-models.md "The frozen tower ran its dropout") pays for 20% more updates in less time
# than 1,500 took before (1,000 records: 1,080 steps, ~12.8 min bf16): Tux Paint 78.3 -> 80.1%, digits 91.7 -> 92.9%
# (one seed each; base test after 32.3 / 31.0, was 35.0 / 31.7; text agreement after 91.7 / 81.7, was 86.7 / 86.7).
# The tower's last block adapted (2026-12-06): LoRA on the last MBConv block's 1x1 convs and the head conv that makes
# the 1,280 channels the LM reads (`vision_blocks=1`; before, `--vision-blocks` matched no layer of an EfficientNet
# and the tower stayed frozen): held-out Tux Paint 78.5 -> 79.1%, digits 92.9 -> 94.5% (means of three seeds; five of
# six paired seeds gain or hold), base test and chat after the stage kept, 1.03x a step; docs/base-models.md "The
# tower's last block".
# At least 2,000 records (2026-12-06): the most that fits the 15-minute budget with native bf16 (1,000 records: 1,200
# steps, 13.2 min end to end with the tower's frozen front computed once per image, `tower_memo`). Held-out Tux Paint
# 79.1 -> 81.7%, digits 94.5 -> 95.1% (means of the same three seeds; paired Tux Paint -1.8 / +4.2 / +5.4, digits
# +2.3 / -0.8 / +0.5; seed 3: 81.9 / 96.0, four-seed means 81.8 / 95.4; a run with a fused AdamW, another rounding:
# 81.9 / 93.2, so digits sits inside the stage's spread); base test after 32.5 / 30.8 (33.7 / 31.3); the chat after
# the digits stage agrees with SmolLM2 on 80.6% of the text prompts (87.2). docs/base-models.md "At least 2,000
# records".
SMALL_RECIPE = {"method": "replay", "lr": 3e-4, "replay_fraction": 0.2, "epochs": 1.0, "min_records": 2000,
                "batch_size": 2, "lora": True, "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.0,
                "vision_blocks": 1, "mixed_precision": "auto"}
RECIPES = {"tiny": DEFAULT_RECIPE, "small": SMALL_RECIPE}

# The paper's setting (LLaCA on LLaVA-1.5, docs/method.md): LoRA r=128, alpha 256 on every LM Linear + the projector
# (lr 2e-4, projector 2e-5), the tower frozen, cosine with 3% warmup, one epoch per task, the faithful rule alone.
# SmolLM2-135M is 576 wide where Vicuna-7B is 4096: `paper-r64` is the same at half the rank. The paper trains in
# bf16; so do these where the hardware has it ("auto": a GPU, or a CPU with AVX512-BF16, where autocast halves a step
# of `small`: `python -m llaca.bench small --sections stage`); an AVX2-only CPU emulates bf16 ~30x slower: fp32 there.
PAPER_RECIPE = {"method": "llaca", "lr": 2e-4, "projector_lr": 2e-5, "replay_fraction": 0.0, "epochs": 1.0,
                "lora": True, "lora_r": 128, "lora_alpha": 256, "mixed_precision": "auto"}
NAMED_RECIPES = {"paper": PAPER_RECIPE, "paper-r64": {**PAPER_RECIPE, "lora_r": 64, "lora_alpha": 128}}


def base_name_of(registry, ref: str | None) -> str | None:
    """`small` / `tiny` when `ref` descends from an embedded base, else None (an external checkpoint's lineage)."""
    from ..models.catalog import BASES

    if ref is None or not registry.exists(ref):
        return None
    root = registry.lineage(ref)[0].id
    return next((name for name, vid in BASES.items() if vid == root), None)


def recipe_for(registry, ref: str | None) -> dict:
    """The default recipe for a stage learned from `ref` (tiny's for external checkpoints, which add --lora)."""
    return dict(RECIPES.get(base_name_of(registry, ref) or "tiny"))


def resolve_rule(recipe: dict, method: str | None, share: float | None, grouped: bool = False,
                 rule_hparams: dict | None = None) -> tuple[str, float, dict]:
    """(method, StageConfig.replay_fraction, rule_hparams) for a stage (`learn`, the held-out bench): the rule and its
    replay share come from the base's recipe unless given (tiny: llaca + 20% replay; small: replay of 20%); grouped
    learning is llaca per group. The `replay` rule takes the share as its own fraction; any other rule mixes earlier
    records in on top."""
    rule_hparams = dict(rule_hparams or {})
    method = method or ("llaca" if grouped else recipe["method"])
    if share is None and method == recipe["method"] and not grouped:
        share = recipe.get("replay_fraction")
    replay_fraction = 0.0
    if share is not None:  # a negative share is refused by ReplayRule, which mixes it in either way
        if method == "replay":
            rule_hparams["fraction"] = share
        else:
            replay_fraction = share
    return method, replay_fraction, rule_hparams


def stage_fields(recipe: dict) -> dict:
    """The recipe as `StageConfig` fields: a stage with no options given, its replay share placed by `resolve_rule`."""
    method, replay_fraction, rule_hparams = resolve_rule(recipe, None, None, rule_hparams=recipe.get("rule_hparams"))
    fields = {k: v for k, v in recipe.items() if k not in ("replay_fraction", "rule_hparams")}
    fields["method"] = method
    if rule_hparams:
        fields["rule_hparams"] = rule_hparams
    if replay_fraction:
        fields["replay_fraction"] = replay_fraction
    return fields


def base_stage_options(recipe: dict, lora: bool, epochs: float | None = None) -> dict:
    """The base's adapter size (when the stage trains LoRA), precision, batch size, adapted tower blocks and least
    records per stage, as `StageConfig` fields: what the app's Learn and grouped tabs add to a stage whose form does
    not ask for them. A stage whose epochs differ from the recipe's runs exactly those epochs (no `min_records`)."""
    keys = ("mixed_precision", "batch_size", "vision_blocks") + (("lora_r", "lora_alpha", "lora_dropout") if lora else ())
    if epochs is None or epochs == recipe["epochs"]:
        keys += ("min_records",)
    return {k: recipe[k] for k in keys if recipe.get(k) is not None}  # 0 is a value (no dropout), absent is not


def describe(recipe: dict) -> str:
    """'replay (20% earlier records), LoRA r=32, lr 0.0002, 3 epochs, bf16': the one line the Learn tab and `learn --help` show."""
    from ..versions import method_label

    parts = [method_label(recipe["method"], recipe.get("replay_fraction"))]
    parts.append(f"LoRA r={recipe['lora_r']}" if recipe.get("lora") else "full fine-tuning")
    parts.append(f"lr {recipe['lr']:g}" + (f" (projector {recipe['projector_lr']:g})" if recipe.get("projector_lr") else ""))
    parts.append(f"{recipe['epochs']:g} epoch" + ("" if recipe["epochs"] == 1 else "s")
                 + (f" (a smaller set: passes up to {recipe['min_records']:,} records)" if recipe.get("min_records") else ""))
    if recipe.get("vision_blocks"):
        n = recipe["vision_blocks"]
        parts.append(f"the tower's last {'block' if n == 1 else f'{n} blocks'} adapted")
    if recipe.get("batch_size"):
        parts.append(f"batches of {recipe['batch_size']}")
    precision = recipe.get("mixed_precision")
    if precision == "auto":
        parts.append("bf16 where native")
    elif precision not in (None, "no"):
        parts.append(precision)
    return ", ".join(parts)

"""The stage recipe `learn`, the Learn tab and the demo start from, per base.

`tiny` (3M parameters, trained from nothing) learns by full fine-tuning: `llaca.train.tuner.DEFAULT_RECIPE`, measured on
it (llaca + 20% replay at lr 3e-4, 5 epochs). `small` (140M, a pretrained LM) takes the paper's shape instead: LoRA
adapters on every LM Linear + the projector, the tower frozen; full fine-tuning of its LM costs ~10x a LoRA step on
two cores, and a stage on 1,000 records has to fit in 15 minutes. Its lr and epochs are the base build's LoRA
settings scaled to a stage (docs/base-models.md); the continual-learning study on `small` revisits them.
"""
from __future__ import annotations

from .tuner import DEFAULT_RECIPE

SMALL_RECIPE = {"method": "llaca", "lr": 2e-4, "replay_fraction": 0.2, "epochs": 3.0,
                "lora": True, "lora_r": 32, "lora_alpha": 64}
RECIPES = {"tiny": DEFAULT_RECIPE, "small": SMALL_RECIPE}


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


def describe(recipe: dict) -> str:
    """'llaca + 20% replay, LoRA r=32, lr 0.0002, 3 epochs': the one line the Learn tab and `learn --help` show."""
    from ..versions import method_label

    parts = [method_label(recipe["method"], recipe.get("replay_fraction"))]
    parts.append(f"LoRA r={recipe['lora_r']}" if recipe.get("lora") else "full fine-tuning")
    parts += [f"lr {recipe['lr']:g}", f"{recipe['epochs']:g} epochs"]
    return ", ".join(parts)

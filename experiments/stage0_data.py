"""What the stage-0' experiments read from a build's home: its v2 mixture, the scenes behind it, the tower fronts."""
from __future__ import annotations

import json
from pathlib import Path

# The experiments on stage 0' were measured on build 9's stage-2 draws (550 steps of 16), whatever the module's default.
BUILD9_TUNE_STEPS = 550


def build_records(home: Path, seed: int = 0):
    """(every stage-2 record written, the build's own draw of them, the 300 test records, image path -> scene for
    all of them), as `small_build.build` draws them (`draw_records`) from the mixture it trains on."""
    from llaca import data as D
    from llaca.bases import small_build as B
    from llaca.data.world import ensure_mixture
    from llaca.versions import Registry

    root = ensure_mixture(Registry(home), seed, 16000, 300, rehearsal=0.3) / "base"
    tune_all = D.load_instruction_set(root / "train").records
    test = D.load_instruction_set(root / "test").records
    _, tune = B.draw_records(tune_all, seed, tune_steps=BUILD9_TUNE_STEPS)
    scenes = B.mixture_scenes_of(tune_all, seed, len(tune_all))
    scenes.update(B.mixture_scenes_of(test, seed, len(test), "test"))
    return tune_all, tune, test, scenes


def front_cache(home: Path, model, processor, images: list, blocks: int | None = None, readout: str = "head"):
    """The build's cache of the tower's frozen front (all blocks but the `blocks` stage 0' teaches, by default the
    build's `FACT_BLOCKS`) for a tower of `readout` (named as `small_build.build` names it), filled for `images`."""
    from llaca.bases import small_build as B
    from llaca.models.small import IMAGE_SIZE, TOWER_VARIANT

    front = len(model.model.vision_tower.encoder.blocks) - (blocks or B.FACT_BLOCKS)
    name = f"small-tower-{TOWER_VARIANT}-{IMAGE_SIZE}{B.readout_tag(readout)}-front{front}"
    cache = B.FeatureCache(home / "cache" / name, model, processor, front)
    cache.fill([Path(i) for i in images])
    return cache


def readout_of(run: Path | None = None, adapter: Path | None = None) -> str:
    """The build's tower read-out (`llaca.models.small.READOUTS`): from a finished build's meta beside its adapter, or
    from the run folder's name, where `small_build.readout_tag` put it ("-twin"; nothing for the head map)."""
    from llaca.models.small import READOUTS

    if adapter is not None:
        return json.loads((adapter.parent / "meta.json").read_text())["build"].get("readout", "head")
    name = run.name + "-"
    return next((r for r in READOUTS if r != "head" and f"-{r}-" in name), "head")


def stage0_model(run: Path, seed: int = 0, readout: str = "twin"):
    """(model, processor): `small` assembled with `readout` and the run folder's stage-0' weights (its taught tower
    tail and projector, `fact_align.safetensors`), in eval mode, as a build's stage 1 starts from them."""
    from safetensors.torch import load_file

    from llaca.models.small import assemble

    model, processor = assemble(seed, readout=readout)
    model.load_state_dict(load_file(str(run / "fact_align.safetensors")), strict=False)
    return model.eval(), processor

"""Train a base's language side through the ordinary tuner and register the result as a root version."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..models.llava import count_parameters, save_pretrained
from ..versions import Registry, Version
from .splits import split_fingerprint


def own_test_accuracy(meta: dict, train_dir) -> float | None:
    """A stage's accuracy on its own test split (`<set>-test`), not on the earlier stages' splits it also reports."""
    test = meta["metrics"].get("test", {})
    own = test.get(f"{Path(train_dir).parent.name}-test") or (list(test.values())[-1] if test else {})
    return own.get("accuracy")


def train_and_publish(registry: Registry, model, processor, train_dir: Path, build: dict, vision_acc: float,
                      t0: float, lr: float, batch_size: int, on_event, version_id: str,
                      phases: list[tuple[Path, int]] | None = None) -> Version:
    """Learn the base data as `seq` stages from the pre-trained tower, then register the result as a root version.

    `phases`: [(train dir, steps)] learned one after the other (default: `train_dir` for `build["base_steps"]`);
    the last one's test split gives the base accuracy. The initial model is staged in a scratch registry so every
    phase runs through the same tuner every other stage uses; what gets published is the last phase's result with
    `build` (recipe, sizes, timings, each phase's own test accuracy) in the meta.
    """
    from ..train.tuner import StageConfig, run_stage

    phases = phases or [(train_dir, build["base_steps"])]
    with tempfile.TemporaryDirectory(dir=registry.home, prefix=".build-") as scratch:
        scratch_reg = Registry(scratch)
        scratch_reg.create({"name": "init", "parent": None, "weights": "full"},
                           lambda tmp: save_pretrained(model, processor, tmp / "model"), version_id="init")
        parent, phase_log = "init", []
        for k, (data, steps) in enumerate(phases):
            cfg = StageConfig(data=str(data), method="seq", parent=parent, lr=lr, batch_size=batch_size,
                              max_steps=steps, warmup_ratio=0.05, seed=build["seed"], checkpoint_every=0,
                              name=version_id if k == len(phases) - 1 else f"{version_id}-phase{k + 1}")
            built = run_stage(cfg, scratch_reg, on_event=on_event)
            parent = built.id
            phase_log.append({"data": Path(data).parent.name, "steps": steps,
                              "test_accuracy": own_test_accuracy(built.meta, data)})
        meta = {k: v for k, v in built.meta.items() if k not in ("id", "created")}
        meta.update(
            parent=None,
            method="pretrain",
            metrics={**meta["metrics"], "base_accuracy": own_test_accuracy(built.meta, phases[-1][0]),
                     "vision_aux_accuracy": round(vision_acc, 2)},
            build={**build, "seconds": round(time.time() - t0, 1), "parameters": count_parameters(model),
                   "test_sha256": split_fingerprint(Path(phases[-1][0]).parent / "test"),
                   **({"phases": phase_log} if len(phases) > 1 else {})},
        )

        def write(tmp: Path):
            for item in built.path.iterdir():
                if item.name != "meta.json":
                    shutil.move(str(item), tmp / item.name)

        return registry.create(meta, write, version_id=version_id)

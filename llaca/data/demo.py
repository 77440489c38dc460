"""The one-click demo: four CoIN-mini tasks learned in sequence from the base, by three arms side by side.

One definition for the Learn tab's "Run the demo" button (which queues these stages as jobs) and for
`python -m llaca.bench demo` (which runs the same stages, and other arms, and measures what each keeps).
An arm is a name and the `StageConfig` fields it sets on top of the demo's stage (`STAGE`). The button's arms
share the default learning rate, so they differ only in the rule: plain fine-tuning, the paper's rule alone,
and the default recipe (`llaca.train.tuner.DEFAULT_RECIPE`). Four tasks, because over two short stages at lr 3e-4
nothing forgets much (`bench_results/demo/`): the third task is where plain fine-tuning loses the first.
"""
from __future__ import annotations

from pathlib import Path

from . import coin_mini

TASKS = tuple(coin_mini.DEFAULT_SEQUENCE[:4])
DATA = dict(n_train=400, n_test=50, seed=0)
STAGE = dict(max_steps=80, batch_size=16, checkpoint_every=40)

# arm name -> StageConfig fields. The app's demo runs DEFAULT_ARMS; the bench can run any of them.
ARMS = {
    "seq, lr 1e-3": {"method": "seq", "lr": 1e-3},
    "llaca, lr 1e-3": {"method": "llaca", "lr": 1e-3},
    "seq, lr 3e-4": {"method": "seq", "lr": 3e-4},
    "llaca, lr 3e-4": {"method": "llaca", "lr": 3e-4},
    "replay, lr 3e-4": {"method": "replay", "lr": 3e-4},
    "llaca+replay, lr 3e-4": {"method": "llaca", "replay_fraction": 0.2, "lr": 3e-4},
}
DEFAULT_ARMS = ("seq, lr 3e-4", "llaca, lr 3e-4", "llaca+replay, lr 3e-4")


def ensure_tasks(root: Path, tasks=TASKS) -> Path:
    """Write the demo's task folders under `root` once (they are deterministic); returns `root`."""
    missing = [t for t in tasks if not (Path(root) / t / "test" / "data.json").is_file()]
    if missing:
        coin_mini.write_coin_mini(root, tasks=missing, **DATA)
    return Path(root)


def slug(arm: str) -> str:
    return arm.replace(", ", "-").replace(" ", "").replace("+", "-")


def stage_configs(root: Path, arm: str, tasks=TASKS) -> list[dict]:
    """The arm's stages as `StageConfig` keyword dicts, in order; the first starts from `base`, each next one
    from the version before it (parent None = the newest, which the job chain and the bench both guarantee)."""
    return [{"data": str(Path(root) / task / "train"), "name": f"demo-{slug(arm)}-{k}-{task}",
             "parent": "base" if k == 1 else None, **STAGE, **ARMS[arm]}
            for k, task in enumerate(tasks, 1)]

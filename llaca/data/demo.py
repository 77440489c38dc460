"""The one-click demo: four CoIN-mini tasks learned in sequence from the base, by three arms side by side.

One definition for the Learn tab's "Run the demo" button (which queues these stages as jobs) and for
`python -m llaca.bench demo` (which runs the same stages, and other arms, and measures what each keeps).
An arm is a name and the `StageConfig` fields it sets on top of the demo's stage (`STAGE`). The button's arms
share the default learning rate, so they differ only in the rule: plain fine-tuning, the paper's rule alone,
and the default recipe (`llaca.train.tuner.DEFAULT_RECIPE`). Four tasks, because over two short stages at lr 3e-4
nothing forgets much (`bench_results/demo/`): the third task is where plain fine-tuning loses the first.

That is `tiny`'s demo. On `small` (140M, ~7 s a LoRA step of 8 records in fp32 on two cores) four 80-step stages
per arm would take an hour, so `SMALL` is reduced, aiming at ten minutes, and says so: two tasks (sciqa, then imagenet,
which `small` answers zero-shot and plain fine-tuning on sciqa erases: issue 25's study), 10 steps of 8 records,
every test capped at 20 questions, plain fine-tuning against `small`'s default recipe (`llaca.train.recipes`).
`python -m llaca.bench demo --button small` times it exactly as queued: 148.1 s on two cores with native bf16 (the
recipe's adapters without dropout; 453.7 s in fp32 on an AVX2 runner with an earlier recipe).
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Demo:
    """What the Learn tab's button queues for one embedded base: arms x tasks, each stage from the arm's previous."""
    base: str  # the embedded base (llaca.models.catalog.BASES) the first stage of every arm starts from
    tasks: tuple
    stage: dict  # StageConfig fields every stage shares
    arms: dict  # arm name -> StageConfig fields on top of `stage`
    note: str = ""  # how it was cut down to fit, said in the UI

    def stage_configs(self, root: Path, arm: str) -> list[dict]:
        from ..models.catalog import base_version_id

        return stage_configs(root, arm, self.tasks, arms=self.arms, stage=self.stage, parent=base_version_id(self.base))


TINY = Demo("tiny", TASKS, STAGE, {arm: ARMS[arm] for arm in DEFAULT_ARMS})


# small's default recipe (llaca.train.recipes.SMALL_RECIPE; data sits below train, so a test checks they agree)
_SMALL_LORA = {"lora": True, "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.0, "mixed_precision": "auto"}
_SMALL_ARMS = {"seq, lr 0.0003": {"method": "seq", "lr": 3e-4, **_SMALL_LORA},
               "replay, lr 0.0003": {"method": "replay", "rule_hparams": {"fraction": 0.2}, "lr": 3e-4, **_SMALL_LORA}}


SMALL = Demo("small", ("sciqa", "imagenet"), dict(max_steps=10, batch_size=8, checkpoint_every=0, eval_limit=20), _SMALL_ARMS,
             note="reduced for two cores (3.1 min measured with native bf16, 7.6 min in fp32): 2 tasks, 10 steps of 8 "
                  "records, tests capped at 20 questions; stages this short show the mechanics, not the method's "
                  "benefit (measured: `seq` kept more here; over 4 tasks x 20 steps replay forgot 4.5 points, seq 40)")

DEMOS = {"tiny": TINY, "small": SMALL}


def ensure_tasks(root: Path, tasks=TASKS) -> Path:
    """Write the demo's task folders under `root` once (they are deterministic); returns `root`."""
    missing = [t for t in tasks if not (Path(root) / t / "test" / "data.json").is_file()]
    if missing:
        coin_mini.write_coin_mini(root, tasks=missing, **DATA)
    return Path(root)


def slug(arm: str) -> str:
    return arm.replace(", ", "-").replace(" ", "").replace("+", "-")


def stage_configs(root: Path, arm: str, tasks=TASKS, arms=None, stage=None, parent: str = "base") -> list[dict]:
    """The arm's stages as `StageConfig` keyword dicts, in order; the first starts from `parent`, each next one
    from the version before it (parent None = the newest, which the job chain and the bench both guarantee).
    `arms` / `stage` default to this module's `ARMS` / `STAGE` as they are at call time (a bench or test may
    shrink them)."""
    arms, stage = ARMS if arms is None else arms, STAGE if stage is None else stage
    return [{"data": str(Path(root) / task / "train"), "name": f"demo-{slug(arm)}-{k}-{task}",
             "parent": parent if k == 1 else None, **stage, **arms[arm]}
            for k, task in enumerate(tasks, 1)]

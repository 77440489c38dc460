"""Corrections: answers a person fixed in the chat, kept as a pending instruction set, learned as the next stage.

    $LLACA_HOME/corrections/pending/data.json     LLaVA conversation records (+ "llaca": who answered, what)
    $LLACA_HOME/corrections/pending/images/       each image copied once, named by its content hash
    $LLACA_HOME/corrections/archive/<batch>/      a learned batch: train/ (corrections + replay), test/
                                                  (the corrections themselves), batch.json (-> the version)

A correction is the conversation so far with the last assistant turn replaced by what the person wrote. Every
write is a read-modify-write under a file lock, then temp + rename, so two app sessions (or the CLI) adding at
once lose nothing and a crash never leaves a torn `data.json`.

A handful of corrections is not a stage: with the CLI's defaults (3 epochs, batch 16) 30 records are 6 steps,
which teaches nothing, and training on them alone overwrites the rest. `SmallSetRecipe` is what was measured to
work (`python -m llaca.bench corrections`): the corrections repeated up to a minimum number of optimizer steps,
mixed with replay records from the lineage (the base ships 200 in `assets/base/replay`, every stage keeps some).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import random
import time
import uuid
from pathlib import Path

from ..data import IMAGE_TOKEN, InvalidDataset, Record, load_image, load_instruction_set, write_instruction_set
from ..paths import atomic_dir, atomic_write_json, llaca_home, write_once

MAX_TURN_CHARS = 4000  # the upload limit per turn (llaca.data.Limits)


class CorrectionError(ValueError):
    pass


@dataclasses.dataclass
class Correction:
    id: str
    image: Path
    turns: list[tuple[str, str]]  # the conversation so far; the last answer is the corrected one
    version: str | None  # the version whose answer was corrected
    original: str | None  # what it had answered
    created: float

    @property
    def question(self) -> str:
        return self.turns[-1][0]

    @property
    def answer(self) -> str:
        return self.turns[-1][1]

    def as_dict(self) -> dict:
        return {"id": self.id, "image": str(self.image), "question": self.question, "answer": self.answer,
                "turns": [list(t) for t in self.turns], "version": self.version, "original": self.original,
                "created": self.created}


@dataclasses.dataclass
class SmallSetRecipe:
    """How a small set of corrections becomes a stage (per base: `CORRECTION_RECIPES`, measured in the module doc).

    Steps = max(min_steps, epochs over the mix); the mix holds `replay_per_correction` lineage records per
    correction (fewer if the lineage keeps fewer), so about 1 in (1 + ratio) training records is a correction.
    """
    min_steps: int = 20
    epochs: float = 3.0
    replay_per_correction: float = 4.0
    lr: float = 5e-4
    batch_size: int = 16
    seed: int = 0
    mixed_precision: str | None = None  # StageConfig.mixed_precision
    lora: bool = False  # LoRA adapters on the LM + the projector (StageConfig.lora), of this size
    lora_r: int = 32
    lora_alpha: int = 64

    def stage_fields(self) -> dict:
        """The StageConfig fields beyond steps/lr/batch/seed, only those set."""
        out = {"mixed_precision": self.mixed_precision} if self.mixed_precision else {}
        if self.lora:
            out.update(lora=True, lora_r=self.lora_r, lora_alpha=self.lora_alpha)
        return out

    def steps(self, n_train: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * n_train / self.batch_size))


# Measured with `python -m llaca.bench corrections --base NAME` (30 counting corrections; bench_results/corrections/):
# the recipe tuned on base v1 (lr 2e-3, >= 240 steps, 2 replay records each) cost tiny v2 23 points of its test; every
# variant reproduced the corrections, so the cost was over-training: 3 epochs over 4 replay records per correction
# (29 steps for 30) at 5e-4 reproduce 100% for a 4.3-point drop. `small` trains LoRA as its stages do (bf16 where native).
CORRECTION_RECIPES = {"tiny": SmallSetRecipe(),
                      "small": SmallSetRecipe(lr=2e-4, mixed_precision="auto", lora=True, lora_r=32, lora_alpha=64)}


def recipe_for_parent(registry, parent: str | None) -> SmallSetRecipe:
    """The corrections recipe of the base `parent` descends from (tiny's for external checkpoints)."""
    from .recipes import base_name_of

    return CORRECTION_RECIPES[base_name_of(registry, parent) or "tiny"]


def _check_text(field: str, text, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise CorrectionError(f"{field}: expected text, got {type(text).__name__}")
    text = text.strip()
    if not text and not allow_empty:
        raise CorrectionError(f"{field}: empty")
    if len(text) > MAX_TURN_CHARS:
        raise CorrectionError(f"{field}: {len(text)} characters, over the limit of {MAX_TURN_CHARS}")
    return text


class CorrectionStore:
    """The pending corrections of one $LLACA_HOME, and the archive of learned batches."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else llaca_home()
        self.root = self.home / "corrections"
        self.pending_dir = self.root / "pending"
        self.archive_dir = self.root / "archive"
        self.data_file = self.pending_dir / "data.json"

    # ------------------------------------------------------------------ storage
    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_rows(self) -> list[dict]:
        try:
            rows = json.loads(self.data_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as e:
            raise CorrectionError(f"{self.data_file}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise CorrectionError(f"{self.data_file}: expected a JSON list of records")
        return rows

    def _row_to_correction(self, row: dict) -> Correction:
        conv = row["conversations"]
        turns = [(conv[i]["value"].replace(IMAGE_TOKEN + "\n", "", 1) if i == 0 else conv[i]["value"],
                  conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
        extra = row.get("llaca", {})
        return Correction(id=str(row["id"]), image=self.pending_dir / row["image"], turns=turns,
                          version=extra.get("version"), original=extra.get("original"),
                          created=extra.get("created", 0.0))

    def list(self) -> list[Correction]:
        """Pending corrections, oldest first."""
        return [self._row_to_correction(r) for r in self._read_rows()]

    def count(self) -> int:
        return len(self._read_rows())

    # ------------------------------------------------------------------ edit
    def add(self, image: str | Path, turns: list[tuple[str, str]], *, version: str | None = None,
            original: str | None = None) -> Correction:
        """Append one correction: `turns` is the conversation so far ending with the corrected answer."""
        if not turns:
            raise CorrectionError("a correction needs at least one question and its corrected answer")
        turns = [(_check_text(f"turn {k + 1} question", q), _check_text(f"turn {k + 1} answer", a))
                 for k, (q, a) in enumerate(turns)]
        if image is None or not Path(image).is_file():
            raise CorrectionError(f"image: {image or 'none'}: no such file (a correction needs the image the "
                                  "answer was about)")
        load_image(image)  # a clear error for a non-image or an over-large one, before anything is written
        data = Path(image).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        rel = f"images/{digest}{Path(image).suffix.lower() or '.png'}"
        conv = []
        for k, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + q},
                     {"from": "gpt", "value": a}]
        row = {"id": f"c{int(time.time())}-{uuid.uuid4().hex[:6]}", "image": rel, "conversations": conv,
               "llaca": {"version": version, "original": original, "created": time.time()}}
        with self._locked():
            write_once(self.pending_dir / rel, data)
            atomic_write_json(self.data_file, self._read_rows() + [row])
        return self._row_to_correction(row)

    def remove(self, correction_id: str) -> None:
        with self._locked():
            rows = self._read_rows()
            kept = [r for r in rows if str(r.get("id")) != correction_id]
            if len(kept) == len(rows):
                raise CorrectionError(f"no pending correction {correction_id!r}")
            atomic_write_json(self.data_file, kept)
            self._drop_unused_images(kept)

    def _drop_unused_images(self, rows: list[dict]) -> None:
        used = {r.get("image") for r in rows}
        for p in (self.pending_dir / "images").glob("*"):
            if f"images/{p.name}" not in used and not p.name.startswith("."):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ learning
    def prepare_batch(self, registry, parent: str, recipe: SmallSetRecipe | None = None) -> dict:
        """Freeze the pending set into an archive batch ready to train; returns the stage config for it.

        train/ = every correction (all its turns) + replay records from `parent`'s lineage; test/ = the
        corrections as single questions (the last question; its earlier turns are given as history only in the
        chat, so a multi-turn correction is tested on its last turn alone only when it has one turn).
        """
        corrections = self.list()
        if not corrections:
            raise CorrectionError("no pending corrections to learn (correct an answer in the chat first)")
        recipe = recipe or recipe_for_parent(registry, parent)
        replay = _replay_pool(registry, parent)
        n_replay = min(len(replay), round(recipe.replay_per_correction * len(corrections)))
        rng = random.Random(recipe.seed)
        mixed = [Record(c.id, c.image, list(c.turns)) for c in corrections] + rng.sample(replay, n_replay)
        rng.shuffle(mixed)
        tests = [Record(c.id, c.image, list(c.turns)) for c in corrections if len(c.turns) == 1]
        batch_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        final = self.archive_dir / f"corrections-{batch_id}"
        with atomic_dir(final) as tmp:
            write_instruction_set(tmp / "train", mixed)
            if tests:
                write_instruction_set(tmp / "test", tests)
            atomic_write_json(tmp / "batch.json", {
                "corrections": [c.id for c in corrections], "n_corrections": len(corrections),
                "n_replay": n_replay, "parent": parent, "recipe": dataclasses.asdict(recipe),
                "pending_rows": self._read_rows(), "version": None, "created": time.time()})
        return {"data": str(final / "train"), "parent": parent, "max_steps": recipe.steps(len(mixed)),
                "lr": recipe.lr, "batch_size": recipe.batch_size, "seed": recipe.seed, "checkpoint_every": 0,
                **recipe.stage_fields()}

    def finish_batch(self, data_path: str | Path, version_id: str) -> None:
        """The batch produced `version_id`: record it, and drop its corrections from the pending set."""
        batch_dir = Path(data_path).parent
        info = json.loads((batch_dir / "batch.json").read_text(encoding="utf-8"))
        atomic_write_json(batch_dir / "batch.json", {**info, "version": version_id, "finished": time.time()})
        learned = set(info["corrections"])
        with self._locked():
            kept = [r for r in self._read_rows() if str(r.get("id")) not in learned]
            atomic_write_json(self.data_file, kept)
            self._drop_unused_images(kept)

    def archived(self) -> list[dict]:
        """Learned batches, newest first: {batch, version, n_corrections, ...}."""
        out = []
        for d in sorted(self.archive_dir.glob("corrections-*"), reverse=True):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                info = json.loads((d / "batch.json").read_text(encoding="utf-8"))
                out.append({"batch": d.name, "path": str(d), **{k: v for k, v in info.items() if k != "pending_rows"}})
        return out


def _replay_pool(registry, parent: str) -> list[Record]:
    """Records every version of the lineage kept for replay (`versions/<id>/replay`), root first."""
    pool: dict[str, Record] = {}  # by id: a stage's replay sample may hold records an earlier one kept too
    for v in registry.lineage(parent):
        if (v.path / "replay" / "data.json").is_file():
            with contextlib.suppress(InvalidDataset):
                for record in load_instruction_set(v.path / "replay").records:
                    pool.setdefault(record.id, record)
    return list(pool.values())


def learn(store: CorrectionStore, registry, method: str = "llaca", parent: str | None = None,
          recipe: SmallSetRecipe | None = None, on_event=None, should_stop=None, **overrides):
    """Learn the pending corrections as one stage from `parent` (default: the newest version); returns it.

    Used by the CLI inline and by the worker for a 'corrections' job (then `config` comes from `stage_config`).
    """
    config = stage_config(store, registry, method=method, parent=parent, recipe=recipe, **overrides)
    return run_config(store, registry, config, on_event=on_event, should_stop=should_stop)


def stage_config(store: CorrectionStore, registry, method: str = "llaca", parent: str | None = None,
                 recipe: SmallSetRecipe | None = None, **overrides) -> dict:
    parent_id = registry.get(parent).id  # None -> the newest; a clear VersionError for an unknown one
    config = store.prepare_batch(registry, parent_id, recipe)
    n = len(store.list())
    return {**config, "method": method, "name": None, **overrides, "_label": f"{method} · {n} correction(s)"}


def run_config(store: CorrectionStore, registry, config: dict, on_event=None, should_stop=None):
    from .tuner import StageConfig, run_stage

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    version = run_stage(StageConfig(**config), registry, on_event=on_event, should_stop=should_stop)
    if version is not None:
        store.finish_batch(config["data"], version.id)
    return version


def queue_learn(store: CorrectionStore, registry, jobs, method: str = "llaca", parent: str | None = None,
                recipe: SmallSetRecipe | None = None):
    """Queue the pending corrections as a 'corrections' job (the worker runs `run_config` on it)."""
    busy = jobs.active(kind="corrections")
    if busy:
        raise CorrectionError(f"corrections are already being learned (job #{busy[0].id}); wait for it to finish")
    config = stage_config(store, registry, method=method, parent=parent, recipe=recipe)
    return jobs.submit(config, kind="corrections", label=config.pop("_label"))

"""The version registry: every learned stage is a saved, immutable version under `$LLACA_HOME/versions/<id>`.

    versions/<id>/meta.json     id, name, parent, stage data (name, sha256, path), method, hparams, metrics, time
    versions/<id>/model/        full weights + processor (save_pretrained, safetensors)       -- or --
    versions/<id>/adapter/      a peft LoRA adapter (+ projector) over the full-weights version `base_version`
    (no weights at all)         an external checkpoint: meta `"weights": "external", "model_path": <folder or hub id>`,
                                loaded from there (never copied: a 7B checkpoint is 14 GB); the root of a lineage
    versions/<id>/replay/       a small sample of the stage's records (for the `replay` rule later on)
    versions/<id>/train_log.json  loss and alpha per step

A version directory appears only by an atomic rename of a complete temp dir, so a crash mid-write never
lists a half-written version; ids are allocated under a file lock, so two writers never collide.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
import shutil
import time
from pathlib import Path

from .paths import atomic_dir, atomic_write_json, llaca_home

VERSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VersionError(ValueError):
    pass


def method_label(method: str | None, replay_fraction: float | None = None) -> str | None:
    """'llaca + 20% replay' for a stage that also replayed earlier records (tiny's default recipe), 'replay (20% earlier
    records)' for the replay rule given its share, else the rule's name ('llaca', 'seq', ...)."""
    if method == "replay" and replay_fraction:
        return f"replay ({replay_fraction:.0%} earlier records)"
    return f"{method} + {replay_fraction:.0%} replay" if method and replay_fraction else method


@dataclasses.dataclass
class Version:
    id: str
    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.id

    @property
    def parent(self) -> str | None:
        return self.meta.get("parent")

    @property
    def created(self) -> float:
        return self.meta.get("created", 0.0)

    @property
    def weights(self) -> str:
        return self.meta.get("weights", "full")

    @property
    def method(self) -> str | None:
        """The rule as people name it (`method_label`)."""
        return method_label(self.meta.get("method"), (self.meta.get("hparams") or {}).get("replay_fraction"))

    def label(self) -> str:
        stage = self.meta.get("stage", {}).get("name")
        bits = [self.id]
        if self.name != self.id:
            bits.append(f"'{self.name}'")
        if stage:
            bits.append(f"{stage} ({self.method})")
        return " ".join(bits)


class Registry:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else llaca_home()
        self.root = self.home / "versions"
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lookup
    def _dir(self, version_id: str) -> Path:
        if not isinstance(version_id, str) or not VERSION_ID.match(version_id):
            raise VersionError(f"invalid version id {version_id!r}")
        path = self.root / version_id
        if path.resolve().parent != self.root.resolve():
            raise VersionError(f"invalid version id {version_id!r}")
        return path

    def list(self) -> list[Version]:
        out = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not (d / "meta.json").is_file():
                continue
            try:
                meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            out.append(Version(d.name, d, meta))
        return sorted(out, key=lambda v: (v.created, v.id))

    def exists(self, ref: str) -> bool:
        try:
            self.get(ref)
            return True
        except VersionError:
            return False

    def get(self, ref: str | None = None) -> Version:
        """Resolve an id or a unique name; None means the newest version."""
        versions = self.list()
        if not versions:
            raise VersionError(f"no versions in {self.root}; run `python -m llaca build-base` first")
        if ref is None or ref == "latest":
            return versions[-1]
        for v in versions:
            if v.id == ref:
                return v
        named = [v for v in versions if v.meta.get("name") == ref]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise VersionError(f"name {ref!r} is ambiguous ({', '.join(v.id for v in named)}); use the id")
        raise VersionError(f"unknown version {ref!r}; known: {', '.join(v.id for v in versions)}")

    def lineage(self, ref: str) -> list[Version]:
        """Root-first chain of versions ending at `ref`."""
        chain = [self.get(ref)]
        while chain[-1].parent:
            chain.append(self.get(chain[-1].parent))
        return chain[::-1]

    def latest_in_lineage(self, root: str) -> Version:
        """The newest version descending from `root` (the root itself when nothing was learned from it yet)."""
        root_id = self.get(root).id
        ours = [v for v in self.list() if self.lineage(v.id)[0].id == root_id]
        return ours[-1]

    def children(self, ref: str) -> list[Version]:
        vid = self.get(ref).id
        return [v for v in self.list() if v.parent == vid]

    # ------------------------------------------------------------------ write
    @contextlib.contextmanager
    def lock(self, name: str = "registry"):
        """An exclusive advisory lock in `$LLACA_HOME/locks` (released when the process dies)."""
        lock_dir = self.home / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _next_id(self) -> str:
        numbers = [int(d.name[1:]) for d in self.root.iterdir() if re.fullmatch(r"v\d+", d.name)]
        return f"v{max(numbers, default=0) + 1}"

    def create(self, meta: dict, write, version_id: str | None = None) -> Version:
        """Write a new version: `write(tmp_dir)` fills a temp dir, which is renamed into place when complete."""
        with self.lock():
            vid = version_id or self._next_id()
            final = self._dir(vid)
            if final.exists():
                raise VersionError(f"version {vid!r} already exists")
            meta = {**meta, "id": vid, "created": meta.get("created", time.time())}
            with atomic_dir(final) as tmp:
                write(Path(tmp))
                (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
                Path(tmp).chmod(0o755)
        return Version(vid, final, meta)

    def register_external(self, path_or_id: str, name: str | None = None) -> Version:
        """Register a LLaVA checkpoint (folder or cached hub id) as a weightless root version; idempotent.

        Only meta.json is written: `load_version` reads the weights from `model_path` each time.
        """
        from .models.llava import check_llava, resolve_model_path

        resolved = resolve_model_path(path_or_id)
        check_llava(resolved)
        with self.lock("register"):  # two ranks / processes registering the same model get one version
            for v in self.list():
                if v.weights == "external" and v.meta.get("model_path") == resolved:
                    return v
            meta = {"name": name or Path(resolved).name, "parent": None, "weights": "external",
                    "model_path": resolved, "method": "external", "metrics": {}}
            return self.create(meta, lambda tmp: None)

    def update_meta(self, ref: str, **fields) -> Version:
        with self.lock():
            v = self.get(ref)
            meta = {**v.meta, **fields}
            atomic_write_json(v.path / "meta.json", meta)
        return Version(v.id, v.path, meta)

    def record_metrics(self, ref: str, metrics: dict) -> Version:
        with self.lock():
            v = self.get(ref)
            meta = {**v.meta, "metrics": {**v.meta.get("metrics", {}), **metrics}}
            atomic_write_json(v.path / "meta.json", meta)
        return Version(v.id, v.path, meta)

    def rename(self, ref: str, name: str) -> Version:
        if not name or len(name) > 64:
            raise VersionError("a name is 1 to 64 characters")
        return self.update_meta(ref, name=name)

    def delete(self, ref: str, force: bool = False) -> None:
        v = self.get(ref)
        if v.id == "base":
            raise VersionError("the base version cannot be deleted")
        kids = self.children(v.id)
        if kids and not force:
            raise VersionError(f"{v.id} has children ({', '.join(k.id for k in kids)}); confirm to delete it")
        if any(k.meta.get("base_version") == v.id for k in self.list()):
            raise VersionError(f"{v.id} holds the full weights other versions' adapters need")
        users = [k.id for k in self.list() if k.id != v.id and v.id in (k.meta.get("grouped") or {}).get("members", [])]
        if users:  # llaca.train.grouping: a grouped stage answers some questions with this version's weights
            raise VersionError(f"{v.id} answers a group of grouped version(s) {', '.join(users)}; delete those first")
        for kid in kids:  # keep the lineage connected
            self.update_meta(kid.id, parent=v.parent)
        with self.lock():
            trash = v.path.with_name(f".{v.id}.deleted-{time.time_ns()}")
            v.path.rename(trash)  # atomic: the version disappears whole
            shutil.rmtree(trash, ignore_errors=True)


def _as_bits(version: Version, bits) -> int | None:
    """`bits="auto"`: load as the version was trained (QLoRA versions record 4 or 8), else 4, 8 or None."""
    if bits == "auto":
        return version.meta.get("quant_bits")
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 'auto', None, 4 or 8, got {bits!r}")
    return bits


def load_base(version: Version, dtype=None, bits: int | None = None):
    """The model + processor a LoRA adapter sits on: an external checkpoint or a full-weights version."""
    from .models.llava import default_device, load_model, load_pretrained

    if version.weights == "external":
        return load_model(version.meta["model_path"], load_in_4bit=bits == 4, load_in_8bit=bits == 8, dtype=dtype)
    if version.weights == "full":
        import torch

        return load_pretrained(version.path / "model", dtype=dtype or torch.float32,
                               device=default_device() if bits else None,
                               load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    raise VersionError(f"version {version.id} holds {version.weights!r} weights, not a base model")


def base_of(registry: Registry, version: Version) -> Version:
    """The version whose weights `version` runs on: itself, or its LoRA adapter's `base_version`."""
    return registry.get(version.meta["base_version"]) if version.weights == "lora" else version


def load_version(registry: Registry, ref: str | None = None, dtype=None, bits="auto"):
    """Load a version's model + processor (full weights, an external checkpoint, or a base + its LoRA adapter).

    `bits`: "auto" (as the version was trained), None (full precision), 4 or 8 (bitsandbytes).
    """
    v = registry.get(ref)
    bits = _as_bits(v, bits)
    model, processor = load_base(base_of(registry, v), dtype=dtype, bits=bits)
    if v.weights == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, v.path / "adapter", is_trainable=False)
        model.eval()
    return model, processor

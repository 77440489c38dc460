"""The version registry: every learned stage is a saved, immutable version under `$LLACA_HOME/versions/<id>`.

    versions/<id>/meta.json     id, name, parent, stage data (name, sha256, path), method, hparams, metrics, time
    versions/<id>/model/        full weights + processor (save_pretrained, safetensors)       -- or --
    versions/<id>/adapter/      a peft LoRA adapter (+ projector) over the full-weights version `base_version`
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

    def label(self) -> str:
        stage = self.meta.get("stage", {}).get("name")
        bits = [self.id]
        if self.name != self.id:
            bits.append(f"'{self.name}'")
        if stage:
            bits.append(f"{stage} ({self.meta.get('method')})")
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
        for kid in kids:  # keep the lineage connected
            self.update_meta(kid.id, parent=v.parent)
        with self.lock():
            trash = v.path.with_name(f".{v.id}.deleted-{time.time_ns()}")
            v.path.rename(trash)  # atomic: the version disappears whole
            shutil.rmtree(trash, ignore_errors=True)


def load_version(registry: Registry, ref: str | None = None, dtype=None):
    """Load a version's model + processor (full weights, or base weights + its LoRA adapter)."""
    import torch

    from .model import load_pretrained

    v = registry.get(ref)
    dtype = dtype or torch.float32
    if v.weights == "lora":
        from peft import PeftModel

        base = registry.get(v.meta["base_version"])
        model, processor = load_pretrained(base.path / "model", dtype=dtype)
        model = PeftModel.from_pretrained(model, v.path / "adapter", is_trainable=False)
        model.eval()
        return model, processor
    return load_pretrained(v.path / "model", dtype=dtype)

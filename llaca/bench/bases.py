"""Which base a benchmark starts from: a version folder (like `assets/base` or `assets/base_v1`) registered as
`base` in a private registry under the benchmark's work dir, so v1 and v2 can be measured side by side.

    reg = registry_for_base("assets/base_v1", work)     # work/bases/base_v1-<weights hash>/versions/base
    base_id("assets/base_v1")                          # 'base_v1-9c94a5f2aeec': part of every run's cache key

The id hashes the weights file, so a rebuilt base under the same folder name never reuses another base's runs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

WEIGHT_FILES = ("model/model.safetensors", "adapter/adapter_model.safetensors")


def _check(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not (path / "meta.json").is_file():
        raise ValueError(f"--base {path}: not a version folder (no meta.json there)")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise ValueError(f"--base {path}: no weights ({' or '.join(WEIGHT_FILES)}) in the folder")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("weights", "full") != "full":
        raise ValueError(f"--base {path}: holds {meta.get('weights')!r} weights; a base must be a full-weights version")
    return path


def base_id(path: str | Path) -> str:
    """`<folder name>-<first 12 hex of sha256(model.safetensors)>`."""
    path = _check(Path(path))
    h = hashlib.sha256()
    with open(path / WEIGHT_FILES[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{path.name}-{h.hexdigest()[:12]}"


def registry_for_base(path: str | Path, work: str | Path):
    """A registry (created once, then reused) whose `base` is a copy of the folder `path`.

    The base mixture's data paths in its meta are dropped: `quality.base_test_split` regenerates that split from
    the build seed (with today's generator: after a generator change a previous base is tested on the new mixture).
    """
    from ..versions import Registry

    path = _check(Path(path))
    home = Path(work) / "bases" / base_id(path)
    registry = Registry(home)
    if registry.exists("base"):
        return registry
    meta = json.loads((path / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("id", "created")}
    meta["stage"] = {**meta.get("stage", {}), "path": None, "test_path": None}
    meta["source_folder"] = str(path)

    def write(tmp: Path):
        for item in path.iterdir():
            if item.name != "meta.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

    registry.create(meta, write, version_id="base")
    return registry

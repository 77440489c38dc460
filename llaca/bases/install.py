"""The base a fresh machine starts from: already registered, else installed from `assets/`, else built."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..models.catalog import base_version_id, default_base
from ..paths import ASSETS_DIR
from ..versions import Registry, Version
from .splits import base_data_root

SHIPPED_BASE = ASSETS_DIR / "base"


def ensure_base(registry: Registry | None = None, on_event=None, base: str | None = None) -> Version:
    """The chosen base version (default `default_base()`): already registered, else installed, else built.

    `tiny`: copied from the shipped `assets/base` (or built from nothing if that is missing). `small`: assembled
    from the pretrained wheels + the shipped adapter (`llaca.bases.small.install_small`, well under a minute).
    """
    registry = registry or Registry()
    base = base or default_base()
    vid = base_version_id(base)
    if registry.exists(vid):
        return registry.get(vid)
    with registry.lock(f"build-{vid}"):
        if registry.exists(vid):  # another process made it while we waited
            return registry.get(vid)
        if base == "small":
            from .small import install_small

            return install_small(registry, on_event=on_event, version_id=vid)
        if (SHIPPED_BASE / "meta.json").is_file():
            return install_shipped_base(registry)
        from .tiny import build_base_v2  # the default recipe since base v2 shipped

        return build_base_v2(registry, on_event=on_event, version_id="base")


def install_shipped_base(registry: Registry) -> Version:
    """Register `assets/base` as `base`; its data paths are re-pointed at a locally regenerated base mixture."""
    meta = json.loads((SHIPPED_BASE / "meta.json").read_text())
    data_root = base_data_root(registry, meta.get("build", {}))
    meta = {k: v for k, v in meta.items() if k not in ("id", "created")}
    meta["stage"] = {**meta.get("stage", {}), "path": str(data_root / "base" / "train"),
                     "test_path": str(data_root / "base" / "test")}

    def write(tmp: Path):
        for item in SHIPPED_BASE.iterdir():
            if item.name != "meta.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

    return registry.create(meta, write, version_id="base")

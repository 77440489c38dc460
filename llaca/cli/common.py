"""Helpers every CLI command group shares: the registry with its base installed."""
from __future__ import annotations

from ..train.progress import progress_printer


def registry_with_base():
    from ..bases.install import ensure_base
    from ..versions import Registry

    registry = Registry()
    ensure_base(registry, on_event=progress_printer("build-base"))
    return registry

"""A base's own data on disk, and the fingerprint that says a test split is the one the base was scored on."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..data import coin_mini
from ..versions import Registry


def split_fingerprint(split_dir: Path) -> str:
    """sha256 over a split's data.json and its images' decoded pixels (sorted; not the PNG bytes, which change with
    the zlib build): names the exact records a figure was scored on."""
    from PIL import Image

    split_dir = Path(split_dir)
    h = hashlib.sha256((split_dir / "data.json").read_bytes())
    for f in sorted(p for p in split_dir.rglob("*") if p.is_file() and p.name != "data.json"):
        h.update(f.relative_to(split_dir).as_posix().encode())
        with Image.open(f) as im:
            h.update(im.convert("RGB").tobytes())
    return h.hexdigest()


class StaleTestSplit(ValueError):
    """Today's generator rebuilt a base's test split with other records than the base was scored on."""


def check_test_split(build: dict, split_dir: Path, strict: bool = True) -> None:
    """Raise `StaleTestSplit` (or, not `strict`, log it) if `split_dir` is not the split `build.test_sha256` names."""
    expected = build.get("test_sha256")
    if not expected:
        return  # a base built before the fingerprint was recorded: nothing to compare with
    got = split_fingerprint(split_dir)
    if got != expected:
        msg = (f"{split_dir}: other test records than the base was scored on (build.test_sha256 {expected[:12]}, "
               f"these {got[:12]}): today's generator differs from the build's; score it with the code it was "
               "built with, or rebuild the base (python -m llaca build-base)")
        if strict:
            raise StaleTestSplit(msg)
        logging.getLogger(__name__).warning(msg)


def base_data_root(registry: Registry, build: dict, strict: bool = False) -> Path:
    """The folder of a base's own mixture as its `build` meta describes it, with the test split written.

    Base v2's training split (16,000 records) is not written here: `llaca.data.world.ensure_mixture` writes it when
    wanted (stages never read it: replay draws from the version's own `replay/` folder), so installing stays fast.
    The split is regenerated from the build seed by *today's* generator; where the meta records the fingerprint of
    the split the base was scored on (`build.test_sha256`), a mismatch raises `StaleTestSplit` (`strict`, what the
    benchmarks use: they would score other records) or is logged (installing: the app still starts).
    """
    seed = build.get("seed", 0)
    if build.get("world") == "v2":
        from ..data.world import ensure_mixture

        root = ensure_mixture(registry, seed, build["n_train"], build["n_test"], splits=("test",),
                              rehearsal=build.get("rehearsal", 0.0))
    else:
        root = registry.home / "datasets" / f"base-mixture-seed{seed}"
        if not (root / "base" / "test" / "data.json").is_file():
            coin_mini.write_base_mixture(root, seed=seed, n_train=build.get("n_train", 6000),
                                         n_test=build.get("n_test", 150))
    check_test_split(build, root / "base" / "test", strict)
    return root

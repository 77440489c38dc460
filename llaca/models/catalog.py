"""The embedded bases by the name people pick them with (`--base`), and which one is the default."""
from __future__ import annotations

import os

# The two embedded bases, by the name people pick them with -> their version id in the registry. `tiny` keeps the
# id `base` it has had since v1 (every lineage, benchmark and test names it); `small` is base v3.
BASES = {"small": "small", "tiny": "base"}
DEFAULT_BASE = "small"
BASE_DESCRIPTIONS = {
    "small": "base v3, an ImageNet EfficientNet-Lite2 tower + a trained projector + SmolLM2-135M-Instruct with "
             "trained LoRA (140M parameters, assembled from pretrained wheels)",
    "tiny": "base v2, a 3M-parameter LLaVA trained from nothing on two cores (fast; for tests and sweeps)",
}


def default_base() -> str:
    """The base the app and the CLI start from: `$LLACA_BASE` (what `--base` sets), else `small`."""
    name = os.environ.get("LLACA_BASE", DEFAULT_BASE)
    if name not in BASES:
        raise ValueError(f"LLACA_BASE={name!r}: the embedded bases are {', '.join(BASES)}")
    return name


def base_version_id(base: str | None = None) -> str:
    return BASES[base or default_base()]

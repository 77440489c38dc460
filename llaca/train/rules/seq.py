"""Sequential fine-tuning: the paper's lower-bound baseline ("no EMA at all", docs/llaca.md)."""
from __future__ import annotations

from .base import UpdateRule


class SeqRule(UpdateRule):
    """Plain fine-tuning, stage after stage. Keeps no state; what the optimizer leaves is the new version."""

    name = "seq"

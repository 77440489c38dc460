"""Exemplar replay: a data-side baseline (not in the original LLaCA, which uses no replay; docs/llaca.md).

Weights are updated exactly as in sequential fine-tuning; the difference is the data: each stage's
records are mixed with a few records kept from earlier stages.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from .seq import SeqRule


class ReplayRule(SeqRule):
    """Seq fine-tuning on stage records + round(fraction * len(stage)) records replayed from earlier stages."""

    name = "replay"

    def __init__(self, fraction: float = 0.2, buffer_per_stage: int = 200):
        if not fraction >= 0:
            raise ValueError(f"fraction must be >= 0, got {fraction}")
        if int(buffer_per_stage) != buffer_per_stage or buffer_per_stage < 0:
            raise ValueError(f"buffer_per_stage must be a non-negative integer, got {buffer_per_stage}")
        self.fraction = float(fraction)
        self.buffer_per_stage = int(buffer_per_stage)   # records of each finished stage the registry keeps

    def hparams(self) -> dict:
        return {"fraction": self.fraction, "buffer_per_stage": self.buffer_per_stage}

    def n_replay(self, n_stage: int) -> int:
        """How many earlier records join a stage of `n_stage` records (Python's round: half to even)."""
        return round(self.fraction * n_stage)

    def mix(self, stage_records: Sequence[Any], earlier_records: Sequence[Any], seed: int) -> list:
        """Stage records plus `n_replay` earlier ones (seeded; with replacement only if there are too few), shuffled.

        With nothing to replay (first stage, fraction 0) the stage records come back unchanged, so the first
        stage trains exactly like `seq`.
        """
        k = self.n_replay(len(stage_records)) if earlier_records else 0
        if k == 0:
            return list(stage_records)
        rng = random.Random(seed)
        if k <= len(earlier_records):
            replayed = rng.sample(list(earlier_records), k)
        else:
            replayed = rng.choices(list(earlier_records), k=k)
        mixed = list(stage_records) + replayed
        rng.shuffle(mixed)
        return mixed

    def keep(self, stage_records: Sequence[Any], seed: int) -> list:
        """The `buffer_per_stage` records of a finished stage to keep for later replay (seeded, no replacement)."""
        if len(stage_records) <= self.buffer_per_stage:
            return list(stage_records)
        return random.Random(seed).sample(list(stage_records), self.buffer_per_stage)

"""Update rules for continual instruction tuning, behind one interface (`UpdateRule`, see base.py).

    rule = make_rule("llaca")                 # or "seq", "ema" (beta=...), "replay" (fraction=...)
    rule = make_rule(meta["rule"], **meta["hparams"])   # rebuild from version metadata
"""
from __future__ import annotations

import inspect

from .base import UpdateRule
from .ema import EmaRule
from .llaca import LlacaRule, llaca_alpha, llaca_alphas
from .replay import ReplayRule
from .seq import SeqRule

_CLASSES: dict[str, type[UpdateRule]] = {"seq": SeqRule, "ema": EmaRule, "llaca": LlacaRule, "replay": ReplayRule}
RULES: tuple[str, ...] = tuple(_CLASSES)


def make_rule(name: str, **hparams) -> UpdateRule:
    """Build a rule by name; unknown names or hyper-parameters raise ValueError saying what is valid."""
    if name not in _CLASSES:
        raise ValueError(f"unknown update rule {name!r}; valid rules: {', '.join(RULES)}")
    cls = _CLASSES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"rule {name!r} has no hyper-parameter(s) {unknown}; valid: {valid or 'none'}")
    return cls(**hparams)


__all__ = ["UpdateRule", "SeqRule", "EmaRule", "LlacaRule", "ReplayRule", "make_rule", "RULES",
           "llaca_alpha", "llaca_alphas"]

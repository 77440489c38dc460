"""Fixed-beta EMA: the paper's "stable EMA" baseline (docs/llaca.md, eq. EMA)

    theta*_t = beta * theta*_{t-1} + (1 - beta) * theta_t

i.e. the LLaCA loop with a constant alpha = 1 - beta. A single beta cannot suit every dataset; that is
what LLaCA (llaca.py) fixes.
"""
from __future__ import annotations

import torch

from .base import Params, UpdateRule, ema_replace, fp32_copy, local, place_like, split_state, with_grad


class EmaRule(UpdateRule):
    """Keep a slow fp32 copy theta* of the trainable weights; write it into the model at the end of the stage."""

    name = "ema"

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.ema: dict[str, torch.Tensor] = {}
        self.step = 0
        self._unplaced = False

    def hparams(self) -> dict:
        return {"beta": self.beta}

    def start_stage(self, params: Params) -> None:
        self.ema, self.step, self._unplaced = {}, 0, False

    @torch.no_grad()
    def after_step(self, params: Params) -> dict[str, float] | None:
        names = with_grad(params)
        if not names:
            return None
        self._place(params)
        alpha = 1.0 - self.beta                             # weight on the new weights
        seen = [n for n in names if n in self.ema]
        for n in names:
            if n not in self.ema:                           # first step of the stage: theta* = theta
                self.ema[n] = fp32_copy(params[n])
        if seen:
            ema = [self.ema[n] for n in seen]
            theta = [local(params[n]).detach().float() for n in seen]
            torch._foreach_lerp_(ema, theta, alpha)         # theta* <- (1 - alpha) theta* + alpha theta
        self.step += 1
        return {"alpha": alpha}

    def end_stage(self, params: Params) -> None:
        """`ema_replace`: the EMA weights become the model (in the params' dtype); state is released."""
        self._place(params)
        ema_replace(params, self.ema)
        self.ema = {}

    def _place(self, params: Params) -> None:
        if self._unplaced:                                  # state loaded from disk: onto the params' devices
            place_like(self.ema, params)
            self._unplaced = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{n}": t for n, t in self.ema.items()}
        state["step"] = torch.tensor(self.step, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts = split_state(state, ("ema",))
        self.ema = {n: t.detach().to(torch.float32, copy=True) for n, t in parts["ema"].items()}
        self.step = int(parts[""].get("step", torch.tensor(0)))
        self._unplaced = True                               # moved to the params' devices on the next step

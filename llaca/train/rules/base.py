"""The interface every update rule implements, plus the few helpers the EMA-style rules share.

A rule rides along with an ordinary optimizer loop (docs/llaca.md, "The rule as the authors' code runs it"):

    rule.start_stage(params)                 # params = named TRAINABLE parameters
    for batch in stage:
        loss.backward(); optimizer.step()
        stats = rule.after_step(params)      # p.grad = gradient of the step just taken (unscaled, unclipped)
        optimizer.zero_grad()
    rule.end_stage(params)                   # ema/llaca: write theta* into the model (`ema_replace`)

Resuming an interrupted stage: `start_stage(params)` then `load_state_dict(saved)`.

Sharded parameters (FSDP2: each is a DTensor, and each rank holds one shard of it and of its gradient): the rules
work on the rank's local shard (`local`), so their state (EMA, previous gradient) is sharded exactly like the
parameters, and `state_dict` holds the rank's shards. Elementwise updates (the EMA axpy) need no communication;
only quantities summed over a whole tensor (LLaCA's L1 norms) do, through LlacaRule's `all_reduce`.
"""
from __future__ import annotations

import torch

Params = dict[str, torch.nn.Parameter]


class UpdateRule:
    """Base rule = plain fine-tuning: the optimizer's weights are the result, nothing is tracked."""

    name: str = "base"

    def hparams(self) -> dict:
        """JSON-serialisable hyper-parameters; `make_rule(rule.name, **rule.hparams())` rebuilds the rule."""
        return {}

    def start_stage(self, params: Params) -> None:
        """Begin a stage (a new dataset): per-stage state starts empty (docs/llaca.md)."""

    def after_step(self, params: Params) -> dict[str, float] | None:
        """Called after `optimizer.step()` and before `zero_grad()`; returns per-step stats or None."""
        return None

    def end_stage(self, params: Params) -> None:
        """Finish a stage: leave in `params` the weights to save, evaluate and start the next stage from."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors only (safetensors-compatible). Tensors are live: clone them to keep a snapshot."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned, so the interrupted stage resumes with identical updates."""
        if state:
            raise ValueError(f"rule {self.name!r} keeps no state, got keys {sorted(state)[:5]}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


# --- helpers shared by the EMA-style rules ------------------------------------------------------------------

def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard (a view: writing to it writes the parameter), else `t`.

    Sharded (FSDP2) parameters and their gradients are DTensors; torch ops on them would each communicate, and
    mixing them with the rules' plain-tensor state is an error. Reading every tensor through `local` keeps the rules
    single-device code. (Duck-typed: importing torch.distributed.tensor costs seconds that unsharded runs need not pay.)
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached float32 copy (of the local shard): EMA / previous-gradient state stays fp32 even for bf16 params
    (docs/llaca.md)."""
    return local(t).detach().to(torch.float32, copy=True)


def with_grad(params: Params) -> list[str]:
    """Names of the params that got a gradient this step; the others (unused layers) are skipped."""
    return [n for n, p in params.items() if p.grad is not None]


@torch.no_grad()
def ema_replace(params: Params, ema: dict[str, torch.Tensor]) -> None:
    """`ema_replace`: copy theta* into the model, cast to each param's dtype. Params never stepped are untouched."""
    names = [n for n in ema if n in params]
    if names:
        torch._foreach_copy_([local(params[n]).data for n in names], [ema[n] for n in names])


def split_state(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """{"ema.w": t, "step": s} -> {"ema": {"w": t}, "": {"step": s}}; unknown prefixes are an error."""
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    out[""] = {}
    for key, t in state.items():
        head, dot, tail = key.partition(".")
        if dot and head in prefixes:
            out[head][tail] = t
        elif key == "step":
            out[""][key] = t
        else:
            raise ValueError(f"unexpected key {key!r} in rule state (expected {prefixes} prefixes or 'step')")
    return out


def place_like(state: dict[str, torch.Tensor], params: Params) -> None:
    """Move loaded state (e.g. read from disk on CPU) onto each param's device, in place of the dict values."""
    for n, t in state.items():
        if n in params and t.device != local(params[n]).device:
            state[n] = t.to(local(params[n]).device)

"""LLaCA: EMA whose weight adapts per tensor, per step (docs/llaca.md, "The rule as the authors' code runs it").

For each trainable tensor p with gradient g, after every optimizer step:

    a     = || p - ema[p] ||_1
    b     = || g ||_1
    c     = || g - g_prev[p] ||_1
    alpha = scale * (1 + b) / (a * c)              # weight on the NEW weights (= 1 - beta); scale = 2 in the original
    if not (0 < alpha < 1): alpha = alpha_fallback # also inf / NaN (a == 0 or c == 0); 0.01 in the original
    ema[p]    = (1 - alpha) * ema[p] + alpha * p
    g_prev[p] = g

This is the paper's beta_t = (L'(theta) + 1) / ((theta - theta*) L''(theta)) with L'' ~ the difference of
successive gradients and every vector reduced to one scalar per tensor by an L1 norm. A big step away
from theta* (large a) or a sharp change in curvature (large c) lowers alpha: the EMA then holds on to
what it knew (stability); a steep but smooth loss (large b) raises it (plasticity).

Size-normalised variant (`size_ref`, the bench's named method `llaca-norm`; the faithful rule leaves it None):
a, b and c are L1 sums over the N elements of a tensor, so alpha ~ 1/N and the EMA's per-element step alpha * a / N
~ 1/N too: the same equation is ~14x more conservative per element on the paper's 4096x128 LoRA matrices than on a
192x192 matrix. With `size_ref` set, scale is multiplied by N / size_ref per tensor, so every tensor gets the alpha a
tensor of `size_ref` elements with the same per-element statistics would get (PAPER_LORA_NUMEL = 4096 * 128).

`llaca_alpha` is the readable one-tensor reference; `LlacaRule.after_step` does the same for all tensors at
once with torch._foreach_* ops and `llaca_alphas` (tests check the two agree).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import Params, UpdateRule, ema_replace, fp32_copy, local, place_like, split_state, with_grad

PAPER_LORA_NUMEL = 4096 * 128   # one LoRA matrix of the paper's setting (Vicuna-7B hidden 4096, rank 128)


def llaca_alpha(a: float, b: float, c: float, scale: float = 2.0, fallback: float = 0.01,
                numel: int | None = None, size_ref: float | None = None) -> float:
    """Reference: alpha = scale (1 + b) / (a c), or `fallback` unless 0 < alpha < 1 (inf / NaN included).
    With `size_ref` (and the tensor's `numel`), scale is first multiplied by numel / size_ref."""
    if size_ref is not None:
        scale = scale * numel / size_ref
    try:
        alpha = scale * (1 + b) / (a * c)
    except ZeroDivisionError:                      # Python raises where torch gives inf / NaN
        return fallback
    return alpha if 0 < alpha < 1 else fallback    # NaN compares False -> fallback


def llaca_alphas(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scale: float | torch.Tensor = 2.0,
                 fallback: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """`llaca_alpha` on 1-D tensors of per-tensor norms (`scale`: one number, or one per tensor in float64).
    Returns (alpha, used_fallback).

    Computed in float64 with the same operation order as the reference, so it matches Python floats bit for bit.
    """
    a, b, c = a.double(), b.double(), c.double()
    alpha = scale * (1 + b) / (a * c)
    ok = (alpha > 0) & (alpha < 1)                 # False for NaN
    return torch.where(ok, alpha, torch.full_like(alpha, fallback)), ~ok


def l1_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||t||_1 of each tensor as one 1-D float32 tensor, with no host sync.

    On CPU, abs().sum() per tensor is ~6x faster than the ord=1 norm kernel (`_foreach_norm` / `vector_norm`), which
    made this rule 2.8x AdamW's step (`python -m llaca.bench speed`); its one temporary per tensor is reused by the
    allocator. On accelerators the single multi-tensor kernel is the fast one.
    """
    if tensors and tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 1, dtype=torch.float32))
    return torch.stack([t.abs().sum(dtype=torch.float32) for t in tensors]) if tensors else torch.zeros(0)


class LlacaRule(UpdateRule):
    """Adaptive EMA (LLaCA). State per stage: ema (theta*) and g_prev, both float32."""

    name = "llaca"

    def __init__(self, scale: float = 2.0, alpha_fallback: float = 0.01, size_ref: float | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`all_reduce`: for sharded params (FSDP / ZeRO>=1) a callable summing a 1-D tensor of partial L1 sums
        across ranks (e.g. `lambda t: (dist.all_reduce(t), t)[1]`), so a, b, c are norms of the FULL tensor and
        alpha is the same number on every rank. Every rank must then present the same names with a grad (a rank
        with an empty shard passes a zero-size grad, not None). None (default) = each rank holds whole tensors
        (single device, DDP). The stage loop sets it after sharding (`rule.all_reduce = ...`): its params are then
        DTensors, whose `numel()` is the full tensor's, so `size_ref` works there too; given here with plain tensor
        shards (a ZeRO-style caller) `numel()` would be the shard's, hence the refusal below."""
        if not 0.0 < alpha_fallback <= 1.0:
            raise ValueError(f"alpha_fallback must be in (0, 1], got {alpha_fallback}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        if size_ref is not None and not (size_ref > 0 and math.isfinite(size_ref)):
            raise ValueError(f"size_ref must be a positive finite number of elements, got {size_ref}")
        if size_ref is not None and all_reduce is not None:
            raise ValueError("size_ref needs whole tensors (their numel); it is not supported with sharded params")
        self.scale = float(scale)
        self.size_ref = None if size_ref is None else float(size_ref)
        self.alpha_fallback = float(alpha_fallback)
        self.all_reduce = all_reduce
        self.ema: dict[str, torch.Tensor] = {}
        self.g_prev: dict[str, torch.Tensor] = {}
        self.step = 0
        self.last_alpha: dict[str, float] = {}     # alpha per tensor at the last step (for detailed plots)
        self.last_dist: dict[str, float] = {}      # a = ||p - ema||_1 per tensor at the last step (EMA movement)
        self._unplaced = False

    def hparams(self) -> dict:
        hp = {"scale": self.scale, "alpha_fallback": self.alpha_fallback}   # all_reduce is runtime wiring
        if self.size_ref is not None:                  # only when set: the faithful rule's metadata is unchanged
            hp["size_ref"] = self.size_ref
        return hp

    def start_stage(self, params: Params) -> None:
        self.ema, self.g_prev, self.step, self.last_alpha, self._unplaced = {}, {}, 0, {}, False
        self.last_dist = {}

    @torch.no_grad()
    def after_step(self, params: Params) -> dict[str, float] | None:
        names = with_grad(params)
        if not names:
            return None
        self._place(params)

        # First step of the stage for a tensor: theta* = theta, g_prev = g, and the fixed fallback (no g_prev yet).
        fresh = [n for n in names if n not in self.ema]
        for n in fresh:
            self.ema[n] = fp32_copy(params[n])
            self.g_prev[n] = fp32_copy(params[n].grad)

        seen = [n for n in names if n not in fresh]
        alpha_list: list[float] = []
        fallback_list: list[float] = []
        dist_list: list[float] = []
        if seen:
            theta = [local(params[n]).detach() for n in seen]            # this rank's shards (all of it unsharded)
            grad = [local(params[n].grad).detach() for n in seen]
            ema = [self.ema[n] for n in seen]
            g_prev = [self.g_prev[n] for n in seen]

            # g_prev's buffer doubles as fp32 scratch once c is known (it is refilled with g at the end):
            # no per-step allocations, which on CPU cost more than the arithmetic.
            torch._foreach_sub_(g_prev, grad)                  # g_prev - g
            c = l1_norms(g_prev)                               # c = ||g - g_prev||_1
            b = l1_norms(grad)                                 # b = ||g||_1
            diff = g_prev
            torch._foreach_copy_(diff, theta)
            torch._foreach_sub_(diff, ema)                     # p - ema
            a = l1_norms(diff)                                 # a = ||p - ema||_1
            if self.all_reduce is not None:                    # shard sums -> norms of the full tensors:
                a, b, c = self.all_reduce(torch.cat([a, b, c])).view(3, -1)   # ONE collective for all tensors

            scale = self.scale
            if self.size_ref is not None:                      # per tensor: scale * N / size_ref
                scale = torch.tensor([self.scale * params[n].numel() / self.size_ref for n in seen],
                                     dtype=torch.float64, device=a.device)
            alpha, fell_back = llaca_alphas(a, b, c, scale, self.alpha_fallback)
            host = torch.cat([alpha, fell_back.double(), a.double()]).tolist()   # the one host sync per step
            k = len(seen)
            alpha_list, fallback_list, dist_list = host[:k], host[k:2 * k], host[2 * k:]
            torch._foreach_mul_(diff, alpha_list)
            torch._foreach_add_(ema, diff)                     # ema <- ema + alpha (p - ema) = (1 - alpha) ema + alpha p
            torch._foreach_copy_(g_prev, grad)                 # g_prev <- g

        alphas = [self.alpha_fallback] * len(fresh) + alpha_list
        n_fallback = len(fresh) + sum(fallback_list)
        self.last_alpha = dict(zip(fresh + seen, alphas))
        self.last_dist = dict(zip(seen, dist_list))
        self.step += 1
        return {
            "alpha_mean": sum(alphas) / len(alphas),
            "alpha_min": min(alphas),
            "alpha_max": max(alphas),
            "alpha_fallback_frac": n_fallback / len(alphas),
        }

    def end_stage(self, params: Params) -> None:
        """`ema_replace`: theta* becomes the model (in the params' dtype); ema / g_prev are released."""
        self._place(params)
        ema_replace(params, self.ema)
        self.ema, self.g_prev = {}, {}

    def _place(self, params: Params) -> None:
        if self._unplaced:                                  # state loaded from disk: onto the params' devices
            place_like(self.ema, params)
            place_like(self.g_prev, params)
            self._unplaced = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{n}": t for n, t in self.ema.items()}
        state.update({f"g_prev.{n}": t for n, t in self.g_prev.items()})
        state["step"] = torch.tensor(self.step, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts = split_state(state, ("ema", "g_prev"))
        if parts["ema"].keys() != parts["g_prev"].keys():
            raise ValueError("llaca state: 'ema.*' and 'g_prev.*' must name the same tensors")
        self.ema = {n: t.detach().to(torch.float32, copy=True) for n, t in parts["ema"].items()}
        self.g_prev = {n: t.detach().to(torch.float32, copy=True) for n, t in parts["g_prev"].items()}
        self.step = int(parts[""].get("step", torch.tensor(0)))
        self._unplaced = True                                     # moved to the params' devices on the next step

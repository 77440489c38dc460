"""One user's decoding step with half-precision weights on a CPU: ~1.8x the tokens/s of fp32, the same answers.

A decode step multiplies ONE row (the newest token) by every weight of the LM, so on a CPU its time is the time to
read the weights from memory: `small`'s 135M fp32 weights are 540 MB per token. `HalfDecodeLinear` keeps an fp16
copy of a frozen Linear's weight and multiplies single rows by it (the row cast to fp16, the product back to fp32,
fp32 everywhere else: norms, attention, residuals, sampling), which halves the bytes read. Prompts (prefill),
several users decoded together and training keep the fp32 weight: with more than one row the fp16 product is
2-3x *slower* on a CPU without native fp16 arithmetic. fp16 rather than bf16: 3 more mantissa bits for the same
speed; on 8 greedy answers of `small` fp16 changed none, bf16 one (experiments/half_decode.py,
bench_results/small/half_decode.txt).

The swap changes the class of the existing modules (no new parameters, nothing in the state dict, peft's LoRA
layers wrap them as any `nn.Linear`); the fp16 copy follows the fp32 weight if that is changed in place.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class HalfDecodeLinear(nn.Linear):
    """`nn.Linear` that multiplies a single fp32 row on CPU, outside autograd, by an fp16 copy of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[:-1].numel() != 1 or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_grad_enabled()):
            return super().forward(x)
        out = F.linear(x.half(), self.half_weight()).float()
        return out if self.bias is None else out + self.bias

    def half_weight(self) -> torch.Tensor:
        w = self.weight
        stamp = (id(w), w._version, w.data_ptr())  # replaced, or changed in place (load_state_dict, merge): recopy
        if getattr(self, "_half_stamp", None) != stamp:
            self._half = w.detach().to(torch.float16)
            self._half_stamp = stamp
        return self._half


def _decoder_linears(model) -> list[nn.Linear]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = inner.model.language_model if hasattr(inner.model, "language_model") else inner.model
    found = [m for m in lm.modules() if type(m) in (nn.Linear, HalfDecodeLinear)]
    head = inner.get_output_embeddings()
    return found + ([head] if type(head) in (nn.Linear, HalfDecodeLinear) else [])


# Below this many bytes of fp32 LM weights, they stay in the CPU's caches between tokens and the fp32 product is the
# faster one (the tiny base: 12 MB); `small`'s 540 MB come from memory every token. Above MAX_BYTES the copies (half
# as much again) would cost more memory than a CPU user of such a model can be assumed to have: 8-bit/4-bit loading
# is the way there.
MIN_BYTES, MAX_BYTES = 64 * 2**20, 4 * 2**30


def enable_half_decode(model, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES) -> int:
    """Give the LM's fp32 CPU Linears (and its head) an fp16 copy for single-row steps, if they hold between
    `min_bytes` and `max_bytes` together; returns how many Linears (0: left as they were).

    Quantized (bitsandbytes) layers, GPU weights and non-fp32 weights are left alone: there the fp32 read is not the
    cost. The copies are made here, so the first answer does not pay for them (~0.3 s and +270 MB for `small`).
    """
    linears = [m for m in _decoder_linears(model)
               if m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    size = sum(m.weight.numel() * 4 for m in {id(m.weight): m for m in linears}.values())
    if not min_bytes <= size <= max_bytes:
        return 0
    n = 0
    for m in linears:
        m.__class__ = HalfDecodeLinear
        m.half_weight()
        n += 1
    return n


def disable_half_decode(model) -> None:
    """Back to plain fp32 Linears (and drop the fp16 copies)."""
    for m in _decoder_linears(model):
        if type(m) is HalfDecodeLinear:
            m.__class__ = nn.Linear
            m.__dict__.pop("_half", None)
            m.__dict__.pop("_half_stamp", None)

"""Single-row decode steps on fp16 weight copies (llaca.serve.half_decode): only where it pays, never in training."""
from __future__ import annotations

import torch
from torch import nn

from llaca.serve.half_decode import HalfDecodeLinear, disable_half_decode, enable_half_decode


def _linear(rows_in=64, rows_out=48):
    torch.manual_seed(0)
    layer = nn.Linear(rows_in, rows_out)
    layer.__class__ = HalfDecodeLinear
    return layer


def test_one_row_uses_the_fp16_copy_more_rows_and_training_the_fp32_weight():
    layer = _linear()
    x = torch.randn(1, 1, 64)
    fp32 = nn.functional.linear(x, layer.weight, layer.bias)
    fp16 = nn.functional.linear(x.half(), layer.weight.half()).float() + layer.bias
    with torch.no_grad():
        one = layer(x)
        two = torch.cat([x, x], 1)
        many = layer(two)
    assert torch.equal(one, fp16) and not torch.equal(one, fp32)   # really the fp16 product ...
    assert torch.allclose(one, fp32, atol=1e-2)                    # ... and close to the fp32 one
    assert torch.equal(many, nn.functional.linear(two, layer.weight, layer.bias))  # two rows (prefill, a batch): fp32
    with torch.enable_grad():
        trained = layer(x)
    assert torch.equal(trained, fp32) and trained.requires_grad     # autograd: fp32, so training is untouched


def test_the_fp16_copy_follows_the_weight_when_it_changes_in_place():
    layer = _linear()
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)                     # e.g. load_state_dict or merging an adapter in place
        after = layer(x)
    assert torch.equal(after, nn.functional.linear(x.half(), layer.weight.half()).float() + layer.bias)
    assert not torch.equal(before, after)


def test_enable_swaps_the_lm_linears_only_when_their_weights_outgrow_the_caches(quick_home):
    from llaca.versions import Registry, load_version

    model, processor = load_version(Registry(quick_home), "base")
    keys = set(model.state_dict())
    assert enable_half_decode(model) == 0                      # the tiny base (12 MB) stays fp32: it is cache-bound
    assert enable_half_decode(model, min_bytes=0, max_bytes=2**20) == 0  # and so does a model too big to copy
    n = enable_half_decode(model, min_bytes=0)
    lm_linears = [m for m in model.model.language_model.modules() if isinstance(m, nn.Linear)]
    assert n == len(lm_linears) + 1 and all(type(m) is HalfDecodeLinear for m in lm_linears)  # + the LM head
    assert type(model.get_output_embeddings()) is HalfDecodeLinear
    assert not any(isinstance(m, HalfDecodeLinear) for m in model.model.vision_tower.modules())
    assert set(model.state_dict()) == keys                     # nothing new is saved with a version
    # generate: the prompt's decoder layers (many rows) run fp32; the LM head of its last position and every later
    # token (one row each) use the fp16 copies
    from PIL import Image

    from llaca.serve.chat import _prepare

    inputs = _prepare(processor, Image.new("RGB", (64, 64), (200, 40, 40)), [], "What colour is this?")

    def scores():
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
        return out.sequences, out.scores

    _, half = scores()
    disable_half_decode(model)
    assert not any(type(m) is HalfDecodeLinear for m in model.modules())
    _, full = scores()
    for step in (0, 1):
        assert not torch.equal(half[step], full[step])                    # the fp16 copies ran ...
        assert torch.allclose(half[step], full[step], atol=2e-2, rtol=0)  # ... the same logits to fp16 precision

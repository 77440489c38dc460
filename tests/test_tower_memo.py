"""The frozen front of `small`'s EfficientNet tower, computed once per image while a stage trains
(llaca.train.tower_memo), on a tiny FastVLM: the same features as the tower's own, the blocks that learn still
learning, nothing remembered where it would not be a function of the image, and the tower as it was afterwards."""
from __future__ import annotations

import torch

from llaca.train.tower_memo import memoized_frozen_tower
from llaca.train.tuner import keep_frozen_in_eval


def _tower(model):
    return model.model.vision_tower


def _learning_last_block(model):
    """The model as `small`'s stage sets it up: only the tower's last block (and the LM) learn; train mode with what
    does not learn in eval (the tuner's `keep_frozen_in_eval`)."""
    tower = _tower(model)
    tower.requires_grad_(False)
    tower.encoder.blocks[-1].requires_grad_(True)
    model.train()
    keep_frozen_in_eval(model)
    return model


def _features(model, pixels):
    return _tower(model)(pixels).last_hidden_state


def test_memo_gives_the_towers_own_features_and_computes_each_image_once(make_tiny_fastvlm):
    model = _learning_last_block(make_tiny_fastvlm())
    tower = _tower(model)
    a, b, c = torch.randn(3, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = {name: _features(model, x) for name, x in {"a": a, "b": b, "c": c}.items()}
    calls = []
    tower.encoder.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    with memoized_frozen_tower(model) as memo:
        assert memo is not None and len(memo.block_forwards) == len(tower.encoder.blocks) - 1
        first = _features(model, torch.cat([a, b]))
        assert (memo.hits, memo.misses, len(calls)) == (0, 2, 1)  # the frozen blocks ran once, for both images
        again = _features(model, torch.cat([b, c, a]))  # b and a remembered, c new
        assert (memo.hits, memo.misses) == (2, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: computed afresh, not the fp32 output
            half = _features(model, a)
        assert (memo.hits, memo.misses) == (2, 4) and half.dtype == torch.bfloat16
        # the same values (a batch of 2 or 3 may take another convolution kernel than a batch of 1: not bit-exact)
        torch.testing.assert_close(first, torch.cat([want["a"], want["b"]]), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(again, torch.cat([want["b"], want["c"], want["a"]]), rtol=1e-4, atol=1e-7)
        again.sum().backward()  # the last block still learns; the frozen blocks get no gradient
        assert all(p.grad is not None for p in tower.encoder.blocks[-1].parameters())
        assert all(p.grad is None for p in tower.encoder.blocks[0].parameters())
    assert not any("forward" in vars(m) for m in tower.modules())  # the modules' own forwards again
    calls.clear()
    with torch.no_grad():
        assert torch.equal(_features(model, a), want["a"]) and len(calls) == 1


def test_memo_stays_off_where_the_front_is_not_a_function_of_the_image(make_tiny_fastvlm):
    model = _learning_last_block(make_tiny_fastvlm())
    with memoized_frozen_tower(model, enabled=False) as memo:  # e.g. several processes, or jittered images
        assert memo is None
    model.train()  # without keep_frozen_in_eval the frozen blocks would run drop-connect: random per pass
    with memoized_frozen_tower(model) as memo:
        assert memo is None
    whole = make_tiny_fastvlm()
    whole.train()  # a tower that learns from its stem: nothing in front of it is frozen
    with memoized_frozen_tower(whole) as memo:
        assert memo is None


def test_memo_over_its_budget_computes_instead_of_remembering(make_tiny_fastvlm):
    model = _learning_last_block(make_tiny_fastvlm())
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _features(model, pixels)
        with memoized_frozen_tower(model, max_bytes=1) as memo:
            assert torch.equal(_features(model, pixels), want) and torch.equal(_features(model, pixels), want)
            assert (memo.hits, memo.misses, memo.bytes, len(memo.outputs)) == (0, 4, 0, 0)

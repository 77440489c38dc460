"""Image jitter in a stage: the picture keeps its content and size, is framed anew each step, the same on a resume."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from llaca.data.augment import jitter_framing
from llaca.train.tuner import StageConfig, StageRecipe
from llaca.versions import Registry


def red_square_on_white(size=(120, 96), box=(50, 38, 70, 58)) -> Image.Image:
    im = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(im).rectangle(box, fill=(255, 0, 0))
    return im


def red_centre(im: Image.Image) -> tuple[float, float, int]:
    a = np.asarray(im).astype(int)
    red = (a[..., 0] > 200) & (a[..., 1] < 80) & (a[..., 2] < 80)
    ys, xs = np.nonzero(red)
    return xs.mean(), ys.mean(), int(red.sum())


def test_jitter_keeps_size_and_content_and_moves_it_by_at_most_the_amount():
    im = red_square_on_white()
    x0, y0, n0 = red_centre(im)
    moved = 0
    for seed in range(20):
        out = jitter_framing(im, random.Random(seed), 0.15)
        assert out.size == im.size and out.mode == "RGB"
        x, y, n = red_centre(out)
        assert 0.6 * n0 < n < 1.5 * n0  # zoomed by at most 15%: the area by at most ~32%
        # A window up to 15% larger or smaller, placed anywhere that keeps it over the picture: the square's centre
        # moves by under 15% of the sides plus its zoom about the middle.
        assert abs(x - x0) < 0.2 * im.width and abs(y - y0) < 0.2 * im.height
        moved += abs(x - x0) > 1 or abs(y - y0) > 1
        corners = np.asarray(out)[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 255).all()  # a zoomed-out margin takes the background's colour, not black
    assert moved >= 10  # it does reframe (13 of these 20 move the square by more than a pixel)


def test_jitter_is_a_function_of_its_rng_and_off_at_zero():
    im = red_square_on_white()
    a = jitter_framing(im, random.Random("0:5:3"), 0.1)
    b = jitter_framing(im, random.Random("0:5:3"), 0.1)
    c = jitter_framing(im, random.Random("0:6:3"), 0.1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert jitter_framing(im, random.Random(0), 0.0) is im


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_jitter_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="image_jitter"):
        StageConfig(data="x", image_jitter=bad)
    if bad > 0:
        with pytest.raises(ValueError, match="between 0 and 1"):
            jitter_framing(red_square_on_white(), random.Random(0), bad)


def test_jitter_is_in_the_run_key_only_when_set():
    assert "image_jitter" not in StageConfig(data="x").hparams()
    assert StageConfig(data="x", image_jitter=0.15).hparams()["image_jitter"] == 0.15


def test_stage_frames_each_step_afresh_and_a_resume_sees_the_same_images(llaca_home, coin_dir):
    data = str(coin_dir / "vqav2" / "train")
    recipe = StageRecipe(StageConfig(data=data, max_steps=2, batch_size=4, evaluate_after=False,
                                     image_jitter=0.15), Registry())
    recipe.setup()
    plain = StageRecipe(StageConfig(data=data, max_steps=2, batch_size=4, evaluate_after=False), Registry())
    plain.setup()
    step0 = recipe._encode_record(0)["pixel_values"]
    assert torch.equal(step0, recipe._encode_record(0)["pixel_values"])  # the same step, record and seed
    assert not torch.equal(step0, plain._encode_record(0)["pixel_values"])  # jittered
    recipe.step = 1
    assert not torch.equal(step0, recipe._encode_record(0)["pixel_values"])  # a new framing on the next step
    recipe.step = 0
    assert torch.equal(step0, recipe._encode_record(0)["pixel_values"])  # a resumed stage sees the same image
    assert torch.equal(recipe._encode_record(0)["input_ids"], plain._encode_record(0)["input_ids"])  # text unchanged

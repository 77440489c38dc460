"""Scale-and-shift jitter of a training image: the same picture framed a little differently on every pass.

A stage that passes several times over a few hundred images learns their exact framing: `small`'s stage fits
100% of the Tux Paint drawings it trains on and answers ~78% of unseen ones. The frozen tower reads a 7x7 map at
stride 32, so an object moved by a few pixels lands on different tokens. Jittering the framing is the
label-preserving change that holds for every question the product trains on: no flips (text, digits and
left/right questions change under a mirror), no colour changes (colour questions), and the zoom keeps the whole
picture's content within a few percent of its sides (counts, positions).
"""
from __future__ import annotations

import random

from PIL import Image


def jitter_framing(image: Image.Image, rng: random.Random, amount: float) -> Image.Image:
    """`image` zoomed by a factor in [1 - amount, 1 + amount] and shifted to a random place that keeps the window
    over the picture (or the picture inside the window), at its own size. Zooming out fills the margin with the
    colour of the image's top-left pixel (usually the background of a drawing or a scan)."""
    if amount <= 0:
        return image
    if not 0 < amount < 1:
        raise ValueError(f"image jitter {amount}: must be between 0 and 1 (a fraction of the image's sides)")
    w, h = image.size
    side = rng.uniform(1.0 - amount, 1.0 + amount)  # the window's sides, as a fraction of the image's
    cw, ch = w * side, h * side
    x0 = rng.uniform(min(0.0, w - cw), max(0.0, w - cw))
    y0 = rng.uniform(min(0.0, h - ch), max(0.0, h - ch))
    fill = image.getpixel((0, 0))
    return image.transform((w, h), Image.Transform.EXTENT, (x0, y0, x0 + cw, y0 + ch),
                           resample=Image.Resampling.BICUBIC, fillcolor=fill)

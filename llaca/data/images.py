"""Every common image mode to the RGB the vision tower takes, without silently changing what the image shows.

`Image.convert("RGB")` alone gets several real-world files wrong: a JPEG from a phone is stored sideways with
an EXIF orientation tag (the picture must be rotated as a viewer would), a transparent PNG turns its
transparent pixels to whatever colour hides under them (usually black), and a 16-bit grayscale PNG
(microscopy, X-rays, depth maps) is clipped to 255, so nearly every pixel becomes white. Here each case is
handled the way an image viewer shows it: orientation applied, transparency over white, 16-bit values scaled
to 8 bits. CMYK (print JPEGs) goes through Pillow's conversion, which inverts Adobe's CMYK JPEGs on decode;
for animated GIF / WebP the first frame is what `Image.open` yields.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # what transparent pixels are shown over


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit 'L', scaled (65535 -> 255), never clipped."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        full = 65535.0
    elif im.mode == "F":
        full = float(a.max()) if a.size and a.max() > 1.0 else 1.0
    else:  # 'I' (32-bit): a 16-bit PNG read as 'I', or real 32-bit data
        full = 65535.0 if a.size and a.max() > 255 else 255.0
        if a.size and a.max() > 65535:
            full = float(a.max())
    scaled = np.clip(np.asarray(a, dtype=np.float64) * (255.0 / full), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """The RGB picture a viewer would show for `im` (EXIF rotation, transparency over white, 16-bit scaled)."""
    im = ImageOps.exif_transpose(im)  # a copy with the orientation tag applied (no-op without one)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _scale_to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")

"""Real images for base v2, derived once from Debian packages and shipped as a small pack in `assets/imagepack`.

The vision tower of base v1 saw only procedural shapes, so a user's first real photo or drawing was new to it
(a 10-class set of scanned drawings reached 19% after a stage). Debian carries thousands of categorised real
images offline: `openclipart-png` (~8,000 drawings in ~60 categories) and `fonts-noto-color-emoji` (~1,200
emoji with Unicode names). `derive()` reads them, fits each into 64x64 RGBA and writes sprite sheets
(`sheet<k>.png`, 32x32 sprites of 64 px each) plus `index.json` (label, group, source per sprite). The base build
reads only the pack, so a build is reproducible without the packages, and nothing is fetched at run time.

Held out on purpose (never in the pack, used to test that the tower generalises): `tuxpaint-stamps-default` and
scikit-learn's scanned handwritten digits (`llaca.data.heldout`).
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..paths import ASSETS_DIR, atomic_dir

PACK_DIR = ASSETS_DIR / "imagepack"
OPENCLIPART = Path("/usr/share/openclipart/png")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SPRITE = 64
GRID = 32  # sprites per sheet side
MAX_PER_LABEL = 120  # keeps 'computer/icons' and 'shapes' from dominating
SKIP = {"unsorted", "special", "buttons", "logos", "computer/diagrams", "computer/connectors"}

# Readable names for the LM; the vision heads use the label index.
EMOJI_GROUPS = [  # (first, last, group) codepoint ranges of the emoji font
    (0x1F300, 0x1F32F, "sky and weather"), (0x1F330, 0x1F344, "plant"), (0x1F345, 0x1F37F, "food"),
    (0x1F380, 0x1F3FF, "object"), (0x1F400, 0x1F43F, "animal"), (0x1F440, 0x1F4FF, "object"),
    (0x1F500, 0x1F5FF, "symbol"), (0x1F600, 0x1F64F, "face"), (0x1F680, 0x1F6FF, "vehicle"),
    (0x1F900, 0x1F94F, "person"), (0x1F950, 0x1F97F, "food"), (0x1F980, 0x1F9AF, "animal"),
    (0x1F9B0, 0x1F9FF, "object"), (0x1FA70, 0x1FAFF, "object"),
]


@dataclass(frozen=True)
class Sprite:
    label: str    # fine label: emoji name or clip-art category path ("animals/birds")
    group: str    # coarse, readable group ("animal", "food", "vehicle", ...)
    source: str   # "openclipart" | "emoji"


def _fit(img: Image.Image) -> Image.Image:
    """Any PIL image -> 64x64 RGBA, aspect kept, centred on transparent."""
    img = img.convert("RGBA")
    bbox = img.getbbox()
    if bbox:
        img = img.crop(bbox)
    img.thumbnail((SPRITE - 4, SPRITE - 4), Image.LANCZOS)
    out = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    out.paste(img, ((SPRITE - img.width) // 2, (SPRITE - img.height) // 2))
    return out


def _clipart_group(label: str) -> str:
    top, _, sub = label.partition("/")
    named = {"animals": "animal", "food": "food", "plants": "plant", "transportation": "vehicle",
             "people": "person", "buildings": "building", "tools": "tool", "electronics": "machine",
             "computer": "machine", "office": "object", "signs_and_symbols": "symbol", "shapes": "symbol",
             "recreation": "object", "education": "object", "science": "object", "geography": "map",
             "containers": "object", "decorations": "object"}
    return named.get(top, "object")


def _openclipart() -> list[tuple[Image.Image, Sprite]]:
    files = sorted(OPENCLIPART.rglob("*.png"))
    by_label: dict[str, list[Path]] = {}
    for f in files:
        parts = f.relative_to(OPENCLIPART).parts[:-1]
        label = "/".join(parts[:2])
        if not parts or parts[0] in SKIP or label in SKIP:
            continue
        by_label.setdefault(label, []).append(f)
    out = []
    for label, paths in sorted(by_label.items()):
        if len(paths) < 8:
            continue
        for f in paths[:MAX_PER_LABEL]:
            try:
                with Image.open(f) as im:
                    im.draft("RGBA", (256, 256))
                    sprite = _fit(im)
            except (OSError, Image.DecompressionBombError):  # broken or absurdly large files are skipped
                continue
            if sprite.getbbox():
                out.append((sprite, Sprite(label, _clipart_group(label), "openclipart")))
    return out


def _emoji() -> list[tuple[Image.Image, Sprite]]:
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the only size this bitmap font has
    out = []
    for first, last, group in EMOJI_GROUPS:
        for cp in range(first, last + 1):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if not name or not font.getmask(ch).getbbox():
                continue
            canvas = Image.new("RGBA", (140, 130), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), ch, font=font, embedded_color=True)
            if canvas.getbbox():
                out.append((_fit(canvas), Sprite(name.lower(), group, "emoji")))
    return out


def derive(out_dir: Path = PACK_DIR) -> Path:
    """Read the Debian packages and write the pack (sheets + index.json), atomically."""
    missing = [str(p) for p in (OPENCLIPART, EMOJI_FONT) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {missing}: run `apt-get install openclipart-png fonts-noto-color-emoji`")
    items = _openclipart() + _emoji()
    per_sheet = GRID * GRID
    with atomic_dir(out_dir) as tmp:
        for k in range(0, len(items), per_sheet):
            sheet = Image.new("RGBA", (GRID * SPRITE, GRID * SPRITE), (0, 0, 0, 0))
            for j, (img, _) in enumerate(items[k:k + per_sheet]):
                sheet.paste(img, ((j % GRID) * SPRITE, (j // GRID) * SPRITE))
            sheet.save(tmp / f"sheet{k // per_sheet}.png", optimize=True)
        index = [{"label": s.label, "group": s.group, "source": s.source} for _, s in items]
        (tmp / "index.json").write_text(json.dumps({"sprite": SPRITE, "grid": GRID, "sprites": index}) + "\n")
    return out_dir


@lru_cache(maxsize=2)
def load(pack_dir: Path = PACK_DIR) -> tuple[np.ndarray, list[Sprite]]:
    """(N x 64 x 64 x 4 uint8 RGBA array, sprites) of the shipped pack."""
    meta = json.loads((pack_dir / "index.json").read_text())
    sprites = [Sprite(**s) for s in meta["sprites"]]
    per_sheet = meta["grid"] ** 2
    arrays = []
    for k in range((len(sprites) + per_sheet - 1) // per_sheet):
        sheet = np.asarray(Image.open(pack_dir / f"sheet{k}.png").convert("RGBA"))
        n = min(per_sheet, len(sprites) - k * per_sheet)
        g, s = meta["grid"], meta["sprite"]
        tiles = sheet.reshape(g, s, g, s, 4).transpose(0, 2, 1, 3, 4).reshape(g * g, s, s, 4)
        arrays.append(tiles[:n])
    return np.concatenate(arrays), sprites


if __name__ == "__main__":
    d = derive()
    arr, sp = load(d)
    print(d, arr.shape, len({s.label for s in sp}), "labels")

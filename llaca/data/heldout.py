"""Held-out real-image recognition sets: does a stage learn images of a kind the base never saw?

Built from sources that base v2's pre-training does *not* use (`llaca.data.image_pack` reads openclipart and emoji):

- `tuxpaint`: Tux Paint's stamp drawings (Debian `tuxpaint-stamps-default`), 10 classes by the package's own
  folders (animal, food, plant, town, holiday, vehicle, household, letter, space, clothing), each drawing pasted
  once on a plain background at a random size and place, split by drawing (a test drawing is never trained on).
- `digits`: scikit-learn's scanned handwritten digits (UCI, 1,797 images of 8x8, 16 grey levels), upscaled to
  64 px, dark ink on white, 10 classes.

Each is written as `<out>/<name>/{train,test}` in LLaVA conversation format, so `python -m llaca learn
<out>/<name>/train` is exactly what a user would run.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .coin_mini import write_split

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_CLASSES = {  # class name -> stamp folders (prefixes)
    "animal": ["animals"], "food": ["food"], "plant": ["plants"], "town": ["town"], "holiday": ["seasonal"],
    "vehicle": ["vehicles"], "household": ["household"], "letter": ["symbols/alphabets"], "space": ["space"],
    "clothing": ["clothes"],
}
TUXPAINT_Q = "What is in this drawing? Answer with the category name."
DIGITS_Q = "Which digit is written here? Answer with the digit."
SIZE = 64


def _paste(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.convert("RGBA")
    if img.getbbox():
        img = img.crop(img.getbbox())
    side = rng.randint(36, 60)
    img.thumbnail((side, side), Image.LANCZOS)
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    canvas = Image.new("RGBA", (SIZE, SIZE), bg + (255,))
    x, y = rng.randint(0, SIZE - img.width), rng.randint(0, SIZE - img.height)
    canvas.paste(img, (x, y), img)
    return canvas.convert("RGB")


def tuxpaint_records(seed: int = 0) -> tuple[list, list]:
    if not TUXPAINT.is_dir():
        raise FileNotFoundError(f"{TUXPAINT} missing: apt-get install tuxpaint-stamps-default")
    rng = random.Random(seed)
    train, test = [], []
    for name, prefixes in TUXPAINT_CLASSES.items():
        files = sorted(f for p in prefixes for f in (TUXPAINT / p).rglob("*.png"))
        rng.shuffle(files)
        cut = max(1, round(len(files) * 0.75))
        for split, chunk in ((train, files[:cut]), (test, files[cut:])):
            for f in chunk:
                with Image.open(f) as im:
                    split.append((_paste(im, rng), TUXPAINT_Q, name))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def digits_records(seed: int = 0, n_train: int = 1400) -> tuple[list, list]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: offline

    d = load_digits()
    order = list(range(len(d.target)))
    random.Random(seed).shuffle(order)
    records = []
    for i in order:
        ink = (d.images[i] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(255 - ink).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        records.append((img, DIGITS_Q, str(int(d.target[i]))))
    return records[:n_train], records[n_train:]


SETS = {"tuxpaint": tuxpaint_records, "digits": digits_records}


def write_sets(out_root, names=tuple(SETS), seed: int = 0) -> list[Path]:
    out = []
    for name in names:
        train, test = SETS[name](seed)
        write_split(Path(out_root) / name / "train", train, f"{name}-train")
        write_split(Path(out_root) / name / "test", test, f"{name}-test")
        out.append(Path(out_root) / name)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the held-out real-image recognition sets.")
    p.add_argument("out_root")
    p.add_argument("--sets", nargs="*", default=list(SETS))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for d in write_sets(a.out_root, a.sets, a.seed):
        print(d, len(list((d / "train" / "images").iterdir())), len(list((d / "test" / "images").iterdir())))


if __name__ == "__main__":
    main()

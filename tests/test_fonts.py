"""The world renders text from the project's own font files only, byte-identical to what base v2 was measured with.

Issue 28: the fonts used to be read from /usr/share/fonts with a silent fallback to PIL's default font, so a machine
without fonts-freefont-ttf regenerated another base test split (and replay split) with no message.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFont

from llaca.data import world as bw
from llaca.paths import ASSETS_DIR

# sha256 over the pixels of one "apple" scene per face (FONTS order), as rendered from the shipped files with the
# pinned pillow. A change here changes every text image the world makes, hence base v2's test split fingerprint.
TEXT_SCENES_SHA256 = "cafee16c9c3ae498a7770413337c62521b21b5c0bdc9c9d6348c06c5b41472d7"


def _text_scenes() -> list[bw.Scene]:
    return [bw.Scene("text", "plain", text="apple", font=f, seed=i) for i, f in enumerate(bw.FONTS)]


def test_every_font_is_a_shipped_file_with_its_recorded_bytes_and_licence():
    fonts_dir = (ASSETS_DIR / "fonts").resolve()
    assert bw.FONT_DIR.resolve() == fonts_dir
    assert len(bw.FONTS) == len(set(bw.FONTS)) == 16
    sums = dict(reversed(line.split()) for line in (fonts_dir / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(f"{name}.ttf" for name in bw.FONT_NAMES)
    for path in bw.FONTS:
        p = Path(path).resolve()
        assert p.is_relative_to(fonts_dir), path
        assert p.is_file() and not Path(path).is_symlink(), path
        assert hashlib.sha256(p.read_bytes()).hexdigest() == sums[p.relative_to(fonts_dir).as_posix()], path
    for family in {Path(n).parent for n in bw.FONT_NAMES}:
        assert (fonts_dir / family / "COPYRIGHT").stat().st_size > 1000, family
    assert (fonts_dir / "freefont" / "GPL-3").is_file() and (fonts_dir / "liberation" / "GPL-2").is_file()


def test_text_renders_from_the_project_files_with_system_fonts_hidden(monkeypatch):
    """Any font read from outside assets/fonts fails here, as on a machine that has none of Debian's fonts."""
    fonts_dir = str((ASSETS_DIR / "fonts").resolve()) + os.sep
    opened: list[str] = []
    truetype, isfile = ImageFont.truetype, os.path.isfile

    def only_shipped_truetype(font, size=10, *args, **kwargs):
        path = os.path.realpath(font)
        if not path.startswith(fonts_dir):
            raise OSError(f"test: {font} is not a shipped font")
        opened.append(path)
        return truetype(font, size, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", only_shipped_truetype)
    monkeypatch.setattr(ImageFont, "load_default", lambda *a, **k: pytest.fail("PIL's default font was used"))
    monkeypatch.setattr(os.path, "isfile", lambda p: False if str(p).startswith("/usr/share/") else isfile(p))
    bw._font.cache_clear()
    try:
        images = [np.asarray(bw.render(s)) for s in _text_scenes()]
        rng = random.Random(5)  # and the world's own sampler, through every kind of question
        for _ in range(200):
            bw.sample(rng)
    finally:
        bw._font.cache_clear()
    assert {os.path.realpath(f) for f in bw.FONTS} <= set(opened)
    digest = hashlib.sha256(b"".join(im.tobytes() for im in images)).hexdigest()
    assert digest == TEXT_SCENES_SHA256
    assert len({im.tobytes() for im in images}) == len(images), "every face draws the word differently"


def test_a_missing_font_is_an_error_that_names_it(tmp_path):
    gone = str(tmp_path / "dejavu" / "DejaVuSans.ttf")
    with pytest.raises(bw.FontMissing, match="DejaVuSans.ttf"):
        bw.render(bw.Scene("text", "plain", text="apple", font=gone, seed=0))
    with pytest.raises(FileNotFoundError):  # FontMissing is one: callers that handle missing inputs see it
        bw._font(gone, 20)


def test_the_held_out_drawing_set_names_its_debian_package_when_missing(monkeypatch, tmp_path):
    """Tux Paint's stamps are a benchmark input, not world data: optional, but never silently empty."""
    from llaca.data import heldout

    monkeypatch.setattr(heldout, "TUXPAINT", tmp_path / "no-stamps")
    with pytest.raises(FileNotFoundError, match="tuxpaint-stamps-default"):
        heldout.tuxpaint_records(0)

"""A record's image value -> a file the tuner can open, or what is wrong with it.

Values come as a relative path (every text format), a Hugging Face `Image` cell `{"bytes", "path"}`, raw
bytes (a binary Parquet column), or a list of one of these (`images: [...]`). Paths are checked like the LLaVA
path always was (inside the set, exists, decodable under the pixel and size guards). Embedded bytes get the
same guards, then are written once per distinct content into `$LLACA_HOME/uploads/<set hash>-images/`, so the
tuner, the evaluation and the replay buffer keep reading plain files. They are written to a temporary folder
and renamed only when the whole set validated: a refused set leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
from pathlib import Path

from PIL import Image

from ...paths import llaca_home

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}
MISSING = "missing (every record needs an image path relative to the set)"


class ImageResolver:
    def __init__(self, source, limits, check_images: bool = True):
        self.source = source
        self.limits = limits
        self.check_images = check_images
        self._paths: dict[str, tuple[Path | None, str | None]] = {}  # each distinct path is checked once
        self._embedded: dict[str, tuple[Path | None, str | None]] = {}  # by content hash
        self._store: Path | None = None
        self._tmp: Path | None = None
        self.embedded = 0  # distinct embedded images seen

    def __call__(self, value) -> tuple[Path | None, str | None]:
        if isinstance(value, (list, tuple)):
            if len(value) > 1:
                return None, (f"{len(value)} images in one record; the model takes one image per record "
                              "(keep one, or make one record per image)")
            value = value[0] if value else None
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, MISSING
        if isinstance(value, str):
            if value not in self._paths:
                from ..checks import _image_file_problem

                self._paths[value] = _image_file_problem(value, self.source.root, self.limits, self.check_images)
            return self._paths[value]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._from_bytes(bytes(value))
        return None, f"must be an image path or image bytes, not {type(value).__name__}"

    # ------------------------------------------------------------------------------------- embedded

    def _from_bytes(self, blob: bytes) -> tuple[Path | None, str | None]:
        from ..checks import _check_image

        key = hashlib.sha256(blob).hexdigest()[:32]
        if key in self._embedded:
            return self._embedded[key]
        message = _check_image(blob, self.limits)
        if message:
            result = (None, f"embedded image ({len(blob)} bytes): {message}")
        else:
            with Image.open(io.BytesIO(blob)) as im:
                suffix = EXTENSIONS.get(im.format or "", f".{(im.format or 'img').lower()}")
            relative = Path("images") / f"{key}{suffix}"
            store = self._store_dir()
            if not (store / relative).is_file():
                if self._tmp is None:
                    self._tmp = store.with_name(f"{store.name}.tmp-{uuid.uuid4().hex[:8]}")
                    (self._tmp / "images").mkdir(parents=True)
                (self._tmp / relative).write_bytes(blob)
            result = (store / relative, None)
            self.embedded += 1
        self._embedded[key] = result
        return result

    def _store_dir(self) -> Path:
        if self._store is None:
            h = hashlib.sha256()
            for f in sorted(self.source.files):
                for path in sorted(f.rglob("*")) if f.is_dir() else [f]:
                    if path.is_file():
                        h.update(path.name.encode())
                        with open(path, "rb") as fh:
                            for chunk in iter(lambda: fh.read(2**20), b""):
                                h.update(chunk)
            self._store = llaca_home() / "uploads" / f"{h.hexdigest()[:16]}-images"
        return self._store

    def readable_path(self, path: Path) -> Path:
        """Where an image can be read now: an embedded one sits in the temporary folder until `finish`."""
        if self._tmp is not None and self._store is not None and path.is_relative_to(self._store):
            local = self._tmp / path.relative_to(self._store)
            if local.is_file():
                return local
        return path

    def finish(self, ok: bool) -> None:
        """Publish the written images if the set validated, else remove them (nothing left on error)."""
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            return
        if ok and self._store is not None:
            if not self._store.exists():
                try:
                    os.replace(tmp, self._store)
                    return
                except OSError:  # another validation of the same set published it first
                    pass
            else:  # a complete store exists (published by an earlier validation): add what it lacks
                for f in (tmp / "images").iterdir():
                    target = self._store / "images" / f.name
                    if not target.exists():
                        os.replace(f, target)
        shutil.rmtree(tmp, ignore_errors=True)

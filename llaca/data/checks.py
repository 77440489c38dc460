"""Safety checks on what an upload holds: zip members, image files, pixel counts (used by the loader and the formats)."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import zipfile
from pathlib import Path

from PIL import Image

from ..paths import llaca_home
from .images import to_rgb
from .records import InvalidDataset, Limits, Problem


def _safe_extract_zip(zip_path: Path, limits: Limits) -> Path:
    """Extract an uploaded zip into `$LLACA_HOME/uploads/<sha>`, refusing traversal, links and bombs."""
    digest = _sha256_file(zip_path)
    dest = llaca_home() / "uploads" / digest[:16]
    if dest.exists():
        return dest
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidDataset([Problem(zip_path.name, f"not a readable zip file ({e})")]) from None
    with zf:
        members = zf.infolist()
        if len(members) > limits.max_zip_members:
            raise InvalidDataset([Problem(zip_path.name, f"{len(members)} entries, over the limit of {limits.max_zip_members}")])
        total = 0
        for m in members:
            name = m.filename
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidDataset([Problem(zip_path.name, f"entry {name!r} is a symbolic link; links are not allowed")])
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise InvalidDataset([Problem(zip_path.name, f"entry {name!r} points outside the archive")])
            total += m.file_size
            if total > limits.max_zip_bytes:
                raise InvalidDataset([Problem(zip_path.name, f"expands to over {limits.max_zip_bytes} bytes (zip bomb guard)")])
            if m.compress_size and m.file_size / m.compress_size > limits.max_zip_ratio and m.file_size > 2**20:
                raise InvalidDataset([Problem(zip_path.name, f"entry {name!r} expands {m.file_size / m.compress_size:.0f}x (zip bomb guard)")])
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for m in members:
                target = (tmp / m.filename).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise InvalidDataset([Problem(zip_path.name, f"entry {m.filename!r} points outside the archive")])
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    written = shutil.copyfileobj(src, dst, 2**20)  # noqa: F841 (sizes were checked above)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _too_many_pixels(im: Image.Image, limits: Limits) -> str | None:
    """The decompression-bomb guard, read from the header before anything is decoded."""
    w, h = im.size
    if w * h > limits.max_image_pixels:
        return f"image is {w}x{h} pixels, over the limit of {limits.max_image_pixels} (decompression-bomb guard)"
    return None


def _check_image(path: Path | bytes, limits: Limits) -> str | None:
    """Return a message if the file (or bytes embedded in a table) is not a loadable, reasonably sized image."""
    if isinstance(path, bytes):
        size, open_image = len(path), lambda: Image.open(io.BytesIO(path))
    else:
        try:
            size = path.stat().st_size
        except OSError as e:
            return f"cannot read image ({e.strerror})"
        open_image = lambda: Image.open(path)  # noqa: E731
    if size > limits.max_image_bytes:
        return f"image {'file ' if not isinstance(path, bytes) else ''}is {size} bytes, over the limit of {limits.max_image_bytes}"
    try:
        with open_image() as im:
            if message := _too_many_pixels(im, limits):
                return message
            im.verify()
        with open_image() as im:
            im.load()
    except Image.DecompressionBombError:
        return "image is too large (decompression-bomb guard)"
    except Image.UnidentifiedImageError as e:
        return "not a readable image (no known image format)" if isinstance(path, bytes) else \
            f"not a readable image ({type(e).__name__}: {e})"
    except Exception as e:  # PIL raises many types for broken files
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def _image_file_problem(image: str, root: Path, limits: Limits, check_images: bool) -> tuple[Path | None, str | None]:
    """(the image's path if it is inside the set and exists, what is wrong with it or None)."""
    if os.path.isabs(image) or image.startswith(("/", "\\")) or ":" in Path(image).parts[0]:
        return None, f"absolute path {image!r}; use a path relative to the set"
    candidate = root / image
    try:
        resolved = candidate.resolve()
    except OSError:
        resolved = candidate
    if ".." in Path(image).parts or not resolved.is_relative_to(root.resolve()):
        return None, f"path {image!r} escapes the instruction set"
    if not candidate.is_file():
        return None, f"file {image!r} not found"
    message = _check_image(candidate, limits) if check_images else None
    return candidate, (f"{image!r}: {message}" if message else None)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image(path: str | os.PathLike, limits: Limits = Limits()) -> Image.Image:
    """An RGB image from a file (a chat upload, a record); a clear ValueError for anything else or too big."""
    name = Path(path).name
    try:
        with Image.open(path) as im:
            if message := _too_many_pixels(im, limits):
                raise ValueError(f"{name}: {message}")
            return to_rgb(im)  # EXIF rotation, transparency over white, 16-bit scaled (llaca.data.images)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None

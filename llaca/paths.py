"""Where things live, and atomic writes (temp + rename), so a crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
ASSETS_DIR = REPO_DIR / "assets"


def llaca_home() -> Path:
    """`$LLACA_HOME`, default `~/.llaca`: the version registry, jobs and caches."""
    return Path(os.environ.get("LLACA_HOME", Path.home() / ".llaca")).expanduser()


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temp dir beside `final`; on success rename it into place (replacing an old one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_error(e):  # name the final target (not a temp dir) and the reason, once
            reason = e.reason if isinstance(e, WriteError) else _io_reason(e)
            raise WriteError(f"cannot write {final}: {reason}; nothing was changed there", reason) from e
        raise


class WriteError(OSError):
    """A write under $LLACA_HOME failed (disk full, read-only, ...); the target was left as it was."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _is_io_error(e: BaseException) -> bool:
    from safetensors import SafetensorError  # safetensors' Rust writer reports I/O failures as this

    return isinstance(e, (OSError, SafetensorError))


def _io_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).replace("Error while serializing: ", "")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False))


@contextlib.contextmanager
def sqlite_connection(path: Path):
    """One autocommit SQLite connection with row access, closed after use (jobs.db, votes.db under $LLACA_HOME)."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def write_once(target: Path, data: bytes) -> Path:
    """Write content-addressed bytes (an image copied under its hash) unless already there, atomically."""
    target = Path(target)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target

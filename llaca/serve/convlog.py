"""Conversation logging like LLaVA's serve (`{date}-conv.json` lines + images saved by hash), but opt-in.

LLaVA's gradio server logs every conversation by default; here nothing is written until the one switch
(`ConversationLog.set_enabled(True)`, the Chat tab's checkbox) is on, and `delete_all()` removes every log
and image.

    $LLACA_HOME/conversation_log.json           {"enabled": false}  (absent = off)
    $LLACA_HOME/conv_logs/<YYYY-MM-DD>-conv.json  one JSON object per line: tstamp, type, model, session, image,
                                                messages [{role, content}]
    $LLACA_HOME/conv_logs/images/<sha256>.png   each image once
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from pathlib import Path

from ..paths import atomic_write_json, llaca_home, write_once


class ConversationLog:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else llaca_home()
        self.settings = self.home / "conversation_log.json"
        self.dir = self.home / "conv_logs"

    @property
    def enabled(self) -> bool:
        try:
            return bool(json.loads(self.settings.read_text(encoding="utf-8")).get("enabled", False))
        except (OSError, json.JSONDecodeError, AttributeError):
            return False  # absent or unreadable: off (never log by accident)

    def set_enabled(self, on: bool) -> None:
        atomic_write_json(self.settings, {"enabled": bool(on)})

    def log(self, *, model: str | None, messages: list[dict], image: str | Path | None = None,
            session: str | None = None) -> Path | None:
        """Append one conversation (only when enabled); returns the log file written, or None."""
        if not self.enabled:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        image_rel = None
        if image and Path(image).is_file():
            data = Path(image).read_bytes()
            image_rel = f"images/{hashlib.sha256(data).hexdigest()}{Path(image).suffix.lower() or '.png'}"
            write_once(self.dir / image_rel, data)
        record = {"tstamp": round(time.time(), 4), "type": "chat", "model": model, "session": session,
                  "image": image_rel, "messages": messages}
        path = self.dir / f"{time.strftime('%Y-%m-%d', time.gmtime())}-conv.json"
        with open(path, "a", encoding="utf-8") as f:  # one write of a whole line, under a lock
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            fcntl.flock(f, fcntl.LOCK_UN)
        return path

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*-conv.json")) if self.dir.is_dir() else []

    def count(self) -> int:
        n = 0
        for path in self.files():
            with contextlib.suppress(OSError):
                n += sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        return n

    def delete_all(self) -> int:
        """Remove every logged conversation and image; returns how many conversations there were."""
        n = self.count()
        shutil.rmtree(self.dir, ignore_errors=True)
        return n

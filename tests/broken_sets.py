"""The corpus of broken instruction sets: every way an upload can be wrong that the validator must name.

Each case writes its files into a folder and returns what a user would upload (a flat list of files,
as a browser sends them) plus the fragments the error must contain: which file, record and field, and
what is wrong. Binary cases (zips, images) are built here rather than committed so the corpus stays
readable and the bombs stay small on disk.
"""
from __future__ import annotations

import io
import json
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

GOOD_Q = "<image>\nWhat color is the circle?"


def conv(q: str = GOOD_Q, a: str = "red") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def record(i, image="a.png", conversations=None) -> dict:
    return {"id": str(i), "image": image, "conversations": conversations if conversations is not None else conv()}


def png(path: Path, size=(64, 64), mode="RGB") -> Path:
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 0).save(path)
    return path


def json_set(folder: Path, rows, name: str = "data.json", images=("a.png",)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / name
    data.write_text(json.dumps(rows) if name.endswith(".json") else "\n".join(json.dumps(r) for r in rows))
    return [data] + [png(folder / im) for im in images]


def zip_of(folder: Path, entries: dict[str, bytes], links: dict[str, str] = {}) -> list[Path]:
    """A zip holding `entries` (name -> bytes) and symbolic links (name -> target)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "upload.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return [path]


def png_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], list[Path]]
    expect: tuple[str, ...]  # every fragment must appear in the error


def _malformed_json(d):
    files = json_set(d, [record(1)])
    files[0].write_text('[\n  {"id": "1", "image": "a.png",\n   "conversations": [}\n]')
    return files


def _malformed_jsonl(d):
    files = json_set(d, [record(1), record(2)], name="data.jsonl")
    files[0].write_text(json.dumps(record(1)) + "\n{\"id\": \"2\", \n" + json.dumps(record(3)) + "\n")
    return files


def _truncated_png(d):
    files = json_set(d, [record(1)])
    raw = (d / "a.png").read_bytes()
    (d / "a.png").write_bytes(raw[: len(raw) // 2])
    return files


def _text_as_png(d):
    files = json_set(d, [record(1)])
    (d / "a.png").write_text("this is not an image")
    return files


def _huge_png(d):
    files = json_set(d, [record(1)], images=())
    png(d / "a.png", size=(4200, 4200), mode="L")  # 17.6 Mpx > 16.8 Mpx cap; ~20 kB on disk
    return files + [d / "a.png"]


def _non_utf8(d):
    files = json_set(d, [record(1)])
    files[0].write_bytes(json.dumps([record(1, conversations=conv(a="XX"))]).encode().replace(b"XX", b"caf\xe9"))
    return files


def _zip_traversal(d):
    return zip_of(d, {"set/data.json": json.dumps([record(1)]).encode(), "set/a.png": png_bytes(),
                      "../../outside.txt": b"pwned"})


def _zip_bomb(d):
    return zip_of(d, {"set/data.json": json.dumps([record(1)]).encode(), "set/a.png": png_bytes(),
                      "set/padding.bin": bytes(8 * 2**20)})  # 8 MiB of zeros -> ~8 kB: ratio ~1000x


def _zip_symlink(d):
    return zip_of(d, {"set/data.json": json.dumps([record(1)]).encode()}, links={"set/a.png": "/etc/passwd"})


def _not_a_zip(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "upload.zip").write_bytes(b"PK\x03\x04 but then garbage")
    return [d / "upload.zip"]


CASES: list[Case] = [
    Case("malformed-json", _malformed_json, ("data.json", "line 3", "malformed JSON")),
    Case("malformed-jsonl", _malformed_jsonl, ("data.jsonl", "line 2", "malformed JSON")),
    Case("top-level-object", lambda d: json_set(d, {"id": "1"}), ("data.json", "top level must be a list")),
    Case("record-not-object", lambda d: json_set(d, [record(1), "just a string"]),
         ("record 1", "must be an object")),
    Case("missing-id", lambda d: json_set(d, [{"image": "a.png", "conversations": conv()}]),
         ("record 0", "field 'id'", "missing")),
    Case("missing-conversations", lambda d: json_set(d, [{"id": "1", "image": "a.png"}]),
         ("record 0 (id '1')", "field 'conversations'", "missing or empty")),
    Case("empty-conversations", lambda d: json_set(d, [record(1, conversations=[])]),
         ("record 0 (id '1')", "field 'conversations'", "missing or empty")),
    Case("assistant-turn-missing", lambda d: json_set(d, [record(1, conversations=conv()[:1])]),
         ("record 0 (id '1')", "conversations[0]", "no assistant answer")),
    Case("two-human-turns", lambda d: json_set(d, [record(1, conversations=[conv()[0], conv()[0], conv()[1]])]),
         ("record 0 (id '1')", "conversations[1].from", "assistant turn missing")),
    Case("empty-answer", lambda d: json_set(d, [record(1, conversations=conv(a="  "))]),
         ("record 0 (id '1')", "conversations[1].value", "missing or empty")),
    Case("unknown-role", lambda d: json_set(d, [record(1, conversations=[conv()[0], {"from": "bot", "value": "x"}])]),
         ("record 0 (id '1')", "conversations[1].from", "unknown role")),
    Case("image-token-without-image", lambda d: json_set(d, [{"id": "1", "conversations": conv()}]),
         ("record 0 (id '1')", "field 'image'", "missing")),
    Case("image-without-token", lambda d: json_set(d, [record(1, conversations=conv(q="What color?"))]),
         ("record 0 (id '1')", "conversations[0].value", "no <image> token")),
    Case("two-image-tokens", lambda d: json_set(d, [record(1, conversations=conv(q="<image><image>\nq"))]),
         ("record 0 (id '1')", "2 <image> tokens")),
    Case("image-file-missing", lambda d: json_set(d, [record(1, image="images/nope.png")]),
         ("record 0 (id '1')", "field 'image'", "'images/nope.png' not found")),
    Case("image-path-absolute", lambda d: json_set(d, [record(1, image="/etc/passwd")]),
         ("record 0 (id '1')", "field 'image'", "absolute path")),
    Case("image-path-escapes", lambda d: json_set(d, [record(1, image="../../a.png")]),
         ("record 0 (id '1')", "field 'image'", "escapes the instruction set")),
    Case("truncated-image", _truncated_png, ("record 0 (id '1')", "field 'image'", "not a readable image")),
    Case("text-named-png", _text_as_png, ("record 0 (id '1')", "field 'image'", "not a readable image")),
    Case("decompression-bomb", _huge_png, ("record 0 (id '1')", "4200x4200 pixels", "decompression-bomb")),
    Case("duplicate-id", lambda d: json_set(d, [record(7), record(7)]), ("record 1 (id '7')", "duplicate id")),
    Case("non-utf8", _non_utf8, ("data.json", "not UTF-8")),
    Case("over-long-text", lambda d: json_set(d, [record(1, conversations=conv(a="word " * 1000))]),
         ("record 0 (id '1')", "conversations[1].value", "over the limit of 4000")),
    Case("over-token-limit", lambda d: json_set(d, [record(1, conversations=conv(a="red green blue " * 120))]),
         ("record 0 (id '1')", "field 'conversations'", "tokens, over the limit of 256")),
    Case("empty-set", lambda d: json_set(d, []), ("data.json", "empty")),
    Case("zip-path-traversal", _zip_traversal, ("upload.zip", "points outside the archive")),
    Case("zip-bomb", _zip_bomb, ("upload.zip", "zip bomb guard")),
    Case("zip-symlink", _zip_symlink, ("upload.zip", "symbolic link")),
    Case("not-a-zip", _not_a_zip, ("upload.zip", "not a readable zip")),
]

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


# ------------------------------------------------------------------------- the same, for every other format
# (llaca.data.formats): malformed row, missing column, undecodable image bytes, wrong role names, two images.

def csv_set(folder: Path, text: str, name: str = "data.csv") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return [folder / name, png(folder / "a.png")]


def parquet_set(folder: Path, rows: list[dict], kind: str = "qa", name: str = "data.parquet") -> list[Path]:
    """A Parquet file as `datasets` writes it (Image features in the schema metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features
    from datasets import Image as HFImage
    from datasets import List, Value

    features = Features({"id": Value("string"), "image": HFImage(), "question": Value("string"),
                         "answer": Value("string")}) if kind.startswith("qa") else \
        Features({"messages": List({"role": Value("string"), "content": Value("string")}), "images": List(HFImage())})
    columns = {k: [r.get(k) for r in rows] for k in features}
    if kind == "qa-no-answer":
        features = Features({k: v for k, v in features.items() if k != "answer"})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pq.write_table(pa.Table.from_pydict({k: columns[k] for k in features}, schema=features.arrow_schema), path)
    return [path]


def embedded(blob: bytes | None = None) -> dict:
    return {"bytes": blob if blob is not None else png_bytes(), "path": None}


def msg(role_user="user", role_assistant="assistant", q="<image>What color?", a="red") -> list[dict]:
    return [{"role": role_user, "content": q}, {"role": role_assistant, "content": a}]


def jsonl_rows(folder: Path, rows: list, name: str = "data.jsonl") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return [folder / name, png(folder / "a.png"), png(folder / "b.png")]


def _saved_dataset_zip(d: Path) -> list[Path]:
    """A save_to_disk folder (zipped, as a browser uploads a folder) whose second image is not an image."""
    from datasets import Dataset, Features
    from datasets import Image as HFImage
    from datasets import Value

    features = Features({"image": HFImage(), "question": Value("string"), "answer": Value("string")})
    rows = {"image": [embedded(), embedded(b"GIF89a but not really")], "question": ["What?", "What?"],
            "answer": ["red", "blue"]}
    saved = d / "build" / "saved"
    Dataset.from_dict(rows, features=features).save_to_disk(str(saved))
    entries = {f"saved/{f.name}": f.read_bytes() for f in saved.iterdir()}
    return zip_of(d, entries)


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4200, 4200), 0).save(buf, format="PNG")  # 17.6 Mpx, ~20 kB
    return buf.getvalue()


def _truncated_parquet(d: Path) -> list[Path]:
    files = parquet_set(d, [{"id": "1", "image": embedded(), "question": "q", "answer": "a"}])
    files[0].write_bytes(files[0].read_bytes()[:200])
    return files


FORMAT_CASES: list[Case] = [
    # CSV / TSV
    Case("csv-malformed-row", lambda d: csv_set(d, "image,question,answer\na.png,What color?,red\na.png,oops\n"),
         ("data.csv", "line 3", "row 1", "2 fields, the header has 3")),
    Case("csv-unterminated-quote", lambda d: csv_set(d, 'image,question,answer\na.png,"What color?,red\n'),
         ("data.csv", "line 2", "malformed CSV")),
    Case("csv-missing-column", lambda d: csv_set(d, "image,question\na.png,What color?\n"),
         ("data.csv", "missing column 'answer'", "columns: image, question")),
    Case("tsv-empty-answer", lambda d: csv_set(d, "image\tquestion\tanswer\na.png\tWhat color?\t \n", "data.tsv"),
         ("data.tsv", "line 2", "row 0", "field 'answer'", "missing or empty")),
    Case("csv-image-not-found", lambda d: csv_set(d, "image,question,answer\nb.png,What color?,red\n"),
         ("data.csv", "row 0", "field 'image'", "'b.png' not found")),
    # Parquet (Hugging Face datasets)
    Case("parquet-truncated", _truncated_parquet,
         ("data.parquet", "not a readable Parquet")),
    Case("parquet-missing-column", lambda d: parquet_set(d, [{"id": "1", "image": embedded(), "question": "q"}],
                                                         kind="qa-no-answer"),
         ("data.parquet", "missing column 'answer'")),
    Case("parquet-null-answer", lambda d: parquet_set(d, [{"id": "1", "image": embedded(), "question": "q", "answer": "a"},
                                                          {"id": "2", "image": embedded(), "question": "q", "answer": None}]),
         ("data.parquet", "row 1 (id '2')", "field 'answer'", "missing or empty")),
    Case("parquet-undecodable-image-bytes",
         lambda d: parquet_set(d, [{"id": "1", "image": embedded(), "question": "q", "answer": "a"},
                                   {"id": "2", "image": embedded(b"\x89PNG\r\n\x1a\n garbage"), "question": "q",
                                    "answer": "a"}]),
         ("data.parquet", "row 1 (id '2')", "field 'image'", "embedded image", "not a readable image")),
    Case("parquet-decompression-bomb",
         lambda d: parquet_set(d, [{"id": "1", "image": embedded(_bomb_png()), "question": "q", "answer": "a"}]),
         ("data.parquet", "row 0 (id '1')", "field 'image'", "embedded image", "4200x4200 pixels", "decompression-bomb")),
    Case("parquet-two-images", lambda d: parquet_set(d, [{"messages": msg(), "images": [embedded(), embedded()]}],
                                                     kind="messages"),
         ("data.parquet", "row 0", "field 'images'", "2 images in one record", "one image per record")),
    Case("parquet-wrong-role", lambda d: parquet_set(d, [{"messages": msg(role_assistant="bot"), "images": [embedded()]}],
                                                     kind="messages"),
         ("data.parquet", "row 0", "field 'messages[1].role'", "unknown role 'bot'", "'user' or 'assistant'")),
    Case("saved-dataset-undecodable-image-bytes", _saved_dataset_zip,
         ("row 1", "field 'image'", "embedded image (21 bytes)", "not a readable image")),
    # ShareGPT / OpenAI messages (JSON, JSONL)
    Case("messages-malformed-row", lambda d: jsonl_rows(d, [{"messages": msg(), "images": ["a.png"]}, '{"messages": [']),
         ("data.jsonl", "line 2", "malformed JSON")),
    Case("messages-wrong-role", lambda d: jsonl_rows(d, [{"messages": msg(role_user="human_being"), "images": ["a.png"]}]),
         ("data.jsonl", "line 1", "record 0", "field 'messages[0].role'", "unknown role 'human_being'")),
    Case("messages-system-role", lambda d: jsonl_rows(d, [{"messages": [{"role": "system", "content": "Be brief."}] + msg(),
                                                          "images": ["a.png"]}]),
         ("record 0", "field 'messages[0].role'", "system messages are not supported")),
    Case("messages-missing-key", lambda d: jsonl_rows(d, [{"messages": msg(), "images": ["a.png"]}, {"images": ["a.png"]}]),
         ("data.jsonl", "line 2", "record 1", "field 'messages'", "missing or empty")),
    Case("messages-two-images", lambda d: jsonl_rows(d, [{"messages": msg(q="<image><image>Same color?"),
                                                          "images": ["a.png", "b.png"]}]),
         ("record 0", "field 'images'", "2 images in one record")),
    Case("sharegpt-wrong-role", lambda d: json_set(d, [{"conversations": [conv()[0], {"from": "model", "value": "red"}],
                                                        "images": ["a.png"]}]),
         ("data.json", "record 0", "field 'conversations[1].from'", "unknown role 'model'")),
    Case("llava-two-images", lambda d: json_set(d, [record(1, image=["a.png", "a.png"])]),
         ("record 0 (id '1')", "field 'image'", "2 images in one record")),
]
CASES += FORMAT_CASES


if __name__ == "__main__":  # `python tests/broken_sets.py [--formats-only]`: each case and what the library says
    import os
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLACA_HOME"] = str(Path(tmp) / "home")
        from llaca.data import validate

        cases = FORMAT_CASES if "--formats-only" in sys.argv else CASES
        print("| case | first problem reported (library; CLI and UI upload say the same, tests/test_hardening.py) |")
        print("|---|---|")
        for case in cases:
            files = case.build(Path(tmp) / case.name)
            report = validate(files[0] if files[0].suffix == ".zip" else files[0].parent)
            assert not report.ok
            first = str(report.problems[0]).replace("|", "\\|")
            print(f"| {case.name} | {first}{f' (+{report.total_problems - 1} more)' if report.total_problems > 1 else ''} |")
        leftovers = list((Path(tmp) / "home" / "uploads").glob("*-images*"))
        print(f"\n{len(cases)} sets refused; embedded-image folders left behind: {len(leftovers)}")

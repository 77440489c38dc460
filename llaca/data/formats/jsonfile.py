"""JSON (a list of records, parsed whole under a size cap) and JSON Lines (streamed line by line).

Accepted as editors and tools write them: a UTF-8 byte-order mark (Windows Notepad), CRLF line ends, and a
`.json` file that actually holds JSON Lines (LLaMA-Factory and many exporters name them so).
"""
from __future__ import annotations

import json

from ..records import Problem

BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, name: str, problems: list, line: int) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem(name, f"not UTF-8 text ({e.reason} at byte {e.start})", line=line))
        return None


def read_jsonl(source, problems: list, limits, first_line: int = 1):
    name = source.name
    with open(source.path, "rb") as f:
        index = 0
        for lineno, raw_line in enumerate(f, 1):
            if lineno == 1 and raw_line.startswith(BOM):
                raw_line = raw_line[len(BOM):]
            text = _decode(raw_line, name, problems, lineno)
            if text is None or not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(Problem(name, f"malformed JSON: {e.msg} (column {e.colno})", line=lineno))
                index += 1
                continue
            yield index, lineno, obj
            index += 1


def read_json(source, problems: list, limits):
    name = source.name
    size = source.path.stat().st_size
    if size > limits.max_json_bytes:
        problems.append(Problem(name, f"{size} bytes, over the limit of {limits.max_json_bytes} for a .json list "
                                      "(parsed whole); write it as JSONL, one record per line (streamed)"))
        return
    raw = source.path.read_bytes()
    raw = raw[len(BOM):] if raw.startswith(BOM) else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem(name, f"not UTF-8 text ({e.reason} at byte {e.start})",
                                line=raw[: e.start].count(b"\n") + 1))
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _is_json_lines(text):
            source.container, source.label = "jsonl", "JSON Lines (in a .json file)"
            yield from read_jsonl(source, problems, limits)
            return
        problems.append(Problem(name, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})", line=e.lineno))
        return
    del text, raw
    if not isinstance(obj, list):
        problems.append(Problem(name, f"top level must be a list of records, not {type(obj).__name__}"))
        return
    for index, row in enumerate(obj):
        yield index, None, row


def _is_json_lines(text: str) -> bool:
    """Whether the first non-empty line is a whole JSON object by itself (JSON Lines named .json)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False

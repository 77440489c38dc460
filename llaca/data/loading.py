"""Find, validate and load an instruction set; write one back.

An instruction set is a folder (or a `.zip` of one) holding one data file plus the images it names by relative
path. The data file may be LLaVA JSON/JSONL, ShareGPT / OpenAI messages, CSV/TSV or Hugging Face Parquet /
`save_to_disk` (`llaca.data.formats` finds and reads them). `load_instruction_set` validates everything first and
raises `InvalidDataset` listing every problem with file, record and field; nothing trains on a set that fails
validation.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .checks import _sha256_file, load_image
from .encoding import RecordEncoder
from .records import (
    GPT_ROLES,
    HUMAN_ROLES,
    IMAGE_TOKEN,
    InstructionSet,
    InvalidDataset,
    Limits,
    Problem,
    Record,
    ValidationReport,
)


def locate_data_file(path: str | os.PathLike, limits: Limits = Limits()) -> tuple[Path, Path]:
    """Return (root folder, data file) for a folder, a data file (see `llaca.data.formats`), or a .zip."""
    from .formats import open_source

    source = open_source(path, limits)
    return source.root, source.path


def _parse_record(raw, index, line, name: str, limits: Limits, seen_ids: set, problems: list[Problem],
                  resolve_image, fields=None) -> Record | None:
    """Check one LLaVA-shaped record (`llaca.data.formats` normalises every schema to it); `fields` names its parts
    as the user's format does, `resolve_image` turns its image value into a checked file."""
    from .formats import LLAVA_FIELDS

    f = fields or LLAVA_FIELDS

    def bad(field, message, rid=None):
        rid = rid if rid is not None and not synthetic_id else None  # "row 3 (id '3')" says nothing new
        problems.append(Problem(name, message, index=index, record_id=rid, field=field, line=line, unit=f.unit))

    synthetic_id = False

    if not isinstance(raw, dict):
        bad(None, f"{f.unit} must be an object, not {type(raw).__name__}")
        return None
    rid = raw.get("id")
    rid = str(rid) if rid is not None else None
    before = len(problems)
    if rid is None:
        if f.id_required:
            bad("id", "missing")
        else:
            rid, synthetic_id = str(index), True
    elif rid in seen_ids:
        bad("id", "duplicate id", rid)
    else:
        seen_ids.add(rid)
    image = raw.get("image")
    # Sets reuse images: each distinct path / content is resolved and decoded once (100k records ~1 s/10k).
    image_path, message = resolve_image(image)
    if message:
        bad(f.image, message, rid)
    conv = raw.get("conversations")
    turns: list[tuple[str, str]] = []
    if not isinstance(conv, list) or not conv:
        bad(f.turns, "missing or empty (need user/assistant turns)" if f.role == "role"
            else "missing or empty (need human/gpt turns)", rid)
    else:
        pending_q = None
        image_tokens = 0
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict):
                bad(f.turn(t), f"turn must be an object with '{f.role}' and '{f.text}'", rid)
                continue
            role, value = turn.get("from"), turn.get("value")
            if not isinstance(value, str) or not value.strip():
                bad(f.turn(t, "value"), "missing or empty text", rid)
                continue
            if len(value) > limits.max_text_chars:
                bad(f.turn(t, "value"), f"{len(value)} characters, over the limit of {limits.max_text_chars}", rid)
            image_tokens += value.count(IMAGE_TOKEN)
            if role in HUMAN_ROLES:
                if pending_q is not None:
                    bad(f.turn(t, "from"), "two human turns in a row (assistant turn missing)", rid)
                pending_q = value.replace(IMAGE_TOKEN, "").strip()
                if not pending_q:
                    bad(f.turn(t, "value"), "question has no text besides <image>", rid)
            elif role in GPT_ROLES:
                if IMAGE_TOKEN in value:
                    bad(f.turn(t, "value"), "<image> token in an assistant turn", rid)
                if pending_q is None:
                    bad(f.turn(t, "from"), "assistant turn without a human turn before it", rid)
                else:
                    turns.append((pending_q, value.strip()))
                    pending_q = None
            else:
                hint = ("system messages are not supported (the tuner has no system prompt); "
                        if role == "system" else "")
                bad(f.turn(t, "from"), f"unknown role {role!r} ({hint}{f.roles_hint})", rid)
        if pending_q is not None:
            bad(f.turn(len(conv) - 1), "last human turn has no assistant answer", rid)
        if image is not None and image_tokens == 0:
            bad(f.turn(0, "value"), "record has an image but no <image> token in the first human turn", rid)
        elif image_tokens > 1:
            bad(f.turns, f"{image_tokens} <image> tokens; exactly one per record is supported", rid)
        elif image_tokens == 1 and IMAGE_TOKEN not in str(conv[0].get("value", "") if isinstance(conv[0], dict) else ""):
            bad(f.turn(0, "value"), "the <image> token must be in the first human turn", rid)
    if len(problems) > before or image_path is None:
        return None
    return Record(id=rid, image=image_path, turns=turns)


def token_limit(processor, fallback: int = 4096) -> int:
    """The longest record a model takes: its tokenizer's model_max_length, unless that is a placeholder."""
    n = getattr(getattr(processor, "tokenizer", processor), "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 1_000_000 else fallback


def validate(path: str | os.PathLike, limits: Limits = Limits(), processor=None, check_images: bool = True) -> ValidationReport:
    """Check a whole instruction set in any accepted format; never raises for bad content, returns every problem.

    Embedded images (Parquet) are written under `$LLACA_HOME/uploads/` only if the whole set is valid."""
    from . import formats

    problems: list[Problem] = []
    records: list[Record] = []
    try:
        source = formats.open_source(path, limits)
    except InvalidDataset as e:
        return ValidationReport(Path(path).stem, [], e.problems, e.total, None)
    name = source.name
    seen: set[str] = set()
    resolver = formats.ImageResolver(source, limits, check_images)
    schema = None
    n_raw = 0
    try:
        for index, line, raw in source.rows(problems, limits):
            n_raw += 1
            if n_raw > limits.max_records:
                problems.append(Problem(name, f"more than {limits.max_records} records (limit)"))
                break
            if schema is None:
                schema = formats.detect(raw, source.tabular)
                if missing := schema.missing_columns(raw if isinstance(raw, dict) else {}):
                    columns = ", ".join(map(str, raw)) if isinstance(raw, dict) else ""
                    problems.append(Problem(name, f"missing column {' and '.join(missing)} (columns: {columns})"))
                    break
            rec = _parse_record(schema.normalize(raw, index) if isinstance(raw, dict) else raw, index, line, name,
                                limits, seen, problems, resolver, schema.fields)
            if rec is not None:
                records.append(rec)
        if n_raw == 0 and not problems:
            problems.append(Problem(name, "the instruction set is empty (no records)"))
        if processor is not None:
            max_tokens = limits.max_tokens or token_limit(processor)
            encoder = RecordEncoder(processor, max_tokens=None)
            if records:  # counts the image tokens once (an embedded image is not published yet)
                encoder.num_image_tokens(load_image(resolver.readable_path(records[0].image)))
            unit = schema.fields.unit if schema else "record"
            for i, rec in enumerate(records):
                n = encoder.num_tokens(rec)
                if n > max_tokens:
                    problems.append(Problem(name, f"{n} tokens, over the limit of {max_tokens}", index=i,
                                            record_id=rec.id, field=schema.fields.turns, unit=unit))
    finally:
        resolver.finish(ok=not problems and bool(records))
    data_file = source.path
    set_name = source.root.name if data_file.stem in ("data", "train", "test") or source.container == "hf-disk" \
        else data_file.stem
    if set_name in ("train", "test"):
        set_name = f"{source.root.parent.name}-{set_name}"
    total = len(problems)
    return ValidationReport(set_name, records, problems[: limits.max_problems], total, data_file,
                            format=formats.describe(source, schema, resolver), files=source.files)


def load_instruction_set(path: str | os.PathLike, limits: Limits = Limits(), processor=None) -> InstructionSet:
    """Validate and load; raise `InvalidDataset` (every problem, with file/record/field) if anything is wrong."""
    report = validate(path, limits, processor)
    if not report.ok:
        raise InvalidDataset(report.problems, report.total_problems)
    return InstructionSet(
        name=report.name,
        root=report.data_file if report.data_file.is_dir() else report.data_file.parent,
        data_file=report.data_file,
        records=report.records,
        sha256=dataset_hash(report.files or [report.data_file], report.records),
        format=report.format,
    )


def dataset_hash(data_files: Path | list[Path], records: list[Record]) -> str:
    """Content hash of the data file(s) and every image they name (what a version was trained on)."""
    files = [data_files] if isinstance(data_files, Path) else list(data_files)
    h = hashlib.sha256(_sha256_file(files[0]).encode())
    for extra in files[1:]:  # Parquet shards, the files of a save_to_disk folder
        h.update(_sha256_file(extra).encode())
    for path in sorted({str(r.image) for r in records}):
        h.update(_sha256_file(Path(path)).encode())
    return h.hexdigest()


def write_instruction_set(out_dir: Path, records: list[Record]) -> Path:
    """Write records (e.g. a replay buffer) as a self-contained LLaVA-format folder."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, rec in enumerate(records):
        rel = f"images/{i:05d}{rec.image.suffix}"
        shutil.copyfile(rec.image, out_dir / rel)
        conv = []
        for t, (q, a) in enumerate(rec.turns):
            conv.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if t == 0 else "") + q})
            conv.append({"from": "gpt", "value": a})
        rows.append({"id": rec.id, "image": rel, "conversations": conv})
    (out_dir / "data.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return out_dir

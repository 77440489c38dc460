"""`python -m llaca export-data DATA OUT --format {llava,sharegpt,parquet}`: a validated set, for other tools.

The set is read and validated like any upload (any accepted format in), then written in one of three formats
that LLaVA, LLaMA-Factory / TRL and the Hugging Face Hub read:

    llava     OUT/data.json (id, image, conversations from/value) + OUT/images/
    sharegpt  OUT/data.json (messages role/content with <image>, images: [path]) + OUT/images/  (LLaMA-Factory)
    parquet   OUT (one .parquet file): id, messages, images (a list of `datasets.Image`, bytes embedded)

Each distinct image is copied (or embedded) once. The output is written next to OUT under a temporary name
and renamed when complete, so an interrupted export never leaves a half-written OUT; an existing OUT is
refused rather than overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ..loading import load_instruction_set
from ..records import IMAGE_TOKEN, InvalidDataset, Problem, Record

EXPORT_FORMATS = ("llava", "sharegpt", "parquet")
PARQUET_BATCH = 1_000


def _conversation(rec: Record, roles=("human", "gpt"), keys=("from", "value"), token="\n") -> list[dict]:
    out = []
    for t, (q, a) in enumerate(rec.turns):
        out.append({keys[0]: roles[0], keys[1]: (IMAGE_TOKEN + token if t == 0 else "") + q})
        out.append({keys[0]: roles[1], keys[1]: a})
    return out


def _write_folder(records: list[Record], tmp: Path, fmt: str) -> None:
    (tmp / "images").mkdir(parents=True)
    names: dict[Path, str] = {}
    with open(tmp / "data.json", "w", encoding="utf-8") as f:
        f.write("[")
        for i, rec in enumerate(records):
            if rec.image not in names:
                names[rec.image] = f"images/{len(names):06d}{rec.image.suffix.lower()}"
                shutil.copyfile(rec.image, tmp / names[rec.image])
            if fmt == "llava":
                row = {"id": rec.id, "image": names[rec.image], "conversations": _conversation(rec)}
            else:
                row = {"id": rec.id, "messages": _conversation(rec, ("user", "assistant"), ("role", "content"), ""),
                       "images": [names[rec.image]]}
            f.write(("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False))
        f.write("\n]\n")


def parquet_features():
    from datasets import Features, Image, List, Value

    return Features({"id": Value("string"),
                     "messages": List({"role": Value("string"), "content": Value("string")}),
                     "images": List(Image())})


def _write_parquet(records: list[Record], tmp: Path) -> None:
    """Streamed in batches with the `datasets` features in the schema, so `load_dataset` sees Image columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_features().arrow_schema
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(records), PARQUET_BATCH):
            batch = records[start:start + PARQUET_BATCH]
            writer.write_table(pa.Table.from_pydict({
                "id": [r.id for r in batch],
                "messages": [_conversation(r, ("user", "assistant"), ("role", "content"), "") for r in batch],
                "images": [[{"bytes": r.image.read_bytes(), "path": r.image.name}] for r in batch],
            }, schema=schema))


def export_data(data: str | os.PathLike, out: str | os.PathLike, fmt: str) -> tuple[Path, int, str]:
    """Validate `data` (any accepted format) and write it as `fmt`; returns (OUT, records, detected format)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    out = Path(out)
    if out.exists():
        raise InvalidDataset([Problem(str(out), "already exists; choose a new output path (nothing was changed)")])
    dataset = load_instruction_set(data)  # InvalidDataset (file, record, field) if anything is wrong
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if fmt == "parquet":
            _write_parquet(dataset.records, tmp)
        else:
            _write_folder(dataset.records, tmp, fmt)
        os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return out, len(dataset.records), dataset.format


def export_download(data: str | os.PathLike, fmt: str, dest: str | os.PathLike) -> Path:
    """Export for a browser download: the .parquet file, or the folder as a .zip (the Learn tab's Convert)."""
    dest = Path(dest)
    name = Path(data).parent.name if Path(data).name in ("train", "test") else Path(data).stem
    out, _, _ = export_data(data, dest / (f"{name}-{fmt}.parquet" if fmt == "parquet" else f"{name}-{fmt}"), fmt)
    if fmt == "parquet":
        return out
    archive = shutil.make_archive(str(dest / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"), "zip", out.parent, out.name)
    final = dest / f"{out.name}.zip"
    os.replace(archive, final)
    shutil.rmtree(out)
    return final

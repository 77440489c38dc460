"""Bring your own data: every common multimodal instruction format, read into the tuner's one record type.

A set is (container) x (schema). The container is found from the path (`locate.open_source`): JSON, JSON
Lines, CSV/TSV, Parquet (one file or the Hub's shards), a `save_to_disk` folder, or any of them in a folder or a
`.zip`. The schema comes from the first record (`schemas.detect`): LLaVA, ShareGPT, OpenAI-style messages, or
image/question/answer columns. Each row is normalised to a LLaVA record and checked by the one validator in
`llaca.data`, so every format gets the same guarantees: problems with file, record/row and field, images
under the same guards (`image_refs.ImageResolver`, also for bytes embedded in Parquet), nothing kept on error.

    readers: jsonfile.py (JSON, JSONL)   table.py (CSV, TSV)   hf.py (Parquet, save_to_disk)
    locate.py (path -> Source)   schemas.py (row -> LLaVA record)   image_refs.py (image value -> file)
    export.py (`python -m llaca export-data`: llava | sharegpt | parquet)
"""
from __future__ import annotations

from .image_refs import ImageResolver
from .locate import DATA_SUFFIXES, open_source
from .schemas import Fields, Schema, detect
from .source import Source

LLAVA_FIELDS = Fields()


def describe(source: Source, schema: Schema | None, resolver: ImageResolver | None = None) -> str:
    """What the report says was detected, e.g. 'messages (OpenAI / ShareGPT role-content) in JSON Lines'."""
    text = f"{schema.label if schema else 'no records'} in {source.label}"
    if source.note:
        text += f" ({source.note})"
    if resolver is not None and resolver.embedded:
        text += f", {resolver.embedded} embedded image(s)"
    return text


def referenced_images(data_file) -> list[str]:
    """Every relative image path a data file names (for placing a browser's flat upload), skipping anything
    malformed: the validator reports that afterwards with record and field."""
    source = open_source(data_file)
    paths, schema = [], None
    from ..records import Limits

    for index, _, raw in source.rows([], Limits()):
        if not isinstance(raw, dict):
            continue
        schema = schema or detect(raw, source.tabular)
        value = schema.normalize(raw, index).get("image")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            v = v.get("path") if isinstance(v, dict) and v.get("bytes") is None else v
            if isinstance(v, str) and v.strip():
                paths.append(v)
    return paths


__all__ = ["DATA_SUFFIXES", "Fields", "ImageResolver", "LLAVA_FIELDS", "Schema", "Source", "describe", "detect",
           "open_source", "referenced_images"]

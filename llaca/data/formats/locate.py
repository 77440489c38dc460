"""Find the data in what the user gave (a file, a folder, a .zip) and say which container it is.

No registration file is needed (LLaMA-Factory's `dataset_info.json` is ignored when present): the container
comes from the file suffix or the folder's layout, the schema from the first record (`schemas.detect`).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..checks import _safe_extract_zip
from ..records import InvalidDataset, Limits, Problem
from . import hf, jsonfile, table
from .source import Source

CONTAINERS = {  # suffix -> (container, label, reader, tabular)
    ".json": ("json", "JSON", jsonfile.read_json, False),
    ".jsonl": ("jsonl", "JSON Lines", jsonfile.read_jsonl, False),
    ".csv": ("csv", "CSV", table.read_table, True),
    ".tsv": ("tsv", "TSV", table.read_table, True),
    ".parquet": ("parquet", "Parquet (Hugging Face datasets)", hf.read_parquet, True),
}
DATA_SUFFIXES = tuple(CONTAINERS)
NOT_DATA = {"dataset_info.json", "state.json", "dataset_dict.json"}  # dataset metadata, never records


def _file_source(path: Path, files: list[Path] | None = None) -> Source:
    container, label, reader, tabular = CONTAINERS[path.suffix.lower()]
    files = files or [path]
    if len(files) > 1:
        label += f", {len(files)} shards"
    return Source(path=path, root=path.parent, container=container, label=label, files=files, reader=reader,
                  tabular=tabular)


def _saved_source(folder: Path, note: str = "") -> Source:
    return Source(path=folder, root=folder, container="hf-disk", label="Hugging Face save_to_disk folder",
                  files=sorted(p for p in folder.iterdir() if p.is_file()), reader=hf.read_saved, tabular=True,
                  note=note)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _shard_group(files: list[Path]) -> list[Path] | None:
    """Hub layout `train-00000-of-00002.parquet`, ...: the train split's shards (or the only split's)."""
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(f.name.split("-")[0].split(".")[0], []).append(f)
    if len(splits) == 1:
        return files
    return splits.get("train")


def open_source(path: str | os.PathLike, limits: Limits = Limits()) -> Source:
    """The Source for a folder, a data file, or a .zip; raises InvalidDataset saying what is missing."""
    path = Path(path)
    if not path.exists():
        raise InvalidDataset([Problem(str(path), "no such file or folder")])
    if path.is_file() and path.suffix.lower() == ".zip":
        path = _safe_extract_zip(path, limits)
    if path.is_file():
        if path.suffix.lower() not in CONTAINERS:
            raise InvalidDataset([Problem(path.name, "expected a folder, a .zip, or a data file "
                                                     f"({', '.join(DATA_SUFFIXES)})")])
        return _file_source(path)
    if _is_saved_dataset(path):
        return _saved_source(path)
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_saved_dataset(p))
        pick = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if pick is None:
            raise InvalidDataset([Problem(path.name, f"a saved DatasetDict with splits {', '.join(splits)} and no "
                                                     "'train': pass one split's folder")])
        return _saved_source(path / pick, note=f"split '{pick}' of a DatasetDict")
    candidates = sorted(p for p in path.iterdir()
                        if p.is_file() and p.suffix.lower() in CONTAINERS and p.name not in NOT_DATA)
    if not candidates:  # a zip of a folder holds one top-level folder; the Hub layout keeps Parquet in data/
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
        if len(subdirs) == 1:
            return open_source(subdirs[0], limits)
        hint = (f" (a CoIN-style task folder: pass {path.name}/train; its test split is then used automatically)"
                if {"train", "test"} <= {p.name for p in subdirs} else "")
        raise InvalidDataset([Problem(path.name, "no data file (" + ", ".join(DATA_SUFFIXES) +
                                      ") at the top of the instruction set" + hint)])
    parquet = [p for p in candidates if p.suffix.lower() == ".parquet"]
    if len(parquet) == len(candidates) and len(parquet) > 1 and (shards := _shard_group(parquet)):
        return _file_source(shards[0], shards)
    if len(candidates) > 1:
        named = [p for p in candidates if p.stem in ("data", "train")]
        if len(named) != 1:
            raise InvalidDataset([Problem(path.name, f"several data files ({', '.join(p.name for p in candidates)}); "
                                                     "keep one, or name it data.json")])
        candidates = named
    return _file_source(candidates[0])

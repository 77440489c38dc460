"""Hugging Face datasets: Parquet files (as sets are published on the Hub) and `save_to_disk` folders.

Both are read through the `datasets` library, offline: Parquet with `load_dataset("parquet", streaming=True)`
(row groups are read as needed, so 100k rows stay in bounded memory), a `save_to_disk` folder with
`load_from_disk` (memory-mapped Arrow). Rows are taken in Arrow format, so an `Image` column arrives as its
stored `{"bytes", "path"}` and is decoded here under the same pixel and size guards as an image file, never
by `datasets` itself.
"""
from __future__ import annotations

import os

from ...paths import llaca_home
from ..records import Problem

BATCH = 1024


def _batches(dataset):
    for table in dataset.with_format("arrow").iter(batch_size=BATCH):
        yield from table.to_pylist()


def _quiet():
    """datasets logs a damaged file's error itself; here it becomes one Problem instead."""
    from datasets.utils import logging as ds_logging

    ds_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    import logging

    logging.getLogger("datasets").setLevel(logging.CRITICAL)


def _rows(source, problems: list, open_dataset):
    index = 0
    _quiet()
    try:
        dataset = open_dataset()
        for row in _batches(dataset):
            yield index, None, row
            index += 1
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a damaged file
        where = f" after row {index - 1}" if index else ""
        kind = "Parquet" if source.container == "parquet" else "saved Hugging Face dataset"
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        problems.append(Problem(source.name, f"not a readable {kind}{where} ({type(e).__name__}: {detail})"))


def read_parquet(source, problems: list, limits):
    def open_dataset():
        from datasets import load_dataset

        cache = llaca_home() / "cache" / "datasets"  # streaming writes only a lock file; keep it in our home
        return load_dataset("parquet", data_files=[os.fspath(f) for f in source.files], split="train",
                            streaming=True, cache_dir=os.fspath(cache))

    yield from _rows(source, problems, open_dataset)


def read_saved(source, problems: list, limits):
    def open_dataset():
        from datasets import load_from_disk

        dataset = load_from_disk(os.fspath(source.path))
        if hasattr(dataset, "keys"):  # a DatasetDict saved at this path: locate picks a split folder instead
            raise ValueError(f"holds splits {', '.join(dataset.keys())}; pass one split's folder")
        return dataset

    yield from _rows(source, problems, open_dataset)

"""A located instruction set: where its rows come from, where its image paths resolve, what it was detected as."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

# (index of the record/row, 0-based; line in the file, 1-based, where the container has lines; the raw row)
Row = tuple[int, "int | None", object]


@dataclasses.dataclass
class Source:
    path: Path  # the data file (or a save_to_disk folder): problems name it
    root: Path  # relative image paths resolve inside this folder
    container: str  # json | jsonl | csv | tsv | parquet | hf-disk
    label: str  # what the report says, e.g. "JSON Lines"
    files: list[Path]  # what the set's content hash covers
    reader: Callable[..., Iterator[Row]]  # reader(source, problems, limits)
    tabular: bool = False  # columns (CSV/TSV/Parquet/Arrow) rather than free-form records
    note: str = ""  # e.g. "split 'train' of a DatasetDict"

    @property
    def name(self) -> str:
        return self.path.name

    def rows(self, problems: list, limits) -> Iterator[Row]:
        return self.reader(self, problems, limits)

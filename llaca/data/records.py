"""The instruction record and the errors that describe bad ones (file, record, field).

Every accepted format (`llaca.data.formats`) becomes these LLaVA records:

    {"id": "x1", "image": "images/1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

IMAGE_TOKEN = "<image>"


HUMAN_ROLES = {"human", "user"}


GPT_ROLES = {"gpt", "assistant"}


@dataclasses.dataclass
class Limits:
    """Caps on what an upload may hold (docs/data-formats.md 'Limits on uploads'; override per call)."""

    max_records: int = 200_000
    max_text_chars: int = 4_000  # per turn
    # per record, after image-token expansion (checked when a processor is given); None: the tokenizer's
    # model_max_length (256 for the embedded model, the context of a real checkpoint), else 4096
    max_tokens: int | None = None
    max_image_pixels: int = 4096 * 4096  # decompression-bomb guard
    max_image_bytes: int = 20 * 2**20
    max_json_bytes: int = 256 * 2**20  # a .json list is parsed whole; bigger sets must be JSONL (streamed)
    max_zip_bytes: int = 2 * 2**30  # total uncompressed
    max_zip_ratio: float = 200.0  # uncompressed / compressed, per member
    max_zip_members: int = 300_000
    max_problems: int = 200  # the report lists this many, then counts the rest


@dataclasses.dataclass
class Problem:
    file: str
    message: str
    index: int | None = None  # record index (0-based) or, for JSONL, line number (1-based)
    record_id: str | None = None
    field: str | None = None
    line: int | None = None
    unit: str = "record"  # "row" in tables (CSV, Parquet)

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.index is not None:
            where.append(f"{self.unit} {self.index}" + (f" (id {self.record_id!r})" if self.record_id else ""))
        if self.field:
            where.append(f"field '{self.field}'")
        return ", ".join(where) + ": " + self.message


class InvalidDataset(ValueError):
    def __init__(self, problems: list[Problem], total: int | None = None):
        self.problems = problems
        self.total = total if total is not None else len(problems)
        head = str(problems[0]) if problems else "invalid instruction set"
        extra = f" (and {self.total - 1} more problem(s))" if self.total > 1 else ""
        super().__init__(head + extra)


@dataclasses.dataclass
class Record:
    id: str
    image: Path
    turns: list[tuple[str, str]]  # (question without the <image> token, answer)

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[0][1]


@dataclasses.dataclass
class InstructionSet:
    name: str
    root: Path
    data_file: Path
    records: list[Record]
    sha256: str
    format: str = ""  # what llaca.data.formats detected

    def __len__(self) -> int:
        return len(self.records)


@dataclasses.dataclass
class ValidationReport:
    name: str
    records: list[Record]
    problems: list[Problem]
    total_problems: int
    data_file: Path | None
    format: str = ""  # what was detected, e.g. "LLaVA conversations in JSON Lines" (llaca.data.formats.describe)
    files: list[Path] = dataclasses.field(default_factory=list)  # what the content hash covers

    @property
    def ok(self) -> bool:
        return self.total_problems == 0 and bool(self.records)

"""Data: instruction sets (records, validation, every accepted format, the training encoding) and the generators
of the sets this project makes (CoIN-mini, the tiny base's world, held-out image sets, the demo).

The names most code needs are re-exported here (`from llaca import data as D; D.load_instruction_set(...)`);
the modules below hold them:
- `records`: the LLaVA record and the errors that say what is wrong and where.
- `checks`: zip members, image files and pixel counts of an upload.
- `loading`: find, validate, load and write instruction sets (`formats/` reads each file format).
- `encoding`: a record's turns through the chat template, labels on the answers only.
"""
from .checks import load_image
from .encoding import EncodedDataset, RecordEncoder, collate, to_messages
from .loading import dataset_hash, load_instruction_set, locate_data_file, token_limit, validate, write_instruction_set
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

__all__ = [
    "GPT_ROLES", "HUMAN_ROLES", "IMAGE_TOKEN", "EncodedDataset", "InstructionSet", "InvalidDataset", "Limits",
    "Problem", "Record", "RecordEncoder", "ValidationReport", "collate", "dataset_hash", "load_image",
    "load_instruction_set", "locate_data_file", "to_messages", "token_limit", "validate", "write_instruction_set",
]

"""Instruction sets: the record the tuner trains on, its validator, and the training encoding.

An instruction set is a folder (or a `.zip` of one) holding one data file plus the images it names by relative
path. The data file may be LLaVA JSON/JSONL, ShareGPT / OpenAI messages, CSV/TSV or Hugging Face Parquet /
`save_to_disk` (`llaca.formats` finds and reads them); every row becomes a LLaVA record:

    {"id": "x1", "image": "images/1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}

`load_instruction_set` validates everything first and raises `InvalidDataset` listing every problem with
file, record and field; nothing trains on a set that fails validation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import torch
from PIL import Image

from .images import to_rgb
from .paths import llaca_home

IMAGE_TOKEN = "<image>"
HUMAN_ROLES = {"human", "user"}
GPT_ROLES = {"gpt", "assistant"}


@dataclasses.dataclass
class Limits:
    """Caps on what an upload may hold (documented in README; override per call)."""

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
    format: str = ""  # what llaca.formats detected

    def __len__(self) -> int:
        return len(self.records)


@dataclasses.dataclass
class ValidationReport:
    name: str
    records: list[Record]
    problems: list[Problem]
    total_problems: int
    data_file: Path | None
    format: str = ""  # what was detected, e.g. "LLaVA conversations in JSON Lines" (llaca.formats.describe)
    files: list[Path] = dataclasses.field(default_factory=list)  # what the content hash covers

    @property
    def ok(self) -> bool:
        return self.total_problems == 0 and bool(self.records)


# --------------------------------------------------------------------------------------------- locate

def _safe_extract_zip(zip_path: Path, limits: Limits) -> Path:
    """Extract an uploaded zip into `$LLACA_HOME/uploads/<sha>`, refusing traversal, links and bombs."""
    digest = _sha256_file(zip_path)
    dest = llaca_home() / "uploads" / digest[:16]
    if dest.exists():
        return dest
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidDataset([Problem(zip_path.name, f"not a readable zip file ({e})")]) from None
    with zf:
        members = zf.infolist()
        if len(members) > limits.max_zip_members:
            raise InvalidDataset([Problem(zip_path.name, f"{len(members)} entries, over the limit of {limits.max_zip_members}")])
        total = 0
        for m in members:
            name = m.filename
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidDataset([Problem(zip_path.name, f"entry {name!r} is a symbolic link; links are not allowed")])
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise InvalidDataset([Problem(zip_path.name, f"entry {name!r} points outside the archive")])
            total += m.file_size
            if total > limits.max_zip_bytes:
                raise InvalidDataset([Problem(zip_path.name, f"expands to over {limits.max_zip_bytes} bytes (zip bomb guard)")])
            if m.compress_size and m.file_size / m.compress_size > limits.max_zip_ratio and m.file_size > 2**20:
                raise InvalidDataset([Problem(zip_path.name, f"entry {name!r} expands {m.file_size / m.compress_size:.0f}x (zip bomb guard)")])
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for m in members:
                target = (tmp / m.filename).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise InvalidDataset([Problem(zip_path.name, f"entry {m.filename!r} points outside the archive")])
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    written = shutil.copyfileobj(src, dst, 2**20)  # noqa: F841 (sizes were checked above)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def locate_data_file(path: str | os.PathLike, limits: Limits = Limits()) -> tuple[Path, Path]:
    """Return (root folder, data file) for a folder, a data file (see `llaca.formats`), or a .zip."""
    from .formats import open_source

    source = open_source(path, limits)
    return source.root, source.path


# ----------------------------------------------------------------------------------------- validate

def _too_many_pixels(im: Image.Image, limits: Limits) -> str | None:
    """The decompression-bomb guard, read from the header before anything is decoded."""
    w, h = im.size
    if w * h > limits.max_image_pixels:
        return f"image is {w}x{h} pixels, over the limit of {limits.max_image_pixels} (decompression-bomb guard)"
    return None


def _check_image(path: Path | bytes, limits: Limits) -> str | None:
    """Return a message if the file (or bytes embedded in a table) is not a loadable, reasonably sized image."""
    if isinstance(path, bytes):
        size, open_image = len(path), lambda: Image.open(io.BytesIO(path))
    else:
        try:
            size = path.stat().st_size
        except OSError as e:
            return f"cannot read image ({e.strerror})"
        open_image = lambda: Image.open(path)  # noqa: E731
    if size > limits.max_image_bytes:
        return f"image {'file ' if not isinstance(path, bytes) else ''}is {size} bytes, over the limit of {limits.max_image_bytes}"
    try:
        with open_image() as im:
            if message := _too_many_pixels(im, limits):
                return message
            im.verify()
        with open_image() as im:
            im.load()
    except Image.DecompressionBombError:
        return "image is too large (decompression-bomb guard)"
    except Image.UnidentifiedImageError as e:
        return "not a readable image (no known image format)" if isinstance(path, bytes) else \
            f"not a readable image ({type(e).__name__}: {e})"
    except Exception as e:  # PIL raises many types for broken files
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def _image_file_problem(image: str, root: Path, limits: Limits, check_images: bool) -> tuple[Path | None, str | None]:
    """(the image's path if it is inside the set and exists, what is wrong with it or None)."""
    if os.path.isabs(image) or image.startswith(("/", "\\")) or ":" in Path(image).parts[0]:
        return None, f"absolute path {image!r}; use a path relative to the set"
    candidate = root / image
    try:
        resolved = candidate.resolve()
    except OSError:
        resolved = candidate
    if ".." in Path(image).parts or not resolved.is_relative_to(root.resolve()):
        return None, f"path {image!r} escapes the instruction set"
    if not candidate.is_file():
        return None, f"file {image!r} not found"
    message = _check_image(candidate, limits) if check_images else None
    return candidate, (f"{image!r}: {message}" if message else None)


def _parse_record(raw, index, line, name: str, limits: Limits, seen_ids: set, problems: list[Problem],
                  resolve_image, fields=None) -> Record | None:
    """Check one LLaVA-shaped record (`llaca.formats` normalises every schema to it); `fields` names its parts
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------------------- encode

def load_image(path: str | os.PathLike, limits: Limits = Limits()) -> Image.Image:
    """An RGB image from a file (a chat upload, a record); a clear ValueError for anything else or too big."""
    name = Path(path).name
    try:
        with Image.open(path) as im:
            if message := _too_many_pixels(im, limits):
                raise ValueError(f"{name}: {message}")
            return to_rgb(im)  # EXIF rotation, transparency over white, 16-bit scaled (llaca.images)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def to_messages(turns: list[tuple[str, str]], with_image: bool = True) -> list[dict]:
    """LLaVA turns -> transformers' multimodal chat messages (the image goes with the first question)."""
    messages = []
    for t, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if (t == 0 and with_image) else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages


class RecordEncoder:
    """Turns a record into input_ids / labels / pixel_values with the processor's own chat template.

    Labels are -100 everywhere except the assistant answers (and the end-of-turn text the template puts
    after them), so multi-turn records train on every assistant turn and never on the user turns or the
    image tokens. Answer spans come from rendering the conversation prefix by prefix, so any chat template
    that appends turns works (the tiny model's and llava-hf's).
    """

    def __init__(self, processor, max_tokens: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_tokens = max_tokens
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        self._n_image_tokens: int | None = None

    def num_image_tokens(self, image: Image.Image) -> int:
        if self._n_image_tokens is None:  # fixed-resolution LLaVA: the same for every image
            ids = self.processor(text=self.image_token, images=image)["input_ids"][0]
            self._n_image_tokens = int(sum(1 for i in ids if i == self.processor.image_token_id))
        return self._n_image_tokens

    def render(self, messages, add_generation_prompt=False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def text_and_spans(self, turns) -> tuple[str, list[tuple[int, int]]]:
        messages = to_messages(turns)
        spans = []
        for k in range(len(turns)):
            prefix = self.render(messages[: 2 * k + 1], add_generation_prompt=True)
            upto = self.render(messages[: 2 * k + 2])
            if upto.startswith(prefix):
                spans.append((len(prefix), len(upto)))
            else:  # template rewrites earlier text: fall back to locating the answer itself
                answer = turns[k][1]
                start = upto.rfind(answer)
                spans.append((start, start + len(answer)))
        return self.render(messages), spans

    def encode_turns(self, turns, n_img: int) -> dict:
        """input_ids / labels of a conversation whose image placeholder stands for `n_img` image tokens (what
        `encode` trains on, without the pixels: callers with cached tower features use it directly)."""
        text, spans = self.text_and_spans(turns)
        # Expand the image placeholder like the processor does; answer spans lie after it and shift with it.
        pos = text.find(self.image_token)
        shift = (n_img - 1) * len(self.image_token)
        expanded = text.replace(self.image_token, self.image_token * n_img, 1)
        spans = [(s + shift, e + shift) if s > pos else (s, e) for s, e in spans]
        enc = self.tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=True)
        ids = enc["input_ids"]
        labels = [
            tok if any(s < e_tok and s_tok < e for s, e in spans) and e_tok > s_tok else -100
            for tok, (s_tok, e_tok) in zip(ids, enc["offset_mapping"])
        ]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def encode(self, record: Record, image: Image.Image | None = None) -> dict:
        image = image if image is not None else load_image(record.image)
        out = self.encode_turns(record.turns, self.num_image_tokens(image))
        n = len(out["input_ids"])
        if self.max_tokens and n > self.max_tokens:
            raise InvalidDataset([Problem(record.image.name, f"{n} tokens, over the limit of {self.max_tokens}",
                                          record_id=record.id, field="conversations")])
        out["pixel_values"] = self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        return out

    def num_tokens(self, record: Record) -> int:
        text, _ = self.text_and_spans(record.turns)
        n_img = self._n_image_tokens or self.num_image_tokens(load_image(record.image))
        return len(self.tokenizer(text)["input_ids"]) + n_img - 1


class EncodedDataset(torch.utils.data.Dataset):
    """Lazily encodes records (images are read when a batch needs them)."""

    def __init__(self, records: list[Record], encoder: RecordEncoder):
        self.records = records
        self.encoder = encoder

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.encoder.encode(self.records[i])


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a training batch (loss ignores the padding through labels = -100)."""
    n = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[i, :k] = b["input_ids"]
        labels[i, :k] = b["labels"]
        attention[i, :k] = 1
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if "pixel_values" in batch[0]:  # (records without pixels: cached tower features, text-only chat)
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])
    return out

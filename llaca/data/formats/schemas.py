"""What a record looks like, independent of the file it is in: four schemas, each mapped to the LLaVA record.

A container (JSON, CSV, Parquet, ...) yields plain dicts; the schema says which keys hold the image and the
turns. Every schema is normalised to the LLaVA shape (`id`, `image`, `conversations` of `from`/`value`) so that
one validator (`llaca.data._parse_record`) checks every format the same way. Its problems name the fields as
the user wrote them (`messages[1].role`, column `answer`), through the schema's `Fields`.

    llava     {"id", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}
    sharegpt  {"conversations": [...from/value...], "images": ["a.png"]}          (LLaMA-Factory's sharegpt)
    messages  {"messages": [{"role": "user", "content": "<image>..."}, ...], "images": ["a.png"]}
              (OpenAI / TRL / LLaMA-Factory; `content` may also be a list of {"type": "image"|"text"} parts)
    qa        columns image, question, answer (CSV/TSV, Parquet, a JSON list of flat objects)
"""
from __future__ import annotations

import dataclasses

IMAGE_TOKEN = "<image>"

IMAGE_COLUMNS = ("image", "images", "image_path", "img", "file_name", "filename")
QUESTION_COLUMNS = ("question", "query", "prompt", "instruction")
ANSWER_COLUMNS = ("answer", "response", "output", "completion")


@dataclasses.dataclass(frozen=True)
class Fields:
    """How the validator names a record's parts in its messages, in the user's own vocabulary."""

    unit: str = "record"  # "row" for tables
    id_required: bool = True
    image: str = "image"
    turns: str = "conversations"
    role: str = "from"
    text: str = "value"
    roles_hint: str = "use 'human' or 'gpt'"
    columns: tuple[str, str] | None = None  # qa: (question column, answer column) name turns 0 and 1

    def turn(self, t: int, key: str | None = None) -> str:
        if self.columns:
            return self.columns[t % 2]
        return f"{self.turns}[{t}]" + (f".{self.text if key == 'value' else self.role}" if key else "")


@dataclasses.dataclass(frozen=True)
class Schema:
    name: str  # llava | sharegpt | messages | qa
    label: str  # for the validation report
    fields: Fields
    image_key: str = "image"
    question_key: str = ""
    answer_key: str = ""

    def normalize(self, raw: dict, index: int) -> dict:
        """The LLaVA-shaped record the validator checks (`raw` itself when it already is one)."""
        if self.name == "llava":
            return raw
        rid = raw.get("id")  # None: the validator numbers the record
        if self.name == "sharegpt":
            return {"id": rid, "image": raw.get("images"), "conversations": raw.get("conversations")}
        if self.name == "messages":
            messages = raw.get("messages")
            if isinstance(messages, list):
                messages = [{"from": m.get("role"), "value": _content_text(m.get("content"))}
                            if isinstance(m, dict) else m for m in messages]
            return {"id": rid, "image": raw.get(self.image_key), "conversations": messages}
        question, answer = raw.get(self.question_key), raw.get(self.answer_key)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)  # a count in a Parquet column
        if isinstance(question, str) and question.strip() and IMAGE_TOKEN not in question:
            question = IMAGE_TOKEN + "\n" + question  # a table's question never carries the token
        return {"id": rid, "image": raw.get(self.image_key),
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}

    def missing_columns(self, keys) -> list[str]:
        """Tables: required columns absent from the header (checked once, not per row)."""
        if self.name != "qa":
            return []
        wanted = [("image", self.image_key, IMAGE_COLUMNS), ("question", self.question_key, QUESTION_COLUMNS),
                  ("answer", self.answer_key, ANSWER_COLUMNS)]
        return [f"'{what}' (or {', '.join(repr(a) for a in aliases[1:])})"
                for what, key, aliases in wanted if key not in keys]


def _content_text(content):
    """OpenAI/TRL content parts -> LLaVA text: an image part becomes the <image> token, text parts are joined."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            out.append(IMAGE_TOKEN + "\n")
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            return None  # reported as missing text: an unknown part type is not guessed at
    return "".join(out)


def _first(keys, candidates) -> str:
    return next((c for c in candidates if c in keys), "")


def detect(row, tabular: bool) -> Schema:
    """The schema of a set, from its first record's keys. JSON defaults to LLaVA (the historical format, whose
    messages then say which field is missing); a table defaults to image/question/answer columns."""
    keys = set(row) if isinstance(row, dict) else set()
    if "messages" in keys:
        image_key = "images" if "images" in keys or "image" not in keys else "image"
        return Schema("messages", "messages (OpenAI / ShareGPT role-content)",
                      Fields(id_required=False, image=image_key, turns="messages", role="role", text="content",
                             roles_hint="use 'user' or 'assistant'", unit="row" if tabular else "record"),
                      image_key=image_key)
    if "conversations" in keys and "images" in keys and "image" not in keys:
        return Schema("sharegpt", "ShareGPT (conversations + images)",
                      Fields(id_required=False, image="images", unit="row" if tabular else "record"))
    q, a = _first(keys, QUESTION_COLUMNS), _first(keys, ANSWER_COLUMNS)
    if "conversations" not in keys and (tabular or q or a):
        q, a = q or QUESTION_COLUMNS[0], a or ANSWER_COLUMNS[0]
        image_key = _first(keys, IMAGE_COLUMNS) or IMAGE_COLUMNS[0]
        return Schema("qa", "image / question / answer columns",
                      Fields(unit="row" if tabular else "record", id_required=False, image=image_key, turns=q,
                             columns=(q, a)), image_key=image_key, question_key=q, answer_key=a)
    return Schema("llava", "LLaVA conversations", Fields(unit="row" if tabular else "record"))

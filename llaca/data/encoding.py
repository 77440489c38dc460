"""The training encoding: a record's turns through the processor's chat template, loss on the answers only."""
from __future__ import annotations

import torch
from PIL import Image

from .checks import load_image
from .records import IMAGE_TOKEN, InvalidDataset, Problem, Record


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


def collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad a training batch (loss ignores the padding through labels = -100); with `pad_to_multiple_of`, to a
    multiple of that many tokens (as transformers' collators do): batches then come in a few shapes, which the CPU's
    kernels are set up for once each."""
    n = max(len(b["input_ids"]) for b in batch)
    n += -n % pad_to_multiple_of
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

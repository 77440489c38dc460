"""Evaluation: greedy answers on an instruction set, accuracy, and the A[j][i] matrix over a lineage.

Scoring (normalized exact match, IoU > 0.5 for boxes) and the continual-learning metrics live in
`metrics.py`; this module only runs the model.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from ..data import InstructionSet, load_image, to_messages
from . import metrics


@dataclasses.dataclass
class EvalResult:
    dataset: str
    accuracy: float  # percent
    n: int
    predictions: list[str]
    golds: list[str]

    def as_dict(self, with_predictions: bool = False) -> dict:
        out = {"dataset": self.dataset, "accuracy": round(self.accuracy, 2), "n": self.n}
        if with_predictions:
            out["predictions"] = self.predictions
        return out


@torch.inference_mode()
def generate_answers(model, processor, images, questions, batch_size: int = 32, max_new_tokens: int = 48,
                     progress: bool = False) -> list[str]:
    """Greedy answers to single-turn questions, batched with left padding."""
    answers: list[str] = []
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    model.eval()
    batches = range(0, len(questions), batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress, leave=False):
        qs = questions[start:start + batch_size]
        ims = images[start:start + batch_size]
        prompts = [processor.apply_chat_template(to_messages([(q, None)]), add_generation_prompt=True) for q in qs]
        inputs = processor(text=prompts, images=ims, padding=True, return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate(model, processor, dataset: InstructionSet, batch_size: int = 32, limit: int | None = None,
             progress: bool = False) -> EvalResult:
    """Accuracy on the first turn of each record; the set's own answers are the gold."""
    records = dataset.records[:limit] if limit else dataset.records
    images = [load_image(r.image) for r in records]
    questions = [r.question for r in records]
    golds = [r.answer for r in records]
    preds = generate_answers(model, processor, images, questions, batch_size=batch_size, progress=progress)
    return EvalResult(dataset.name, metrics.accuracy(preds, golds), len(records), preds, golds)


def accuracy_matrix(load, version_ids: list[str], test_sets: list[InstructionSet], progress: bool = True,
                    lower_triangle_only: bool = False) -> list[list[float | None]]:
    """A[j][i] = accuracy on test set i after stage j (version_ids[j]); `load(id) -> (model, processor)`."""
    matrix = []
    for j, vid in enumerate(tqdm(version_ids, desc="A-matrix", disable=not progress)):
        model, processor = load(vid)
        row = []
        for i, ts in enumerate(test_sets):
            if lower_triangle_only and i > j:
                row.append(None)
            else:
                row.append(evaluate(model, processor, ts).accuracy)
        matrix.append(row)
    return matrix


def zero_shot(model, processor, coin_root, limit: int | None, base_test: str | None) -> dict:
    """A model on every CoIN-mini task's test split before it learns any (and on the base's own test if given):
    the zero-shot row the base benchmarks report, and how many tasks sit in the 10-70% band."""
    from pathlib import Path

    from ..data import coin_mini, load_instruction_set

    row = {t: round(evaluate(model, processor, load_instruction_set(str(Path(coin_root) / t / "test")),
                             limit=limit).accuracy, 1) for t in coin_mini.DEFAULT_SEQUENCE}
    base_acc = round(evaluate(model, processor, load_instruction_set(base_test)).accuracy, 2) if base_test else None
    in_band = sum(10 <= v <= 70 for v in row.values())
    return {"zero_shot": row, "tasks_in_10_70": in_band, "base_test": base_acc}

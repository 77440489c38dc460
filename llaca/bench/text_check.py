"""The language check of a pretrained base: greedy answers to text-only prompts against the untouched SmolLM2's.

Its own module because both `bench small` (the base) and `bench quality` (the base after a stage sequence) run it.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..paths import ASSETS_DIR, atomic_write_json


def has_key(answer: str, keys: list[str]) -> bool:
    return any(re.search(r"(?<!\w)" + re.escape(k.lower()) + r"(?!\w)", answer.lower()) for k in keys)


def text_agreement(model, processor, max_new_tokens: int = 48, cache: Path | None = None) -> dict:
    """Both models' greedy answers to each prompt, and whether they agree on its key answer."""
    from ..bases.small_build import distill_chat

    prompts = json.loads((ASSETS_DIR / "small" / "text_check.json").read_text())["prompts"]
    ours = [a["answer"] for a in distill_chat(model, processor.tokenizer, [p["prompt"] for p in prompts],
                                              max_new_tokens)]
    theirs = reference_answers(prompts, max_new_tokens, cache)
    rows = [{"prompt": p["prompt"], "keys": p["keys"], "small": a, "smollm2": b,
             "small_has_key": has_key(a, p["keys"]), "smollm2_has_key": has_key(b, p["keys"])}
            for p, a, b in zip(prompts, ours, theirs)]
    agree = sum(r["small_has_key"] == r["smollm2_has_key"] for r in rows)
    return {"n": len(rows), "agreement": round(100 * agree / len(rows), 1),
            "small_key_accuracy": round(100 * sum(r["small_has_key"] for r in rows) / len(rows), 1),
            "smollm2_key_accuracy": round(100 * sum(r["smollm2_has_key"] for r in rows) / len(rows), 1),
            "identical_answers": sum(r["small"] == r["smollm2"] for r in rows), "rows": rows}


def reference_answers(prompts: list[dict], max_new_tokens: int, cache: Path | None) -> list[str]:
    """The untouched SmolLM2-135M-Instruct's greedy answers (the build's self-distillation call), cached in
    `cache` per prompt set: every version checked against it reuses one run of the reference."""
    from ..bases.small_build import distill_chat
    from ..models.small import load_language_model

    texts = [p["prompt"] for p in prompts]
    key = hashlib.sha256(json.dumps([texts, max_new_tokens]).encode()).hexdigest()[:12]
    file = Path(cache) / f"smollm2-text-check-{key}.json" if cache else None
    if file and file.is_file():
        return json.loads(file.read_text())
    reference, tokenizer = load_language_model()
    answers = [a["answer"] for a in distill_chat(reference, tokenizer, texts, max_new_tokens)]
    if file:
        atomic_write_json(file, answers)
    return answers

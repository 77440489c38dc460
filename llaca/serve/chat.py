"""Chat with a version: multi-turn, one image, streamed tokens.

This is the model-worker side of LLaVA's serve/ split: the UI passes plain text, an image and settings,
and gets strings back; it never touches tensors. `stream_answer` goes through `llaca.serve.batching`: answers asked
at the same time of the same model are generated in one batched `generate` call, each still streamed on its own.
(Before, each answer ran its own `generate` with a `TextIteratorStreamer`; `python -m experiments.overhead`
measures that code from its git commit against this one.)
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from ..data import load_image, to_messages
from .batching import Batcher, Request, consume

# Every batched answer of this process goes through one batcher (a 5 ms gathering window, up to 32 rows).
BATCHER = Batcher()


def _prepare(processor, image: Image.Image, history: list[tuple[str, str]], question: str):
    turns = list(history) + [(question, None)]
    prompt = processor.apply_chat_template(to_messages(turns, with_image=image is not None), add_generation_prompt=True)
    kwargs = {"text": [prompt], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image.convert("RGB")]
    return processor(**kwargs)


def _generation_kwargs(processor, max_new_tokens: int, temperature: float) -> dict:
    kw = {"max_new_tokens": max_new_tokens, "pad_token_id": processor.tokenizer.pad_token_id}
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=0.95)
    else:
        kw.update(do_sample=False)
    return kw


def stream_answer(model, processor, image: Image.Image | None, question: str, history=(), max_new_tokens: int = 64,
                  temperature: float = 0.0, stop_event: threading.Event | None = None) -> Iterator[str]:
    """Yield the answer as it grows (cumulative text). Answers requested at the same time of the same `model`
    share one batched `generate` (the caller must not switch its adapter meanwhile: `ModelPool.stream` does that
    for versions)."""
    yield from stream_batched(lambda: contextlib.nullcontext((model, processor)), processor, image, question,
                              history, max_new_tokens, temperature, stop_event, key=("model", id(model)))


def stream_batched(model_for: Callable, processor, image: Image.Image | None, question: str, history=(),
                   max_new_tokens: int = 64, temperature: float = 0.0, stop_event: threading.Event | None = None,
                   key: tuple = ()) -> Iterator[str]:
    """The answer as it grows, generated in a batch with the other requests of the same `key` (and sampling).

    The prompt and image are processed here, in the caller's thread; `model_for()` is entered around the batch
    (e.g. `ModelPool.use(version)`). Each update carries every token that arrived since the last one.
    """
    request = Request(_prepare(processor, image, history, question), int(max_new_tokens), stop_event)
    generation = _generation_kwargs(processor, max_new_tokens, temperature)
    del generation["max_new_tokens"], generation["pad_token_id"]  # per row / per batch in llaca.serve.batching
    BATCHER.submit((key, temperature if temperature and temperature > 0 else 0.0), request, model_for, generation)
    yield from consume(request, lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True).strip())


def at_most_every(texts: Iterator[str], seconds: float) -> Iterator[str]:
    """The first text at once, then at most one per `seconds` (the newest), and always the last: a UI update per
    token costs the server a Chatbot postprocess + diff + SSE message each, for text a reader cannot follow."""
    last, held = float("-inf"), None
    try:
        for text in texts:
            now = time.monotonic()
            if now - last >= seconds:
                last, held = now, None
                yield text
            else:
                held = text
        if held is not None:
            yield held
    finally:
        if hasattr(texts, "close"):
            texts.close()


@torch.inference_mode()
def answer_once(model, processor, image, question: str, history=(), max_new_tokens: int = 64,
                temperature: float = 0.0) -> str:
    """Non-streaming answer (CLI, evaluation of one sample)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = load_image(image)
    inputs = _prepare(processor, image, history, question).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, **_generation_kwargs(processor, max_new_tokens, temperature))
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

"""Batched chat generation: requests that arrive together for the same model share one `generate` call.

One forward pass over B rows costs little more than over one row (on a GPU almost nothing more; on a CPU the
small model is bound by per-call overhead, not arithmetic), so N users asking at once should cost about one
answer, not N. A request is prepared in its caller's thread (prompt + image processing) and handed to the
`Batcher` under a key (the model and the sampling settings). The first request of a key starts a batch thread that
waits `window_s` for others to arrive, left-pads them into one batch and runs `model.generate` once; requests that
arrive meanwhile form the next batch. A streamer hands every row its own tokens, so each request still streams its
own text and ends on its own: at its EOS, its own `max_new_tokens`, or its stop event (a per-row stopping criterion
tells `generate` to stop computing it). With left padding and the attention mask, a greedy answer is the same as
the answer the request gets alone (tests/test_batching.py).

Nothing here is CPU-specific: tensors go to the model's device and dtype; tokens come back through `generate`'s
streamer, which receives them on the host.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

_END = object()  # a row's queue ends with this (or with the exception that ended its batch)


@dataclasses.dataclass(eq=False)
class Request:
    """One prepared request: its processor outputs (batch of 1), its limits, and the queue of its new tokens."""

    inputs: dict                       # input_ids, attention_mask (1, L); pixel_values (1, ...) when it has an image
    max_new_tokens: int
    stop: threading.Event | None = None
    tokens: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    n_new: int = 0
    done: bool = False
    abandoned: bool = False            # the consumer went away: stop computing this row

    def stopped(self) -> bool:
        return self.abandoned or (self.stop is not None and self.stop.is_set())

    def push(self, token: int, eos_ids: set[int]) -> None:
        if self.done:
            return
        if token in eos_ids:
            return self.finish()
        self.tokens.put(token)
        self.n_new += 1
        if self.n_new >= self.max_new_tokens or self.stopped():
            self.finish()

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.tokens.put(error if error is not None else _END)


def left_pad(requests: list[Request], pad_token_id: int) -> dict:
    """One batch from single-row inputs: ids and mask left-padded to the longest prompt, images stacked in row
    order (the model scatters image features into the image tokens in order, so rows without an image are fine)."""
    width = max(r.inputs["input_ids"].shape[1] for r in requests)
    ids, mask = [], []
    for r in requests:
        row_ids, row_mask = r.inputs["input_ids"][0], r.inputs["attention_mask"][0]
        pad = width - row_ids.shape[0]
        ids.append(torch.cat([row_ids.new_full((pad,), pad_token_id), row_ids]))
        mask.append(torch.cat([row_mask.new_zeros(pad), row_mask]))
    batch = {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask)}
    pixels = [r.inputs["pixel_values"] for r in requests if "pixel_values" in r.inputs]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


class _RowStreamer(BaseStreamer):
    """`generate`'s streamer for a batch: the first `put` is the prompt, every later one a (batch,) step of tokens."""

    def __init__(self, requests: list[Request], eos_ids: set[int]):
        self.requests, self.eos_ids, self.prompt_seen = requests, eos_ids, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for request, token in zip(self.requests, value.reshape(-1).tolist()):
            request.push(token, self.eos_ids)

    def end(self):
        for request in self.requests:
            request.finish()


class _RowStops(StoppingCriteria):
    """Per-row stop: a row is done at its own token limit or when its user stops it (EOS is generate's own)."""

    def __init__(self, requests: list[Request], prompt_width: int):
        self.requests, self.prompt_width = requests, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        n_new = input_ids.shape[1] - self.prompt_width
        return torch.tensor([r.done or r.stopped() or n_new >= r.max_new_tokens for r in self.requests],
                            device=input_ids.device)


def generate_batch(model, processor, requests: list[Request], generation: dict) -> None:
    """Run one `generate` over `requests`, streaming each row's tokens into its own queue."""
    tokenizer = processor.tokenizer
    batch = left_pad(requests, tokenizer.pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    eos_ids.add(tokenizer.eos_token_id)
    try:
        with torch.inference_mode():
            model.generate(**batch, **generation, max_new_tokens=max(r.max_new_tokens for r in requests),
                           pad_token_id=tokenizer.pad_token_id, streamer=_RowStreamer(requests, eos_ids),
                           stopping_criteria=StoppingCriteriaList([_RowStops(requests, batch["input_ids"].shape[1])]))
    except BaseException as e:  # every waiting request gets the error, none hangs
        for request in requests:
            request.finish(e)
        raise
    finally:
        for request in requests:
            request.finish()


class Batcher:
    """Gathers requests per key and runs each gathered group as one `generate_batch` in a pooled thread.

    `model_for()` of a key's first request is entered around each batch: a context manager yielding
    (model, processor) — e.g. `ModelPool.use(version)`, which holds the model's lock and activates the version's
    adapter for the whole batch.
    """

    def __init__(self, window_s: float = 0.005, max_batch: int = 32, threads: int = 8):
        self.window_s, self.max_batch = window_s, max_batch
        self._pending: dict[tuple, list[tuple[Request, Callable, dict]]] = {}
        self._running: set[tuple] = set()
        self._lock = threading.Lock()  # guards the two above; held for microseconds, never during generation
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llaca-batch")
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows -> batches run (for benchmarks)

    def submit(self, key: tuple, request: Request, model_for: Callable, generation: dict) -> None:
        with self._lock:
            self._pending.setdefault(key, []).append((request, model_for, generation))
            if key in self._running:
                return
            self._running.add(key)
        self._threads.submit(self._run, key, torch.get_num_threads())

    def _run(self, key: tuple, n_threads: int) -> None:
        # A thread reports the caller's intra-op thread count, but its OpenMP/MKL pool runs at the machine default
        # until the count is set in that thread; a fresh thread would also pay that start-up every time. Measured
        # for one 10-token answer of the tiny model on 2 cores, 1 thread requested: new thread 46-48 ms, new thread
        # + set_num_threads 19-21 ms, pooled thread ~14 ms, generate() inline 12-14 ms. Hence pooled threads + this.
        torch.set_num_threads(n_threads)
        time.sleep(self.window_s)  # the gathering window: requests arriving together share the batch
        while True:
            with self._lock:
                waiting = self._pending.get(key, [])
                group = [item for item in waiting[: self.max_batch] if not item[0].stopped()]
                for request, _, _ in waiting[: self.max_batch]:
                    if request.stopped():
                        request.finish()
                del waiting[: self.max_batch]
                if not group and not waiting:
                    self._pending.pop(key, None)
                    self._running.discard(key)
                    return
            if not group:
                continue
            requests = [request for request, _, _ in group]
            self.batch_sizes[len(requests)] += 1
            try:
                with group[0][1]() as (model, processor):
                    generate_batch(model, processor, requests, group[0][2])
            except BaseException as e:  # noqa: BLE001 - already handed to each request; the batch loop goes on
                for request in requests:
                    request.finish(e)


def consume(request: Request, decode: Callable[[list[int]], str], timeout: float = 120.0) -> Iterator[str]:
    """The request's growing text: waits for its next token, takes every token already there, yields once."""
    tokens: list[int] = []
    sent = None  # so an empty answer is still yielded once, at its end
    try:
        while True:
            items = [request.tokens.get(timeout=timeout)]
            with contextlib.suppress(queue.Empty):
                while items[-1] is not _END and not isinstance(items[-1], BaseException):
                    items.append(request.tokens.get_nowait())
            tokens += [t for t in items if isinstance(t, int)]
            if isinstance(items[-1], BaseException):
                raise items[-1]
            end = items[-1] is _END
            text = decode(tokens) if tokens else ""
            # mid multi-byte character the tail decodes as U+FFFD: wait for the rest unless this is the end
            if text != sent and (end or not text.endswith("\ufffd")):
                sent = text
                yield text
            if end:
                return
    finally:
        request.abandoned = True

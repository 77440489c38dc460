"""Batched chat generation (llaca.serve.batching): answers generated together are the answers generated alone.

Greedy answers of prompts of different lengths (left padding), with and without an image and with an earlier turn,
batched in one `generate` call must equal `answer_once` (a bare `generate` per request); a row that stops or hits
its own token limit ends alone, the others are unaffected; concurrent `stream_answer` calls share a batch.
"""
from __future__ import annotations

import random
import threading

import pytest

from llaca.data import coin_mini
from llaca.serve.batching import Batcher, Request, consume, generate_batch
from llaca.serve.chat import _prepare, answer_once, stream_answer
from llaca.versions import Registry, load_version

MAX_NEW = 12


@pytest.fixture(scope="module")
def model_and_processor(chatty_home):
    return load_version(Registry(chatty_home), "chatty")


@pytest.fixture(scope="module")
def questions():
    """(image or None, question, history): prompts of different lengths, so the batch needs left padding."""
    rng = random.Random(3)
    out = []
    for name in ["colour_qa", "shape_qa", "textvqa", "gqa", "caption"]:
        image, question, _ = coin_mini.get_task(name).sample(rng)
        out.append((image, question, ()))
    image, question, answer = coin_mini.get_task("colour_qa").sample(rng)
    out.append((image, "And what shape is it?", ((question, answer),)))  # a second turn: the longest prompt
    out.append((None, "Say something.", ()))  # text only: no image tokens in this row
    return out


def _texts(processor, requests):
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    return [list(consume(r, decode))[-1:] or [""] for r in requests]


def test_batched_greedy_answers_equal_the_answers_alone(model_and_processor, questions):
    model, processor = model_and_processor
    alone = [answer_once(model, processor, img, q, history=h, max_new_tokens=MAX_NEW) for img, q, h in questions]
    assert len(set(alone)) > 2, alone  # the model says different things, so equality below means something
    requests = [Request(_prepare(processor, img, h, q), MAX_NEW) for img, q, h in questions]
    widths = {r.inputs["input_ids"].shape[1] for r in requests}
    assert len(widths) > 2  # padding really happens
    generate_batch(model, processor, requests, {"do_sample": False})
    assert [t[0] for t in _texts(processor, requests)] == alone


def test_a_row_stops_alone_and_the_others_are_unaffected(model_and_processor, questions):
    model, processor = model_and_processor

    class StopsAfterTwo(Request):
        def push(self, token, eos_ids):  # the user presses Stop while the second token is generated
            if self.n_new == 1:
                self.stop.set()
            super().push(token, eos_ids)

    alone = [answer_once(model, processor, img, q, history=h, max_new_tokens=MAX_NEW) for img, q, h in questions[:4]]
    prepared = [_prepare(processor, img, h, q) for img, q, h in questions[:4]]
    stopped = StopsAfterTwo(prepared[0], MAX_NEW, threading.Event())
    short = Request(prepared[1], 3)  # its own token limit, lower than the batch's
    requests = [stopped, short, Request(prepared[2], MAX_NEW), Request(prepared[3], MAX_NEW)]
    generate_batch(model, processor, requests, {"do_sample": False})
    texts = [t[0] for t in _texts(processor, requests)]
    assert stopped.n_new == 2 and alone[0].startswith(texts[0])
    short_alone = answer_once(model, processor, questions[1][0], questions[1][1], max_new_tokens=3)
    assert short.n_new <= 3 and texts[1] == short_alone
    assert texts[2:] == alone[2:]


def test_concurrent_stream_answers_share_one_batch(model_and_processor, questions, monkeypatch):
    model, processor = model_and_processor
    batcher = Batcher(window_s=0.2)  # a wide window, so threads started together surely meet
    monkeypatch.setattr("llaca.serve.chat.BATCHER", batcher)
    alone = [answer_once(model, processor, img, q, history=h, max_new_tokens=MAX_NEW) for img, q, h in questions]
    results = [None] * len(questions)

    def ask(k):
        img, q, h = questions[k]
        results[k] = list(stream_answer(model, processor, img, q, history=h, max_new_tokens=MAX_NEW))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[-1] if r else "" for r in results] == alone
    assert sum(batcher.batch_sizes.values()) < len(questions)  # fewer generate calls than answers
    assert max(batcher.batch_sizes) > 1


# ------------------------------------------------------------------------------------------ the chat hot path

def test_the_pool_resolves_a_version_once_until_the_registry_changes(llaca_home, monkeypatch):
    """No meta.json is read per answer; a version created or deleted meanwhile is seen at once."""
    from llaca.serve.serving import ModelPool
    from llaca.versions import VersionError

    registry = Registry(llaca_home)
    pool = ModelPool(registry)
    reads = []
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda ref=None: reads.append(ref) or real_get(ref))
    assert not pool.is_loaded("base")
    with pool.use("base"):
        pass
    assert pool.is_loaded("base")
    reads.clear()
    for _ in range(5):
        assert pool._version("base").id == "base"
    assert reads == []
    extra = registry.create({"name": "x", "parent": "base", "weights": "full"}, lambda tmp: None)
    assert pool._version(extra.id).id == extra.id  # created after the cache was filled
    registry.delete(extra.id)
    with pytest.raises(VersionError):
        pool._version(extra.id)


def test_a_conversation_decodes_its_image_once(tmp_path):
    from PIL import Image

    from app.chat_tab import ImageCache

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    cache = ImageCache(size=2)
    first = cache.get(str(path))
    assert cache.get(str(path)) is first  # the second turn reuses the decoded image
    Image.new("RGB", (32, 32), (10, 200, 10)).save(path)  # replaced in place: decoded again
    assert cache.get(str(path)).size == (32, 32)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(Exception, match="bad.png"):
        cache.get(str(tmp_path / "bad.png"))

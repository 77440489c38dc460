"""Serving many versions from few models: one loaded base per base weights, each LoRA version a named adapter on it.

A 7B base is 14 GB; its LoRA versions are a few MB each. So chat and compare must not load the base once per
version: `ModelPool` keeps one model per (base version, quantization) and loads every LoRA version on it as a peft
adapter (`PeftModel.load_adapter(path, adapter_name=...)`), switching with `set_adapter`; the base version itself
answers through the same model with the adapters disabled. Full-weight versions (the tiny model's) are just
cached whole. Loaded models are kept in a small LRU. On a CPU, a model whose LM weights do not fit in the caches
decodes one user's tokens with fp16 copies of them (`llaca.serve.half_decode`).

One model holds one active adapter at a time, so every use goes through `pool.use(version)`, which takes that
model's lock, activates the version's adapter and yields (model, processor): generations with different adapters
on one model never interleave. `pool.stream` holds it per *batch* of answers (`llaca.serve.batching`): answers asked of
one version at the same time are generated together. The hot path reads no files: resolved versions are cached
while the registry folder is unchanged (one `stat` per answer).

    pool = ModelPool(registry)
    with pool.use("v3") as (model, processor):
        answer = answer_once(model, processor, image, question)
    for text in pool.stream("v3", image, question):   # batched with other answers of v3 asked meanwhile
        ...
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Iterator

from ..versions import Registry, Version, load_base
from .half_decode import enable_half_decode


@dataclasses.dataclass
class _Loaded:
    """A loaded model, its processor, the lock that serializes its use, and its adapters ((id, created) -> name)."""

    model: object
    processor: object
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    adapters: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)  # (id, created)
    n_named: int = 0


class ModelPool:
    """Loaded models shared by all sessions: bases with adapters, and whole full-weight versions (LRU).

    `max_models`: models kept loaded (bases + full versions); `max_adapters`: adapters kept per base.
    `loads` counts base/full model loads (what the pool exists to avoid repeating).
    """

    def __init__(self, registry: Registry, max_models: int = 4, max_adapters: int = 16, dtype=None):
        self.registry = registry
        self.max_models = max_models
        self.max_adapters = max_adapters
        self.dtype = dtype
        self.loads = 0
        self._models: collections.OrderedDict[tuple, _Loaded] = collections.OrderedDict()
        self._pool_lock = threading.Lock()       # guards the dict; loading happens under the entry's key lock
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._versions: dict[str, tuple[int, Version]] = {}  # version id -> (registry folder mtime, version)

    # ------------------------------------------------------------------ public
    @contextlib.contextmanager
    def use(self, ref: str, bits="auto"):
        """Yield (model, processor) answering as version `ref`, holding that model's lock meanwhile.

        Do not nest two `use` blocks on versions sharing a base: the inner one would wait for the outer forever.
        """
        from peft import PeftModel

        version = self._version(ref)
        entry = self._entry(version, bits)
        with entry.lock:
            if version.weights == "lora":
                name = self._ensure_adapter(entry, version)
                entry.model.set_adapter(name, inference_mode=True)
                yield entry.model, entry.processor
            elif isinstance(entry.model, PeftModel):  # the base itself, served from a model holding adapters
                with entry.model.disable_adapter():
                    yield entry.model, entry.processor
            else:
                yield entry.model, entry.processor

    def answer(self, ref: str, image, question: str, history=(), **generation) -> str:
        """One greedy (or sampled) answer from version `ref`."""
        from .chat import answer_once

        with self.use(ref) as (model, processor):
            return answer_once(model, processor, image, question, history=history, **generation)

    def stream(self, ref: str, image, question: str, history=(), **generation) -> Iterator[str]:
        """The growing answer of version `ref`, generated in one batch with the other answers of `ref` asked at the
        same time; the model is locked (and the version's adapter active) per batch."""
        from .chat import stream_batched

        version = self._version(ref)
        processor = self._entry(version, "auto").processor
        yield from stream_batched(lambda: self.use(version.id), processor, image, question, history,
                                  key=("version", version.id, version.created), **generation)

    def is_loaded(self, ref: str) -> bool:
        """Whether `ref` can answer without loading anything (its model, and its adapter if it has one)."""
        version = self._version(ref)
        base = self._version(version.meta["base_version"]) if version.weights == "lora" else version
        with self._pool_lock:
            entry = self._models.get((base.id, base.created, version.meta.get("quant_bits")))
        return entry is not None and (version.weights != "lora" or (version.id, version.created) in entry.adapters)

    def forget(self, ref_or_id: str) -> None:
        """Drop a deleted version: its whole model if it was loaded as one, else its adapter (and a base left with
        no adapters, since peft cannot serve a PeftModel without one: it reloads on demand)."""
        from peft import PeftModel

        self._versions.clear()
        with self._pool_lock:
            for key in [k for k in self._models if k[0] == ref_or_id]:
                del self._models[key]
            entries = list(self._models.items())
        for model_key, entry in entries:
            with entry.lock:
                for key in [k for k in entry.adapters if k[0] == ref_or_id]:
                    entry.model.delete_adapter(entry.adapters.pop(key))
                if not entry.adapters and isinstance(entry.model, PeftModel):
                    with self._pool_lock:
                        self._models.pop(model_key, None)

    def loaded(self) -> dict[str, list[str]]:
        """What is in memory: model key -> adapter version ids (for a status line)."""
        with self._pool_lock:
            return {f"{k[0]}@{k[2] or 'full'}": [a[0] for a in e.adapters] for k, e in self._models.items()}

    # ------------------------------------------------------------------ internals
    def _version(self, ref: str) -> Version:
        """`registry.get(ref)` without reading every meta.json per answer: a version id resolved before is reused
        while the registry folder's mtime is unchanged (creating or deleting a version changes it; what serving
        reads of a version, its weights, base and creation time, never changes in place)."""
        stamp = self.registry.root.stat().st_mtime_ns
        hit = self._versions.get(ref)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        version = self.registry.get(ref)
        if version.id == ref:  # names can be renamed in place: resolve them every time
            self._versions[ref] = (stamp, version)
        return version

    def _entry(self, version: Version, bits) -> _Loaded:
        """The loaded model `version` runs on, loading it (once, even under concurrent requests) if needed."""
        base = self._version(version.meta["base_version"]) if version.weights == "lora" else version
        bits = version.meta.get("quant_bits") if bits == "auto" else bits
        key = (base.id, base.created, bits)  # created: an id reused after a delete must not hit a stale model
        with self._pool_lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._pool_lock:
                if key in self._models:
                    return self._models[key]
            model, processor = load_base(base, dtype=self.dtype, bits=bits)
            model.eval()
            enable_half_decode(model)  # one user's tokens ~1.8x faster on a CPU (llaca.serve.half_decode)
            entry = _Loaded(model, processor)
            with self._pool_lock:
                self.loads += 1
                self._models[key] = entry
                self._key_locks.pop(key, None)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
        return entry

    def _ensure_adapter(self, entry: _Loaded, version: Version) -> str:
        """The adapter name of `version` on `entry.model` (caller holds entry.lock), loading it if needed."""
        from peft import PeftModel

        key = (version.id, version.created)  # an id reused after a delete must not get the old adapter
        if key in entry.adapters:
            entry.adapters.move_to_end(key)
            return entry.adapters[key]
        entry.n_named += 1
        name = f"adapter{entry.n_named}"  # version ids may hold '.', which module names cannot
        path = version.path / "adapter"
        if isinstance(entry.model, PeftModel):
            entry.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            entry.model = PeftModel.from_pretrained(entry.model, path, adapter_name=name, is_trainable=False)
            entry.model.eval()
        entry.adapters[key] = name
        while len(entry.adapters) > self.max_adapters:
            _, old = entry.adapters.popitem(last=False)
            entry.model.delete_adapter(old)
        return name

"""Base v1 (superseded by v2, kept to rebuild and compare): the tiny base's first recipe, from nothing, offline.

LLaVA's own recipe, shrunk: (0) a tokenizer trained on the task texts, (1) a vision encoder pre-trained on
its own (here: auxiliary classification of the synthetic scenes, standing in for CLIP's pre-training;
end-to-end training from scratch never learns shapes at this size), then frozen, (2) projector + language
model trained on the base mixture (captioning + simple QA = alignment + instruction tuning), run as an
ordinary `seq` stage through the same tuner every other stage uses. Deterministic for a seed.
"""
from __future__ import annotations

import random
import time

import torch
from tqdm.auto import tqdm

from ..data import coin_mini
from ..models.llava import TinySpec, build_model, build_processor, train_tokenizer
from ..versions import Registry, Version
from .publish import train_and_publish

VISION_STEPS = 3000  # word reading needs it: linear-probe word accuracy 86% at 800 steps, 99% at 3000 (measured)


VISION_BATCH = 64


BASE_STEPS = 1500


BASE_BATCH = 32


BASE_LR = 3e-3


def base_tokenizer(seed: int = 0, spec: TinySpec = TinySpec()):
    """The byte-level BPE of the base model, trained on every CoIN-mini and base-task text (and the chat roles)."""
    return train_tokenizer(coin_mini.all_texts(seed) + ["USER: ASSISTANT:"], spec.vocab_size)


def weighted_loss(logits: dict, labels: dict):
    """Sum of the heads' cross-entropies, each weighted by `coin_mini.AUX_WEIGHTS` (1 when not listed)."""
    return sum(coin_mini.AUX_WEIGHTS.get(k, 1.0) * torch.nn.functional.cross_entropy(lg, labels[k])
               for k, lg in logits.items())


def pretrain_vision(model, processor, steps: int, seed: int, on_event=None) -> float:
    """Train the CLIP tower + linear heads on `coin_mini.aux_batch` labels; return final head accuracy."""
    vision = model.model.vision_tower
    n_tokens = (processor.image_processor.size["height"] // model.config.vision_config.patch_size) ** 2
    width = model.config.vision_config.hidden_size
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(n_tokens * width, n) for k, n in coin_mini.AUX_HEADS.items()})
    pooled = torch.nn.ModuleDict({k: torch.nn.Linear(width, coin_mini.AUX_HEADS[k]) for k in coin_mini.AUX_POOLED_HEADS})
    params = list(vision.parameters()) + list(heads.parameters()) + list(pooled.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    vision.train()
    acc = 0.0
    for step in tqdm(range(steps), desc="vision pre-training", leave=False):
        images, labels = coin_mini.aux_batch(rng, VISION_BATCH)
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        # The features LLaVA reads: last hidden layer, CLS dropped ("default" strategy).
        tokens = vision(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = {k: h(tokens.flatten(1)) for k, h in heads.items()}
        mean_logits = {k: h(tokens.mean(1)) for k, h in pooled.items()}
        loss = weighted_loss(logits, labels) + weighted_loss(mean_logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 20:  # mean head accuracy over the last batches (flattened and pooled heads)
            correct = [(lg.argmax(-1) == labels[k]).float().mean().item()
                       for d in (logits, mean_logits) for k, lg in d.items()]
            acc += sum(correct) / len(correct) / 20
        if on_event and step % 10 == 0:
            on_event({"type": "step", "phase": "vision", "step": step + 1, "total_steps": steps, "loss": loss.item()})
    vision.eval()
    return acc * 100


def build_base(registry: Registry | None = None, seed: int = 0, spec: TinySpec = TinySpec(),
               vision_steps: int = VISION_STEPS, base_steps: int = BASE_STEPS, n_train: int = 6000,
               n_test: int = 150, on_event=None, version_id: str = "base") -> Version:
    """Build the base model and register it as `version_id` (default `base`)."""
    registry = registry or Registry()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible for a seed (and, measured here, faster for a model this small)
    try:
        return _build_base(registry, seed, spec, vision_steps, base_steps, n_train, n_test, on_event, version_id)
    finally:
        torch.set_num_threads(threads)


def _build_base(registry, seed, spec, vision_steps, base_steps, n_train, n_test, on_event, version_id) -> Version:
    t0 = time.time()
    torch.manual_seed(seed)
    data_root = registry.home / "datasets" / f"base-mixture-seed{seed}"
    if not (data_root / "base" / "test" / "data.json").is_file():
        coin_mini.write_base_mixture(data_root, seed=seed, n_train=n_train, n_test=n_test)
    processor = build_processor(base_tokenizer(seed, spec), spec)
    model = build_model(processor, spec, seed=seed)
    vision_acc = pretrain_vision(model, processor, vision_steps, seed, on_event)
    t_vision = time.time() - t0

    build = {"seed": seed, "vision_steps": vision_steps, "base_steps": base_steps, "n_train": n_train,
             "n_test": n_test, "vision_seconds": round(t_vision, 1), "spec": spec.__dict__}
    return train_and_publish(registry, model, processor, data_root / "base" / "train", build, vision_acc, t0,
                             lr=BASE_LR, batch_size=BASE_BATCH, on_event=on_event, version_id=version_id)

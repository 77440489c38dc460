"""Base v2, the shipped `base`: a foundation pre-trained on real drawings, emoji, fonts and many instruction formats.

`python -m llaca build-base` builds it (`--recipe v1`: the previous base, kept in `assets/base_v1`). What it is:
(0) a byte-level BPE trained on the world's texts (no CoIN-mini text), (1) a CLIP tower (128x4, wider than v1's)
pre-trained on `llaca.data.world` scenes with one head per label the world knows (fine sprite label, group, shape,
colour, count, region, word; mean-pooled and, for the spatial ones, flattened features), then frozen; (2) projector
+ LM (v1's size) first aligned on one fixed question per visual attribute (LLaVA's stage 1, shrunk), then
instruction-tuned on eleven families in many phrasings with 30% of the alignment questions rehearsed, each phase a
`seq` stage through the tuner, at lr 5e-4: at v1's 3e-3 a fresh LM stayed at the answer priors on any mixture of
questions (`python -m experiments.grounding --lrs`; the first v2 builds scored 31% on their own test). Measured
numbers (own test, zero-shot CoIN-mini, held-out real images, cost): docs/base-models.md "Base v2".
Deterministic for a seed (one torch thread).
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import world as base_world
from ..data.world import N_TEST, N_TRAIN, ensure_alignment, ensure_mixture
from ..models.llava import TinySpec, build_model, build_processor, train_tokenizer
from ..versions import Registry, Version
from .publish import train_and_publish

SPEC = TinySpec(vision_hidden=128, vision_layers=4, vocab_size=3072)
VISION_STEPS = 3000
VISION_BATCH = 64
VISION_LR = 2e-3
# Alignment before the instructions (`base_world.attribute_sample`, LLaVA's stage 1 shrunk; why: `python -m llaca.bench
# grounding`): one fixed question per attribute, all six together. At lr 3e-3 a fresh LM stays at the answer priors
# on any mix of attributes (three phases of 800 steps measured no better than none: 31.0%); at 5e-4 it grounds them.
ALIGN_PHASES = (base_world.ATTRIBUTES,)
ALIGN_STEPS = 1600
ALIGN_RECORDS = 8000
REHEARSAL = 0.3  # share of attribute questions in the instruction phase's training records
BASE_STEPS = 2400  # instruction steps after alignment (4,000 LM steps in all, as before)
BASE_BATCH = 16
BASE_LR = 5e-4  # 3e-3 (v1's) kept a fresh LM at the answer priors on any multi-question mixture (grounding bench)
FLAT_HEADS = ("region", "count", "word", "shape", "colour")  # heads that also read where things are


def tokenizer(seed: int = 0, spec: TinySpec = SPEC):
    return train_tokenizer(base_world.all_texts(seed) + ["USER: ASSISTANT:"], spec.vocab_size)


def weighted_loss(logits: dict, labels: dict):
    """Sum of the heads' cross-entropies (label -100 = not applicable), weighted by `base_world.AUX_WEIGHTS`."""
    total = 0.0
    for k, lg in logits.items():
        if (labels[k] != -100).any():
            total = total + base_world.AUX_WEIGHTS.get(k, 1.0) * torch.nn.functional.cross_entropy(
                lg, labels[k], ignore_index=-100)
    return total


def _head_accuracy(logits: dict, labels: dict) -> float:
    accs = [(lg.argmax(-1)[labels[k] != -100] == labels[k][labels[k] != -100]).float().mean().item()
            for k, lg in logits.items() if (labels[k] != -100).any()]
    return sum(accs) / max(len(accs), 1)


def pixels(processor, images) -> torch.Tensor:
    """The image processor's normalisation without its PIL round trip (9x faster; identical for 64 px RGB)."""
    ip = processor.image_processor
    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(ip.image_mean).view(1, 3, 1, 1), torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (arr * ip.rescale_factor - mean) / std


def pretrain_vision(model, processor, steps: int, seed: int, on_event=None, dense: bool = False) -> float:
    """Train the CLIP tower + linear heads on `base_world.aux_batch` labels; return the final mean head accuracy.

    `dense` adds per-token heads (`base_world.dense_labels`): every image token learns what it shows. Not adopted:
    it lifts per-token probes (shape 42 -> 58%, colour 77 -> 93%) but not what a fresh LM learns on the tower
    (grounding bench 34.0 vs 35.5%; bench_results/base_v2/README.md, "oracle image tokens")."""
    vision = model.model.vision_tower
    grid = processor.image_processor.size["height"] // model.config.vision_config.patch_size
    n_tokens, width = grid * grid, model.config.vision_config.hidden_size
    torch.manual_seed(seed)
    spec = base_world.aux_heads()
    pooled = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in spec.items()})
    flat = torch.nn.ModuleDict({k: torch.nn.Linear(n_tokens * width, spec[k]) for k in FLAT_HEADS})
    per_token = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in base_world.dense_heads().items()}
                                    if dense else {})
    params = [*vision.parameters(), *pooled.parameters(), *flat.parameters(), *per_token.parameters()]
    opt = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=VISION_LR, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    vision.train()
    acc, last = 0.0, min(20, steps)
    for step in tqdm(range(steps), desc="vision pre-training (v2)", leave=False):
        images, labels = base_world.aux_batch(rng, VISION_BATCH, dense_grid=grid if dense else 0)
        # The features LLaVA reads: last hidden layer, CLS dropped ("default" strategy) or kept ("full"). Kept, the
        # CLS token is what the pooled heads read, so the LM gets one token that sums the image up.
        hidden = vision(pixels(processor, images), output_hidden_states=True).hidden_states[-1]
        tokens = hidden[:, 1:]
        summary = hidden[:, 0] if model.config.vision_feature_select_strategy == "full" else tokens.mean(1)
        pooled_logits = {k: h(summary) for k, h in pooled.items()}
        flat_logits = {k: h(tokens.flatten(1)) for k, h in flat.items()}
        loss = weighted_loss(pooled_logits, labels) + weighted_loss(flat_logits, labels)
        if dense:
            token_logits = {k: h(tokens).flatten(0, 1) for k, h in per_token.items()}
            loss = loss + weighted_loss(token_logits, {k: labels[k].flatten() for k in per_token})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - last:
            acc += _head_accuracy(pooled_logits, labels) / last
        if on_event and step % 10 == 0:
            on_event({"type": "step", "phase": "vision", "step": step + 1, "total_steps": steps, "loss": loss.item()})
    vision.eval()
    return acc * 100


def build_base_v2(registry: Registry | None = None, seed: int = 0, vision_steps: int = VISION_STEPS,
                  base_steps: int = BASE_STEPS, n_train: int = N_TRAIN, n_test: int = N_TEST, on_event=None,
                  version_id: str = "base-v2", align_steps: int = ALIGN_STEPS, align_records: int = ALIGN_RECORDS,
                  rehearsal: float = REHEARSAL) -> Version:
    """Build base v2 and register it as `version_id` (a root version beside `base`).

    `align_steps=0` skips the alignment phases (and rehearsal); the first builds did that, at lr 3e-3 (31.0% on
    their test).
    """
    registry = registry or Registry()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible for a seed
    try:
        t0 = time.time()
        torch.manual_seed(seed)
        rehearsal = rehearsal if align_steps else 0.0
        data_root = ensure_mixture(registry, seed, n_train, n_test, rehearsal=rehearsal)
        phases = [(ensure_alignment(registry, seed, attrs, align_records) / "train", align_steps)
                  for attrs in (ALIGN_PHASES if align_steps else ())]
        phases.append((data_root / "base" / "train", base_steps))
        processor = build_processor(tokenizer(seed, SPEC), SPEC)
        model = build_model(processor, SPEC, seed=seed)
        vision_acc = pretrain_vision(model, processor, vision_steps, seed, on_event)
        build = {"world": "v2", "seed": seed, "vision_steps": vision_steps, "base_steps": base_steps,
                 "align_steps": align_steps, "align_phases": [list(a) for a in ALIGN_PHASES] if align_steps else [],
                 "rehearsal": rehearsal, "lr": BASE_LR, "data_version": base_world.DATA_VERSION,
                 "n_train": n_train, "n_test": n_test,
                 "vision_seconds": round(time.time() - t0, 1), "spec": SPEC.__dict__}
        return train_and_publish(registry, model, processor, data_root / "base" / "train", build, vision_acc, t0,
                                 lr=BASE_LR, batch_size=BASE_BATCH, on_event=on_event, version_id=version_id,
                                 phases=phases)
    finally:
        torch.set_num_threads(threads)

"""Build the embedded default model (version `base`) from nothing, offline, in a few minutes on 2 cores.

LLaVA's own recipe, shrunk: (0) a tokenizer trained on the task texts, (1) a vision encoder pre-trained on
its own (here: auxiliary classification of the synthetic scenes, standing in for CLIP's pre-training;
end-to-end training from scratch never learns shapes at this size), then frozen, (2) projector + language
model trained on the base mixture (captioning + simple QA = alignment + instruction tuning), run as an
ordinary `seq` stage through the same tuner every other stage uses. Deterministic for a seed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import coin_mini
from .model import TinySpec, build_model, build_processor, count_parameters, save_pretrained, train_tokenizer
from .paths import ASSETS_DIR
from .versions import Registry, Version

VISION_STEPS = 3000  # word reading needs it: linear-probe word accuracy 86% at 800 steps, 99% at 3000 (measured)
VISION_BATCH = 64
BASE_STEPS = 1500
BASE_BATCH = 32
BASE_LR = 3e-3
SHIPPED_BASE = ASSETS_DIR / "base"


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


def own_test_accuracy(meta: dict, train_dir) -> float | None:
    """A stage's accuracy on its own test split (`<set>-test`), not on the earlier stages' splits it also reports."""
    test = meta["metrics"].get("test", {})
    own = test.get(f"{Path(train_dir).parent.name}-test") or (list(test.values())[-1] if test else {})
    return own.get("accuracy")


def train_and_publish(registry: Registry, model, processor, train_dir: Path, build: dict, vision_acc: float,
                      t0: float, lr: float, batch_size: int, on_event, version_id: str,
                      phases: list[tuple[Path, int]] | None = None) -> Version:
    """Learn the base data as `seq` stages from the pre-trained tower, then register the result as a root version.

    `phases`: [(train dir, steps)] learned one after the other (default: `train_dir` for `build["base_steps"]`);
    the last one's test split gives the base accuracy. The initial model is staged in a scratch registry so every
    phase runs through the same tuner every other stage uses; what gets published is the last phase's result with
    `build` (recipe, sizes, timings, each phase's own test accuracy) in the meta.
    """
    from .tuner import StageConfig, run_stage

    phases = phases or [(train_dir, build["base_steps"])]
    with tempfile.TemporaryDirectory(dir=registry.home, prefix=".build-") as scratch:
        scratch_reg = Registry(scratch)
        scratch_reg.create({"name": "init", "parent": None, "weights": "full"},
                           lambda tmp: save_pretrained(model, processor, tmp / "model"), version_id="init")
        parent, phase_log = "init", []
        for k, (data, steps) in enumerate(phases):
            cfg = StageConfig(data=str(data), method="seq", parent=parent, lr=lr, batch_size=batch_size,
                              max_steps=steps, warmup_ratio=0.05, seed=build["seed"], checkpoint_every=0,
                              name=version_id if k == len(phases) - 1 else f"{version_id}-phase{k + 1}")
            built = run_stage(cfg, scratch_reg, on_event=on_event)
            parent = built.id
            phase_log.append({"data": Path(data).parent.name, "steps": steps,
                              "test_accuracy": own_test_accuracy(built.meta, data)})
        meta = {k: v for k, v in built.meta.items() if k not in ("id", "created")}
        meta.update(
            parent=None,
            method="pretrain",
            metrics={**meta["metrics"], "base_accuracy": own_test_accuracy(built.meta, phases[-1][0]),
                     "vision_aux_accuracy": round(vision_acc, 2)},
            build={**build, "seconds": round(time.time() - t0, 1), "parameters": count_parameters(model),
                   "test_sha256": split_fingerprint(Path(phases[-1][0]).parent / "test"),
                   **({"phases": phase_log} if len(phases) > 1 else {})},
        )

        def write(tmp: Path):
            for item in built.path.iterdir():
                if item.name != "meta.json":
                    shutil.move(str(item), tmp / item.name)

        return registry.create(meta, write, version_id=version_id)


# The two embedded bases, by the name people pick them with -> their version id in the registry. `tiny` keeps the
# id `base` it has had since v1 (every lineage, benchmark and test names it); `small` is base v3.
BASES = {"small": "small", "tiny": "base"}
DEFAULT_BASE = "small"
BASE_DESCRIPTIONS = {
    "small": "base v3, an ImageNet EfficientNet-Lite2 tower + a trained projector + SmolLM2-135M-Instruct with "
             "trained LoRA (140M parameters, assembled from pretrained wheels)",
    "tiny": "base v2, a 3M-parameter LLaVA trained from nothing on two cores (fast; for tests and sweeps)",
}


def default_base() -> str:
    """The base the app and the CLI start from: `$LLACA_BASE` (what `--base` sets), else `small`."""
    import os

    name = os.environ.get("LLACA_BASE", DEFAULT_BASE)
    if name not in BASES:
        raise ValueError(f"LLACA_BASE={name!r}: the embedded bases are {', '.join(BASES)}")
    return name


def base_version_id(base: str | None = None) -> str:
    return BASES[base or default_base()]


def ensure_base(registry: Registry | None = None, on_event=None, base: str | None = None) -> Version:
    """The chosen base version (default `default_base()`): already registered, else installed, else built.

    `tiny`: copied from the shipped `assets/base` (or built from nothing if that is missing). `small`: assembled
    from the pretrained wheels + the shipped adapter (`llaca.small_base.install_small`, well under a minute).
    """
    registry = registry or Registry()
    base = base or default_base()
    vid = base_version_id(base)
    if registry.exists(vid):
        return registry.get(vid)
    with registry.lock(f"build-{vid}"):
        if registry.exists(vid):  # another process made it while we waited
            return registry.get(vid)
        if base == "small":
            from .small_base import install_small

            return install_small(registry, on_event=on_event, version_id=vid)
        if (SHIPPED_BASE / "meta.json").is_file():
            return install_shipped_base(registry)
        from .base_build_v2 import build_base_v2  # the default recipe since base v2 shipped

        return build_base_v2(registry, on_event=on_event, version_id="base")


def split_fingerprint(split_dir: Path) -> str:
    """sha256 over a split's data.json and its images' decoded pixels (sorted; not the PNG bytes, which change with
    the zlib build): names the exact records a figure was scored on."""
    from PIL import Image

    split_dir = Path(split_dir)
    h = hashlib.sha256((split_dir / "data.json").read_bytes())
    for f in sorted(p for p in split_dir.rglob("*") if p.is_file() and p.name != "data.json"):
        h.update(f.relative_to(split_dir).as_posix().encode())
        with Image.open(f) as im:
            h.update(im.convert("RGB").tobytes())
    return h.hexdigest()


class StaleTestSplit(ValueError):
    """Today's generator rebuilt a base's test split with other records than the base was scored on."""


def check_test_split(build: dict, split_dir: Path, strict: bool = True) -> None:
    """Raise `StaleTestSplit` (or, not `strict`, log it) if `split_dir` is not the split `build.test_sha256` names."""
    expected = build.get("test_sha256")
    if not expected:
        return  # a base built before the fingerprint was recorded: nothing to compare with
    got = split_fingerprint(split_dir)
    if got != expected:
        msg = (f"{split_dir}: other test records than the base was scored on (build.test_sha256 {expected[:12]}, "
               f"these {got[:12]}): today's generator differs from the build's; score it with the code it was "
               "built with, or rebuild the base (python -m llaca build-base)")
        if strict:
            raise StaleTestSplit(msg)
        logging.getLogger(__name__).warning(msg)


def base_data_root(registry: Registry, build: dict, strict: bool = False) -> Path:
    """The folder of a base's own mixture as its `build` meta describes it, with the test split written.

    Base v2's training split (16,000 records) is not written here: `base_build_v2.ensure_mixture` writes it when
    wanted (stages never read it: replay draws from the version's own `replay/` folder), so installing stays fast.
    The split is regenerated from the build seed by *today's* generator; where the meta records the fingerprint of
    the split the base was scored on (`build.test_sha256`), a mismatch raises `StaleTestSplit` (`strict`, what the
    benchmarks use: they would score other records) or is logged (installing: the app still starts).
    """
    seed = build.get("seed", 0)
    if build.get("world") == "v2":
        from .base_build_v2 import ensure_mixture

        root = ensure_mixture(registry, seed, build["n_train"], build["n_test"], splits=("test",),
                              rehearsal=build.get("rehearsal", 0.0))
    else:
        root = registry.home / "datasets" / f"base-mixture-seed{seed}"
        if not (root / "base" / "test" / "data.json").is_file():
            coin_mini.write_base_mixture(root, seed=seed, n_train=build.get("n_train", 6000),
                                         n_test=build.get("n_test", 150))
    check_test_split(build, root / "base" / "test", strict)
    return root


def install_shipped_base(registry: Registry) -> Version:
    """Register `assets/base` as `base`; its data paths are re-pointed at a locally regenerated base mixture."""
    meta = json.loads((SHIPPED_BASE / "meta.json").read_text())
    data_root = base_data_root(registry, meta.get("build", {}))
    meta = {k: v for k, v in meta.items() if k not in ("id", "created")}
    meta["stage"] = {**meta.get("stage", {}), "path": str(data_root / "base" / "train"),
                     "test_path": str(data_root / "base" / "test")}

    def write(tmp: Path):
        for item in SHIPPED_BASE.iterdir():
            if item.name != "meta.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

    return registry.create(meta, write, version_id="base")

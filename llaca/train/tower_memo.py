"""The frozen front of a CNN vision tower, computed once per image in a stage instead of on every step.

`small`'s stage adapts only the last block and head of its EfficientNet (`vision_blocks=1`) or none of it; every block
before the first that learns is frozen and in eval mode (`tuner.keep_frozen_in_eval`: BatchNorm statistics fixed,
drop-connect off), so its output for an image is the same on every pass over the set. A stage passes over a small
set several times (`min_records`), and the tower's forward is ~7% of a step of `small` (55 ms of ~0.76 s for 2
images, bf16, 2 threads), so the frozen front is remembered per image, keyed by a digest of its pixels (a jittered
image, new every step, is simply computed), and only the blocks that learn run on every step.

Only while a stage trains, on CPU, in one process, without image jitter (`tuner.StageRecipe.train`; on a GPU the
front costs little and each digest would copy the image to the host). The evaluation, the saved version and serving
run the tower as it is. No module is moved or renamed (parameter names, checkpoints and the state dict are
untouched): while the memo is active the embeddings' forward returns the remembered output of the frozen blocks, and
those blocks pass their input on.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

MAX_BYTES = 1 << 30  # ~50,000 images of `small` (208 x 7 x 7 bf16 values, 20 KB each); past it, images are computed


class FrozenPrefixMemo:
    """Outputs of `embeddings` followed by `blocks` (all frozen), per image, for one stage."""

    def __init__(self, embeddings: torch.nn.Module, blocks: list[torch.nn.Module], max_bytes: int = MAX_BYTES):
        self.embeddings_forward = embeddings.forward  # the modules' own forwards, saved before they are replaced
        self.block_forwards = [block.forward for block in blocks]
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.outputs: dict[bytes, torch.Tensor] = {}

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        device = pixel_values.device.type  # the same pixels under another autocast are another output
        precision = f"{torch.is_autocast_enabled(device)}{torch.get_autocast_dtype(device)}".encode()
        keys = [image_key(image) + precision for image in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self.outputs]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                fresh = dict(zip(missing, self.compute(pixel_values[missing])))
            for i, out in fresh.items():
                size = out.numel() * out.element_size()
                if keys[i] not in self.outputs and self.bytes + size <= self.max_bytes:
                    self.outputs[keys[i]] = out.clone()  # its own storage, not a view of the batch
                    self.bytes += size
        return torch.stack([fresh[i] if i in fresh else self.outputs[key] for i, key in enumerate(keys)])

    def compute(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings_forward(pixel_values)
        for forward in self.block_forwards:
            hidden = forward(hidden)
        return hidden


def image_key(image: torch.Tensor) -> bytes:
    """The image's identity: a digest of its pixel values as given to the tower (dtype and shape included)."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    return digest.digest()


def frozen_prefix(tower) -> int:
    """How many leading blocks of an EfficientNet tower learn nothing (all of them for a frozen tower)."""
    blocks = tower.encoder.blocks
    if any(p.requires_grad for p in tower.embeddings.parameters()):
        return 0
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


def efficientnet_tower(model):
    """The model's EfficientNet vision tower (`small`'s), or None (a ViT tower, a text model)."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if getattr(vision, "model_type", None) != "efficientnet":
        return None
    return next(m for name, m in model.named_modules() if name.split(".")[-1] == "vision_tower")


@contextlib.contextmanager
def memoized_frozen_tower(model, enabled: bool = True, max_bytes: int = MAX_BYTES):
    """While the block runs, the frozen front of `model`'s EfficientNet tower (embeddings + the blocks before the first
    that learns) is computed once per image; yields the memo (None where nothing applies: another tower, a tower that
    learns from its stem, a frozen block in train mode, or `enabled` false, e.g. several processes)."""
    tower = efficientnet_tower(model) if enabled else None
    n = frozen_prefix(tower) if tower is not None else 0
    blocks = list(tower.encoder.blocks[:n]) if n else []
    if not blocks or any(m.training for m in [tower.embeddings, *blocks]):
        yield None  # a frozen block in train mode would run its drop-connect: its output is not a function of the image
        return
    memo = FrozenPrefixMemo(tower.embeddings, blocks, max_bytes)
    tower.embeddings.forward = memo
    for block in blocks:
        block.forward = _pass_on
    try:
        yield memo
    finally:
        for module in [tower.embeddings, *blocks]:
            del module.forward  # the class's forward again


def _pass_on(hidden: torch.Tensor) -> torch.Tensor:
    return hidden

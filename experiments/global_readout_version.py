"""`small` with the head map's mean in every image token, as a version a stage can start from: does a stage learn a
held-out set better when each token also carries the whole image's pooled features?

The held-out stages answer Tux Paint about as well as a linear probe of the flat 7x7 map (76.5%; the stage ~78),
while the mean-pooled map probes at 84.3%. `llaca.models.vision.efficientnet_lite_global_tower` gives every token
its own 1280 channels and the map's mean (2,560). This converts an installed `small` into that read-out without a
rebuild: the tower is swapped, and the projector's first layer is widened with zero weights for the mean's
channels, so the converted base answers exactly as before (checked here on base test records) and a stage can learn
to use the mean. The new home holds the converted version under the id `small`, so the held-out bench runs the CLI's
`small` recipe on it:

    LLACA_HOME=bench_results/small_build5/work/home python -m experiments.global_readout_version \
        --out-home bench_results/small_global/work/home
    LLACA_HOME=bench_results/small_global/work/home python -m llaca.bench heldout --version small \
        --variants "CLI defaults" --sets tuxpaint --skip-zero-shot --text-check --train-eval 200 \
        --out bench_results/heldout_small_global
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def widen_projector(model, tower, tower_config) -> None:
    """Swap in `tower` and widen the projector's first Linear to its channels, the new inputs' weights zero."""
    old = model.model.multi_modal_projector.linear_1
    new = torch.nn.Linear(tower_config.hidden_dim, old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.model.multi_modal_projector.linear_1 = new
    model.model.vision_tower = tower
    tower_config.hidden_size = tower_config.hidden_dim
    model.config.vision_config = tower_config


def greedy_answers(model, processor, records, max_new_tokens: int = 12) -> list[str]:
    from llaca.data import load_image
    from llaca.data.encoding import to_messages

    out = []
    for r in records:
        prompt = processor.apply_chat_template(to_messages([(r.turns[0][0], None)]), add_generation_prompt=True)
        inputs = processor(text=prompt, images=load_image(r.image), return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main(argv=None) -> int:
    from llaca.data import load_instruction_set
    from llaca.models.llava import save_pretrained
    from llaca.models.vision import efficientnet_lite_global_tower
    from llaca.versions import Registry, load_version

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default="small")
    p.add_argument("--out-home", required=True)
    p.add_argument("--check", type=int, default=20, help="base test records answered by both, must agree")
    a = p.parse_args(argv)

    registry = Registry()
    source = registry.get(a.version)
    model, processor = load_version(registry, a.version)
    model.eval()
    records = load_instruction_set(source.meta["stage"]["test_path"]).records[:a.check]
    before = greedy_answers(model, processor, records)
    t0 = time.perf_counter()
    tower, config = efficientnet_lite_global_tower("lite2", processor.image_processor.size["height"])
    widen_projector(model, tower, config)
    after = greedy_answers(model, processor, records)
    same = sum(x == y for x, y in zip(before, after))
    print(json.dumps({"converted_s": round(time.perf_counter() - t0, 1), "same_answers": f"{same}/{len(records)}"}))
    if same != len(records):
        raise SystemExit(f"the converted base answers differently on {len(records) - same} records: {before} {after}")

    home = Path(a.out_home)
    target = home / "versions" / "small"
    if target.exists():
        raise SystemExit(f"{target} exists")
    (home / "versions").mkdir(parents=True, exist_ok=True)
    for extra in ("cache",):  # the language check's SmolLM2 answers, computed once
        if (registry.root.parent / extra).is_dir() and not (home / extra).exists():
            shutil.copytree(registry.root.parent / extra, home / extra)
    meta = {**source.meta, "readout": "head+mean (experiments/global_readout_version.py)"}
    meta = {k: v for k, v in meta.items() if k not in ("id", "created")}

    def write(tmp: Path):
        save_pretrained(model, processor, tmp / "model")
        shutil.copytree(source.path / "replay", tmp / "replay")

    version = Registry(home).create(meta, write, version_id="small")
    print(version.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

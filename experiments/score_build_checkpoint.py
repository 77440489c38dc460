"""Score a `small` build at its last stage-2 checkpoint (or a finished build's adapter) on its own test, per family.

A build checkpoints every 50 steps (`small_build.train`); one that cannot finish in the time at hand still says
where it stands this way. The checkpoint's weights (LoRA + projector, and with `--fact-align-epochs` the taught tower
tail) are put on a freshly assembled `small`, merged, and asked the test split greedily, as `build` scores itself
at the end. Mid-run the learning rate has not decayed yet: the figure is where the build stood, not where it ends.

    LLACA_HOME=<the build's home> PYTHONPATH=. python -m experiments.score_build_checkpoint \\
        --run <home>/cache/small-build-seed0-a150-t550-b16-facts10 --out bench_results/small/build9/checkpoint.json

A finished build: `--adapter <its --out folder>` instead of `--run` (merged as `install_small` merges it). The tower
is assembled with the build's read-out (a twin-head tower for `--readout twin`): a finished build's meta says it, a run
folder's name carries it (`small_build.readout_tag`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home


def merged_checkpoint(model, run: Path, name: str = "tune-checkpoint"):
    """`model` with the run's stage-2 checkpoint `name` (LoRA + projector, and a taught tower tail) put on and merged."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from llaca.bases import small_build as B

    checkpoint = run / name
    saved = ["multi_modal_projector"]
    if (run / "fact_align.safetensors").is_file():
        model.load_state_dict(load_file(str(run / "fact_align.safetensors")), strict=False)
        saved += B.fact_tail_modules(len(model.model.vision_tower.encoder.blocks))
    peft_model = get_peft_model(model, LoraConfig(r=B.LORA_R, lora_alpha=B.LORA_ALPHA, lora_dropout=0.05,
                                                  target_modules=B.LORA_TARGETS, modules_to_save=saved))
    params = dict(peft_model.named_parameters())
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    if missing := sorted(set(weights) - set(params)):
        raise SystemExit(f"{checkpoint}: {len(missing)} weights this model does not have, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return peft_model.merge_and_unload().eval(), json.loads((checkpoint / "state.json").read_text())


def main(argv=None) -> int:
    from llaca import data as D
    from llaca.bases.small import merge_adapter
    from llaca.bench.small import family_scores, machine_stamp
    from llaca.data.world import ensure_mixture
    from llaca.evaluation.evaluate import evaluate
    from llaca.models.small import assemble
    from llaca.versions import Registry

    from .stage0_data import readout_of

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="the build's run folder ($LLACA_HOME/cache/small-build-...)")
    which.add_argument("--adapter", type=Path, help="a finished build's adapter folder (small_build's --out)")
    p.add_argument("--checkpoint", default="tune-checkpoint",
                   help="the stage-2 checkpoint in --run, named by the build's stage-2 options "
                        "(small_build.run_folders), e.g. tune-checkpoint-group10-pad32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    model, processor = assemble(a.seed, readout=readout_of(a.run, a.adapter))
    if a.adapter:
        merged, state = merge_adapter(model, a.adapter).eval(), {"step": "end", "log": json.loads(
            (a.adapter.parent / "train_log.json").read_text())}
    else:
        merged, state = merged_checkpoint(model, a.run, a.checkpoint)
    root = ensure_mixture(Registry(llaca_home()), a.seed, 16000, 300, splits=("test",), rehearsal=0.3)
    test = D.load_instruction_set(root / "base" / "test")
    records = test.records[:a.n_test]
    result = evaluate(merged, processor, test, batch_size=16, limit=a.n_test, progress=True)
    tune_log = [e for e in state["log"] if e["phase"] == "instruct"]
    out = {"run": str(a.run or a.adapter), "step": state["step"],
           "lr_at_step": tune_log[-1]["lr"] if tune_log else None,
           "loss_last_50_mean": round(sum(e["loss"] for e in tune_log[-50:]) / max(1, len(tune_log[-50:])), 4),
           "test": family_scores([r.question for r in records], [r.answer for r in records], result.predictions),
           "answers_first_40": [{"q": r.question, "gold": r.answer, "answer": x}
                                for r, x in zip(records[:40], result.predictions)],
           "seconds": round(time.time() - t0, 1), **machine_stamp()}
    atomic_write_json(a.out, out)
    print(json.dumps({k: out[k] for k in ("step", "lr_at_step", "loss_last_50_mean", "test")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

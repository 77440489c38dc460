"""`python -m experiments.turns_speed`: what multi-turn records buy `small`'s build (`--turns-per-image K`): stage-2
steps of 16 records asking each image one question against K, alternating in one process. The figure is seconds per
*answer* as a ratio (an image's 49 tokens and the chat template are paid once for K answers); whether an answer
in a conversation teaches as much as one on its own is what a build measures, not this.

Both arms draw from the build's mixture (30% single-question attribute records, as the build), without the text
rows (the same in both). Forward + backward of the build's own `step_loss` with its LoRA; bf16 where the CPU has it.
Writes bench_results/small/turns_speed.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json


def answers_in(items: list[dict]) -> int:
    """Answer spans in a batch: each run of labelled positions is one assistant turn."""
    total = 0
    for item in items:
        labelled = item["labels"] != -100
        total += int(labelled[0]) + int((labelled[1:] & ~labelled[:-1]).sum())
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.turns_speed")
    p.add_argument("--k", type=int, default=3, help="questions per image in the multi-turn arm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm and round")
    p.add_argument("--out", default="bench_results/small/turns_speed.json")
    a = p.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    from llaca.bases import small_build as B
    from llaca.bench.small import cpu_model
    from llaca.data import RecordEncoder, load_instruction_set
    from llaca.data.world import write_mixture
    from llaca.models.small import assemble
    from llaca.train.tuner import keep_frozen_in_eval, native_bf16

    torch.set_num_threads(2)
    model, processor = assemble(0)
    encoder = RecordEncoder(processor)
    tmp = Path(tempfile.mkdtemp(prefix="turns_speed-"))
    records = {}
    for k in (1, a.k):
        write_mixture(tmp / f"turns{k}", seed=0, n_train=160, n_test=1, splits=("train",), rehearsal=0.3, turns=k)
        records[k] = load_instruction_set(tmp / f"turns{k}" / "base" / "train").records
    cache = B.FeatureCache(tmp / "features", model, processor)
    cache.fill([r.image for rs in records.values() for r in rs])
    model = get_peft_model(model, LoraConfig(r=B.LORA_R, lora_alpha=B.LORA_ALPHA, lora_dropout=0.05,
                                             target_modules=B.LORA_TARGETS, modules_to_save=["multi_modal_projector"]))
    model.train()
    keep_frozen_in_eval(model)  # as the build's loop runs it
    mixtures = {k: B.Mixture(rs, encoder, cache, seed=1) for k, rs in records.items()}
    pad = processor.tokenizer.pad_token_id
    seconds = {k: [] for k in mixtures}
    answers = {k: [] for k in mixtures}
    tokens = {k: [] for k in mixtures}
    B.step_loss(model, *mixtures[1].batch(B.BATCH), pad).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    for _ in range(a.rounds):
        for k, mixture in mixtures.items():
            for _ in range(a.steps):
                items, features = mixture.batch(B.BATCH)
                t0 = time.perf_counter()
                B.step_loss(model, items, features, pad).backward()
                seconds[k].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                answers[k].append(answers_in(items))
                tokens[k].append(sum(len(i["input_ids"]) for i in items))
    per_answer = {k: sum(seconds[k]) / sum(answers[k]) for k in mixtures}
    out = {"k": a.k, "batch": B.BATCH,
           "s_per_step_median": {str(k): round(statistics.median(v), 2) for k, v in seconds.items()},
           "answers_per_step": {str(k): round(statistics.mean(v), 1) for k, v in answers.items()},
           "tokens_per_answer": {str(k): round(sum(tokens[k]) / sum(answers[k]), 1) for k in mixtures},
           "s_per_answer": {str(k): round(v, 3) for k, v in per_answer.items()},
           "answers_per_second_ratio": round(per_answer[1] / per_answer[a.k], 2),
           "bf16": native_bf16("cpu"), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
           "load_avg_end": os.getloadavg(), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write_json(Path(a.out), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

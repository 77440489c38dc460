"""`python -m experiments.turns_speed`: what multi-turn records (`small_build --turns-per-image K`) and batches grouped
by length (`--group-by-length N`) buy `small`'s build: stage-2 steps of 16 rows, the arms alternating in one process.
The figure is seconds per *answer* as a ratio to builds 1-7's stage 2 (one question per image, no grouping): an
image's 49 tokens and the chat template are paid once for K answers, and grouped batches pad less. Whether an answer
in a conversation teaches as much as one on its own is what a build measures, not this.

Every arm draws from the build's mixture (30% single-question attribute records) with 4 of 16 rows text-only chat
(the build's prompts, answered here by the untouched LM). Forward + backward of the build's own `step_loss` with its
LoRA; bf16 where the CPU has it. Writes bench_results/small/turns_speed.json.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--k", type=int, default=3, help="questions per image in the multi-turn arms")
    p.add_argument("--group", type=int, default=10, help="batches grouped by length in the grouped arms")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm and round")
    p.add_argument("--out", default="bench_results/small/turns_speed.json")
    a = p.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp
    from llaca.data import RecordEncoder, load_instruction_set
    from llaca.data.world import write_mixture
    from llaca.models.small import assemble
    from llaca.train.tuner import keep_frozen_in_eval, native_bf16

    torch.set_num_threads(2)
    model, processor = assemble(0)
    encoder = RecordEncoder(processor)
    chat = B.distill_chat(model, processor.tokenizer, B.repair_prompts(0)[:48])
    tmp = Path(tempfile.mkdtemp(prefix="turns_speed-"))
    records = {}
    for k in (1, a.k):
        write_mixture(tmp / f"turns{k}", seed=0, n_train=240, n_test=1, splits=("train",), rehearsal=0.3, turns=k)
        records[k] = load_instruction_set(tmp / f"turns{k}" / "base" / "train").records
    cache = B.FeatureCache(tmp / "features", model, processor)
    cache.fill([r.image for rs in records.values() for r in rs])
    model = get_peft_model(model, LoraConfig(r=B.LORA_R, lora_alpha=B.LORA_ALPHA, lora_dropout=0.05,
                                             target_modules=B.LORA_TARGETS, modules_to_save=["multi_modal_projector"]))
    model.train()
    keep_frozen_in_eval(model)  # as the build's loop runs it
    arms = {f"{k} question(s) per image, group {g}": B.Mixture(records[k], encoder, cache, chat=chat, text_share=0.25,
                                                               seed=1, group_by_length=g)
            for k, g in ((1, 1), (1, a.group), (a.k, a.group))}
    pad = processor.tokenizer.pad_token_id
    seconds, answers, tokens = ({name: [] for name in arms} for _ in range(3))
    B.step_loss(model, *arms[next(iter(arms))].batch(B.BATCH), pad).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    for _ in range(a.rounds):
        for name, mixture in arms.items():
            for _ in range(a.steps):
                items, features = mixture.batch(B.BATCH)
                t0 = time.perf_counter()
                B.step_loss(model, items, features, pad, distil_text=True).backward()
                seconds[name].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                answers[name].append(answers_in(items))
                tokens[name].append(B.BATCH * max(len(i["input_ids"]) for i in items))
    per_answer = {name: sum(seconds[name]) / sum(answers[name]) for name in arms}
    reference = per_answer[next(iter(arms))]
    out = {"batch": B.BATCH, "arms": {name: {
        "s_per_step_median": round(statistics.median(seconds[name]), 2),
        "answers_per_step": round(statistics.mean(answers[name]), 1),
        "padded_tokens_per_answer": round(sum(tokens[name]) / sum(answers[name]), 1),
        "s_per_answer": round(per_answer[name], 3),
        "answers_per_second_vs_builds_1_7": round(reference / per_answer[name], 2)} for name in arms},
        "bf16": native_bf16("cpu"), **machine_stamp()}
    atomic_write_json(Path(a.out), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

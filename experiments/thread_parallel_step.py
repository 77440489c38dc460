"""Can one process use two cores better by running a step's two micro-batches in two threads?

On the 2-core runner two stage processes at one torch thread each ran 1.17 steps/s *each* (2.3 in all), one process
at two threads 1.5: `small`'s matmuls (batch 2 x ~90 tokens x 576) are too small for two threads to share one op
well. This times `small`'s stage step (its CLI recipe, batch 2) as the tuner runs it (two torch threads, one
micro-batch of 2) against the same two records as two micro-batches of 1, each forward+backward in its own Python
thread with one torch thread each (autograd accumulates into the shared .grad under its own lock), alternating.

    LLACA_HOME=bench_results/small_build5/work/home PYTHONPATH=. python -m experiments.thread_parallel_step --out F
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch


def step_sequential(stage, idx: list[int]) -> float:
    from llaca.train.loss import answer_loss

    t = time.perf_counter()
    batch = stage._encode(idx)
    n_tokens = stage._global_label_tokens([batch])
    with stage._autocast():
        loss = answer_loss(stage.model, batch, n_tokens)
    loss.backward()
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def step_threaded(stage, idx: list[int]) -> float:
    from llaca.train.loss import answer_loss

    t = time.perf_counter()
    batches = [stage._encode([i]) for i in idx]
    n_tokens = stage._global_label_tokens(batches)
    errors = []

    def work(batch):
        try:
            with stage._autocast():
                loss = answer_loss(stage.model, batch, n_tokens)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def grads_match(stage, idx: list[int]) -> float:
    """Largest relative difference between the two ways' summed gradients on the same records (no step taken)."""
    from llaca.train.loss import answer_loss

    def grads():
        out = {n: p.grad.detach().clone() for n, p in stage.params.items() if p.grad is not None}
        stage.optimizer.zero_grad(set_to_none=True)
        return out

    batch = stage._encode(idx)
    with stage._autocast():
        answer_loss(stage.model, batch, stage._global_label_tokens([batch])).backward()
    one = grads()
    batches = [stage._encode([i]) for i in idx]
    n_tokens = stage._global_label_tokens(batches)
    for b in batches:
        with stage._autocast():
            answer_loss(stage.model, b, n_tokens).backward()
    two = grads()
    return max(((one[n] - two[n]).norm() / (one[n].norm() + 1e-12)).item() for n in one)


def main(argv=None) -> int:
    from experiments.stage_step_profile import small_stage
    from llaca.train.tuner import frozen_linears_cast, training_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    stage, model = small_stage()
    load_start = os.getloadavg()
    times = {"sequential, 2 torch threads": [], "2 Python threads x 1 torch thread": []}
    with training_attention(model, "cpu", "bf16"), frozen_linears_cast(model, torch.bfloat16):
        match = grads_match(stage, stage._batches_for_step(0)[0])
        step = 0
        for _ in range(args.rounds):
            for name in times:
                torch.set_num_threads(2 if name.startswith("sequential") else 1)
                for _ in range(args.steps):
                    idx = stage._batches_for_step(step)[0]
                    step += 1
                    fn = step_sequential if name.startswith("sequential") else step_threaded
                    times[name].append(fn(stage, idx))
    med = {k: round(statistics.median(v[1:]), 4) for k, v in times.items()}
    seq, thr = med.values()
    out = {"s_per_step": med, "speedup": round(seq / thr, 2), "grad_rel_diff_one_vs_two_microbatches": match,
           "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "steps": args.steps, "rounds": args.rounds}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

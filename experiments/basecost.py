"""`python -m experiments.basecost --new DIR`: what base v2 costs against base v1, measured side by side in one process.

A training step (forward + backward + AdamW on one batch of 16 CoIN-mini records, vision tower frozen, as a
stage trains) and a chat answer (`llaca.serve.chat.stream_answer`: time to the first streamed text and to the end of a
10-token answer) for each base, alternating old/new every repetition (`speed.interleaved`) so that other work on
the machine slows both alike. Ratios new/old are the result; goals from the base v2 issue: step <= 2x, first
token <= 50 ms. Writes `<out>/basecost.json` and `.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from llaca.bench.speed import interleaved
from llaca.paths import ASSETS_DIR

GOALS = {"step_ratio": 2.0, "first_token_ms": 50.0}


def _load(folder: Path):
    from llaca.models.llava import load_pretrained

    model, processor = load_pretrained(folder / "model")
    return model, processor


def _train_step(model, processor, records):
    import torch

    from llaca import data as D

    for name, p in model.named_parameters():
        p.requires_grad = "vision_tower" not in name
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    encoder = D.RecordEncoder(processor, max_tokens=None)
    batch = D.collate([encoder.encode(r) for r in records], processor.tokenizer.pad_token_id)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    return step, int(batch["input_ids"].shape[1])


def _chat(model, processor, image, question, first: list, total: list):
    from llaca.serve.chat import stream_answer

    def answer():
        model.eval()
        t, ttft = time.perf_counter(), None
        for text in stream_answer(model, processor, image, question, max_new_tokens=10):
            if ttft is None and text:
                ttft = time.perf_counter() - t
        total.append(time.perf_counter() - t)
        first.append(ttft if ttft is not None else total[-1])
    return answer


def run(old: Path, new: Path, out: Path, reps: int) -> dict:
    import torch

    from llaca import data as D
    from llaca.data import coin_mini, load_image

    torch.set_num_threads(1)
    work = out / "basecost-data"
    if not (work / "gqa" / "train" / "data.json").is_file():
        coin_mini.write_task(work, "gqa", n_train=32, n_test=4, seed=0)
    records = D.load_instruction_set(work / "gqa" / "train").records[:16]
    image, question = load_image(records[0].image), records[0].question
    bases = {"v1": _load(old), "v2": _load(new)}
    steps, lengths, first, total = {}, {}, {k: [] for k in bases}, {k: [] for k in bases}
    for k, (model, processor) in bases.items():
        steps[k], lengths[k] = _train_step(model, processor, records)
    t_train = interleaved({k: steps[k] for k in bases}, reps)
    for k, (model, processor) in bases.items():  # chat measured with the models in eval mode, after training reps
        model.eval()
    interleaved({k: _chat(*bases[k], image, question, first[k], total[k]) for k in bases}, reps)
    med = {k: statistics.median(v) * 1000 for k, v in t_train.items()}
    res = {
        "measured": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg(), "reps": reps, "threads": 1,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in bases.items()},
        "batch_tokens": lengths,
        "train_step_ms": {k: round(v, 1) for k, v in med.items()},
        "train_step_ratio": round(med["v2"] / med["v1"], 3),
        "first_token_ms": {k: round(statistics.median(v[1:]) * 1000, 1) for k, v in first.items()},
        "answer_ms": {k: round(statistics.median(v[1:]) * 1000, 1) for k, v in total.items()},
        "goals": GOALS,
    }
    res["met"] = {"step": res["train_step_ratio"] <= GOALS["step_ratio"],
                  "first_token": res["first_token_ms"]["v2"] <= GOALS["first_token_ms"]}
    return res


def markdown(r: dict) -> str:
    return "\n".join([
        f"Measured {r['measured']}, load average {r['load_avg'][0]:.1f} at the end, one torch thread, {r['reps']} "
        "alternating repetitions, medians.", "",
        "| | base v1 | base v2 | v2 / v1 | goal | met |", "|---|---|---|---|---|---|",
        f"| parameters | {r['params']['v1']:,} | {r['params']['v2']:,} | {r['params']['v2'] / r['params']['v1']:.2f}x | ≤ ~15M | "
        f"{'yes' if r['params']['v2'] <= 15e6 else 'no'} |",
        f"| training step (batch 16, {r['batch_tokens']['v1']}/{r['batch_tokens']['v2']} tokens) | "
        f"{r['train_step_ms']['v1']} ms | {r['train_step_ms']['v2']} ms | {r['train_step_ratio']}x | ≤ 2x | "
        f"{'yes' if r['met']['step'] else 'no'} |",
        f"| chat: first token (stream_answer) | {r['first_token_ms']['v1']} ms | {r['first_token_ms']['v2']} ms | "
        f"{r['first_token_ms']['v2'] / r['first_token_ms']['v1']:.2f}x | ≤ 50 ms | {'yes' if r['met']['first_token'] else 'no'} |",
        f"| chat: 10-token answer | {r['answer_ms']['v1']} ms | {r['answer_ms']['v2']} ms | "
        f"{r['answer_ms']['v2'] / r['answer_ms']['v1']:.2f}x | | |", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.basecost", description=__doc__.split("\n")[0])
    p.add_argument("--old", default=str(ASSETS_DIR / "base"), help="base v1 folder (default: the shipped assets/base)")
    p.add_argument("--new", required=True, help="base v2 version folder, e.g. $LLACA_HOME/versions/base-v2")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(Path(a.old), Path(a.new), out, a.reps)
    (out / "basecost.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "basecost.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

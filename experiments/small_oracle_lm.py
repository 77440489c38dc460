"""How much of its own test could `small`'s LM learn in the build's budget if it saw each scene perfectly?

Base v2's oracle bound (`bench_results/base_v2/scripts/oracle_lm.py`) asked this of the 3M from-scratch LM. This asks
it of SmolLM2-135M-Instruct with the build's stage-2 adapter and schedule: every record's image is replaced by a text
of the scene's exact facts (each thing's name or colour and shape, its group, its box and region; the written word;
the kind of empty frame): more than any tower carries. The things are listed in reading order (top to bottom, left to
right), not in the order the generator drew them, so a caption's order is as unknowable as it is from pixels.

The records are the build's own: `world.write_mixture`'s draws replayed with the scene kept instead of rendered
(`world.keep_scene`; rendering draws nothing from the generator), the 16,000 training records thinned to the
build's 550 x 16 exactly as `small_build.build` draws them, and the 300-record test split it scores. Stage 2's
LoRA (r 32, every LM Linear), lr 4e-4 with warmup and cosine decay, batches of 16, bf16 autocast where native, and
its training loop (`small_build.train`, checkpointed, so an interrupted run resumes). Every row of a batch is a scene
question here (the build gives 4 of 16 to text chat): the LM gets more of the task than the build gives it.

    PYTHONPATH=. python -m experiments.small_oracle_lm --out bench_results/small/oracle_lm.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home

ORACLE_STEPS = 550  # build 5's stage 2, which the oracle's 91.0% was measured against


def scene_facts(scene) -> str:
    """The scene as text: what a perfect eye reads off the picture, in reading order."""
    from llaca.data import world

    if scene.kind == "empty":
        return f"an empty frame ({scene.background}), no objects"
    if scene.kind == "text":
        return f"the word '{scene.text}' written on the picture, no objects"
    things = sorted(scene.things, key=lambda t: ((t.box[1] + t.box[3]) // 16, t.box[0]))
    parts = [(f"a {t.colour} {t.shape} (shape)" if t.kind == "shape" else f"{world._article(t.name)} ({t.group})")
             + f" at {world.format_box(t.box)}, {world.region_of(t.box)}" for t in things]
    return f"{len(things)} object{'s' if len(things) > 1 else ''}: " + "; ".join(parts)


def replay_split(split: str, n: int, seed: int = 0, rehearsal: float = 0.3) -> list[tuple[object, str, str]]:
    """(scene, question, answer) of `world.write_mixture`'s records, drawn by its own code without pixels."""
    from llaca.data import world

    return world.mixture_draws(split, n, seed, rehearsal, draw=world.keep_scene)


def check_against(records: list[tuple], data_json: Path) -> None:
    """The replayed questions and answers must be the written split's, record for record."""
    written = json.loads(data_json.read_text())
    if len(written) != len(records):
        raise SystemExit(f"{data_json}: {len(written)} records written, {len(records)} replayed")
    for i, ((_, q, a), w) in enumerate(zip(records, written)):
        turns = w["conversations"]
        if turns[0]["value"].replace("<image>", "").strip() != q.strip() or turns[1]["value"] != a:
            raise SystemExit(f"{data_json}: record {i} differs from the replay ({turns[0]['value']!r} / {q!r})")


def prompt_of(scene, question: str) -> str:
    return f"Picture: {scene_facts(scene)}\n{question}"


class OracleMixture:
    """`small_build.Mixture`'s interface for text-only rows: a batch of encoded oracle records, seeded draws."""

    def __init__(self, items: list[dict], seed: int):
        self.items, self.rng = items, random.Random(seed)

    def batch(self, size: int, step: int = 0) -> tuple[list[dict], list]:
        return [self.items[self.rng.randrange(len(self.items))] for _ in range(size)], [None] * size


def answer_all(model, tokenizer, records: list[tuple]) -> list[str]:
    """Greedy answers to the oracle prompts (the build's own batched chat generation, at most 40 new tokens)."""
    from llaca.bases.small_build import distill_chat

    return [r["answer"] for r in distill_chat(model, tokenizer, [prompt_of(s, q) for s, q, _ in records],
                                              max_new_tokens=40, batch=32)]


def score(records: list[tuple], answers: list[str]) -> dict:
    from llaca.bench.small import family_scores

    return family_scores([q for _, q, _ in records], [g for _, _, g in records], answers)


def main(argv=None) -> int:
    from peft import LoraConfig, get_peft_model

    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp
    from llaca.models.small import load_language_model
    from llaca.train.tuner import LM_LINEARS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=ORACLE_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=300, help="score this many test records (fewer than 300: a smoke run)")
    p.add_argument("--check-against", type=Path, help="a written mixture's base/ folder: the replay must match it")
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: $LLACA_HOME/cache/...)")
    p.add_argument("--out", type=Path, default=Path("bench_results/small/oracle_lm.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(a.seed)
    t0 = time.time()

    train_all = replay_split("train", 16000, a.seed)
    test = replay_split("test", 300, a.seed)[:a.n_test]
    if a.check_against:
        check_against(test, a.check_against / "test" / "data.json")
        check_against(train_all, a.check_against / "train" / "data.json")
    _, train = B.draw_records(train_all, a.seed, tune_steps=a.steps)  # the build's own draw of stage 2's records

    lm, tokenizer = load_language_model()
    items = [B.encode_chat(tokenizer, prompt_of(s, q), ans) for s, q, ans in train]
    model = get_peft_model(lm, LoraConfig(r=B.LORA_R, lora_alpha=B.LORA_ALPHA, lora_dropout=0.05,
                                          target_modules=rf".*\.({LM_LINEARS})"))
    log: list[dict] = []
    work = a.work or llaca_home() / "cache" / f"small-oracle-lm-seed{a.seed}-t{a.steps}"
    t_train = time.time()
    # Batches padded to multiples of 32 tokens: with a new length almost every step, the first run's resident memory
    # grew to 16 GB and its step slowed from ~10 to ~15 s (measured); bucketed, it held at 12.5 GB.
    B.train(model, OracleMixture(items, a.seed + 1), B.BATCH, tokenizer.pad_token_id, a.steps, B.TUNE_LR, "oracle", log,
            work / "checkpoint", pad_to_multiple_of=32)
    train_seconds = time.time() - t_train
    seen = train[:a.n_test]
    result = {
        "what": "SmolLM2-135M-Instruct, the build's stage-2 LoRA and schedule, the image replaced by the scene's exact "
                "facts as text (things in reading order); the build's own records",
        "command": "PYTHONPATH=. python -m experiments.small_oracle_lm"
                   + (f" --steps {a.steps}" if a.steps != ORACLE_STEPS else ""),
        "steps": a.steps, "batch": B.BATCH, "lr": B.TUNE_LR, "lora_r": B.LORA_R,
        "replay_checked_against": str(a.check_against) if a.check_against else None,
        "example_prompt": prompt_of(*test[0][:2]), "example_answer": test[0][2],
        "test": score(test, answers := answer_all(model, tokenizer, test)),
        "train_scored": score(seen, answer_all(model, tokenizer, seen)),
        "test_answers_first_40": [{"q": q, "gold": g, "answer": x} for (_, q, g), x in zip(test[:40], answers)],
        "loss_last_50_mean": round(sum(r["loss"] for r in log[-50:]) / len(log[-50:]), 4),
        "train_seconds_this_run": round(train_seconds, 1), "seconds": round(time.time() - t0, 1),
        **machine_stamp(),
    }
    atomic_write_json(a.out, result)
    print(json.dumps({k: result[k] for k in ("test", "train_scored")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

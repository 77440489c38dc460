"""`python -m llaca.bench small`: what base v3 (`small`) is and costs, on this machine, each figure with its command.

Sections (each cached as `<out>/<section>.json`, so an interrupted run resumes; `--sections` picks some):
- install: the first launch, i.e. `ensure_base(base="small")` into an empty registry (wall time, peak RSS);
- own: its own test (base v2's world, 300 records), per instruction family;
- text: the language check: greedy answers to `assets/small/text_check.json` vs the untouched SmolLM2-135M-Instruct
  (agreement = the prompt's key answer found in both answers or in neither);
- zeroshot: every CoIN-mini task's test split before any stage (never tuned on);
- photos: five questions about real photographs from scikit-image's bundled samples, answers verbatim;
- chat: one user: time to the first streamed text of an image question and decoding speed (tokens/s) of a long
  text answer, as served (fp16 weight copies for one user's decode steps) against fp32, alternating;
- stage: seconds per optimizer step of a stage with `small`'s CLI recipe, fp32 against bf16 autocast where the CPU
  has native bf16 (measured alternately in one run: the ratio is the figure; the machine's load moves the seconds;
  without it, one matmul in each says why the recipe runs fp32), and the 1,000-record stage it implies.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import time
from pathlib import Path

from ..paths import atomic_write_json
from .text_check import text_agreement

SECTIONS = ("install", "own", "text", "zeroshot", "photos", "chat", "stage")
PHOTOS = [("chelsea", "What animal is in this photo?"), ("coffee", "What is in the picture?"),
          ("astronaut", "Describe the image briefly."), ("rocket", "What is this?"),
          ("camera", "What is the man holding?")]


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def install(home: Path, candidate: Path | None = None) -> dict:
    """First launch: `small` assembled into an empty home from the shipped assets, or from a `candidate` build's
    output folder (its `adapter/` and `meta.json`, as `python -m llaca.bases.small_build --out DIR/adapter` writes)."""
    from ..versions import Registry

    t0 = time.perf_counter()
    registry = Registry(home)
    if candidate is None:
        from ..bases.install import ensure_base

        ensure_base(registry, base="small")
    elif not registry.exists("small"):
        from ..bases.small import install_small

        install_small(registry, assets=candidate)
    return {"install_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": _rss_mb(),
            "assets": str(candidate) if candidate else "assets/small"}


def own_test_answers(model, processor, registry) -> tuple[list, list[str]]:
    """(records, greedy answers) of `small`'s own test: what `own_test` scores, kept whole by
    `bench_results/small/scripts/own_answers.py`."""
    from ..evaluation.evaluate import evaluate
    from .quality import _test_set, base_test_split

    test = _test_set(base_test_split(registry, registry.get("small")))
    return test.records, evaluate(model, processor, test, batch_size=16).predictions


def own_test(model, processor, registry) -> dict:
    records, predictions = own_test_answers(model, processor, registry)
    return family_scores([r.question for r in records], [r.answer for r in records], predictions)


def family_scores(questions: list[str], golds: list[str], predictions: list[str]) -> dict:
    """Accuracy (percent) over all of the world's test records and per answer family (`world.family`)."""
    from ..data.world import family
    from ..evaluation.metrics import is_correct

    per: dict[str, list[float]] = {}
    for question, gold, prediction in zip(questions, golds, predictions, strict=True):
        per.setdefault(family(question, gold), []).append(100.0 * is_correct(prediction, gold))
    scores = [s for v in per.values() for s in v]
    if not scores:
        raise ValueError("no test records to score")
    return {"accuracy": round(sum(scores) / len(scores), 2), "n": len(scores),
            "per_family": {k: {"accuracy": round(sum(v) / len(v), 1), "n": len(v)} for k, v in sorted(per.items())}}


def zero_shot_row(model, processor, work: Path, limit: int) -> dict:
    from ..data import coin_mini
    from ..evaluation.evaluate import zero_shot

    root = work / "coin-mini"
    if not (root / "ocrvqa" / "test" / "data.json").is_file():
        coin_mini.write_coin_mini(root)
    return zero_shot(model, processor, root, limit, None)


def photos(model, processor) -> dict:
    import skimage.data
    from PIL import Image

    from ..serve.chat import answer_once

    rows = []
    for name, question in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        rows.append({"photo": f"skimage.data.{name}()", "question": question,
                     "answer": answer_once(model, processor, image, question, max_new_tokens=40)})
    return {"rows": rows}


LONG_ANSWER = "Tell me about the moon in a few sentences."  # decoding speed needs an answer of many tokens


def chat_cost(model, processor, reps: int = 5, new_tokens: int = 48) -> dict:
    """One user: time to the first streamed text of an image question, and decoding speed (tokens/s after the first)
    of a long text answer, as the app serves them (fp16 weight copies for single-row steps,
    `llaca.serve.half_decode`) against plain fp32, alternating per repetition. (The image question's answer is a
    few words on `small`, too short to time decoding on.)"""
    import skimage.data
    from PIL import Image

    from ..serve.chat import stream_answer
    from ..serve.half_decode import disable_half_decode, enable_half_decode

    image = Image.fromarray(skimage.data.chelsea()).convert("RGB")

    def timed(img, question):
        t, ttft, text = time.perf_counter(), None, ""
        for text in stream_answer(model, processor, img, question, max_new_tokens=new_tokens):
            if ttft is None and text:
                ttft = time.perf_counter() - t
        total = time.perf_counter() - t
        n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ttft or total, (n - 1) / max(1e-6, total - (ttft or 0)), n, text

    modes = {"fp16 decode": enable_half_decode, "fp32": disable_half_decode}
    first: dict[str, list[float]] = {m: [] for m in modes}
    speed: dict[str, list[float]] = {m: [] for m in modes}
    answers: dict[str, tuple] = {}
    for rep in range(reps + 1):  # the first round is a warm-up
        for mode, switch in modes.items():
            switch(model)
            ttft, _, _, short = timed(image, "Describe the image in detail.")
            _, tps, n, long = timed(None, LONG_ANSWER)
            answers[mode] = (short, long, n)
            if rep:
                first[mode].append(ttft)
                speed[mode].append(tps)
    enable_half_decode(model)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    per = {m: {"first_text_ms": round(1000 * median(first[m]), 1), "tokens_per_s": round(median(speed[m]), 1)}
           for m in modes}
    served = per["fp16 decode"]
    return {**served, "per_mode": per, "decode_speedup": round(served["tokens_per_s"] / per["fp32"]["tokens_per_s"], 2),
            "same_answers": answers["fp16 decode"][:2] == answers["fp32"][:2], "image_answer": answers["fp32"][0],
            "long_answer": answers["fp32"][1], "long_answer_tokens": answers["fp32"][2], "reps": reps,
            "torch_threads": __import__("torch").get_num_threads(), "load_avg": os.getloadavg()}


def stage_cost(registry, rounds: int = 2, steps: int = 4) -> dict:
    """s/step (steady state: the first step of each run is dropped) under fp32 and bf16, alternating `rounds` times;
    where the recipe turns LoRA dropout off, also in its precision with peft's usual 0.05 (the cost of the dropout
    that LoRA applies to every adapted Linear's input), and where it adapts the tower's last blocks, also with the
    tower frozen, in the same rounds."""
    import statistics

    from ..train.recipes import RECIPES
    from ..train.rules import ReplayRule
    from ..train.tuner import StageConfig, native_bf16, passes_over, resolve_mixed_precision, steps_per_epoch
    from .quality import base_test_split

    recipe = RECIPES["small"]
    data = base_test_split(registry, registry.get("small"))  # 300 world records: only the step time is read
    native = native_bf16("cpu")
    # Emulated bf16 (an AVX2-only CPU) is ~30x slower a step: measured on a matmul instead of minutes of steps
    arms = {"no": ("no", recipe), "bf16": ("bf16", recipe)} if native else {"no": ("no", recipe)}  # (precision, recipe)
    ran = "bf16" if resolve_mixed_precision(recipe.get("mixed_precision"), "cpu") == "bf16" else "fp32"
    dropout = StageConfig.lora_dropout
    precision = "bf16" if ran == "bf16" else "no"  # the recipe's own, for the arms that change one thing of it
    with_dropout, tower_frozen = f"{ran}, lora dropout {dropout:g}", f"{ran}, tower frozen"
    if recipe.get("lora_dropout", dropout) != dropout:
        arms[with_dropout] = (precision, {**recipe, "lora_dropout": dropout})
    if recipe.get("vision_blocks"):  # what adapting the tower's last blocks costs a step, side by side
        arms[tower_frozen] = (precision, {**recipe, "vision_blocks": 0})
    per: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, (precision, variant) in arms.items():
            per[name].append(step_seconds(registry, data, variant, steps, precision))
    s_per_step = {("fp32" if k == "no" else k): round(statistics.median(v), 2) for k, v in per.items()}
    batch = recipe.get("batch_size", 16)
    # 1,000 records + the recipe's replay share, passed over as the tuner passes over them (one process)
    with_replay = 1000 + ReplayRule(recipe.get("replay_fraction", 0.0)).n_replay(1000)
    passes = passes_over(1000, recipe["epochs"], recipe.get("min_records", 0))
    steps_1000 = math.ceil(passes * steps_per_epoch(with_replay, batch))
    out = {"recipe": recipe, "batch": batch, "cpu": cpu_model(), "native_bf16": native, "s_per_step": s_per_step,
           "runs": {k: [round(x, 2) for x in v] for k, v in per.items()}, "recipe_runs_in": ran,
           "matmul_ms": matmul_ms(), "steps_1000_records": steps_1000,
           "minutes_1000_records": round(steps_1000 * s_per_step[ran] / 60, 1),
           "torch_threads": torch_threads(), "load_avg_start": os.getloadavg()}
    if native:
        out["speedup_bf16"] = round(s_per_step["fp32"] / s_per_step["bf16"], 2)
    if with_dropout in s_per_step:
        out["speedup_no_dropout"] = round(s_per_step[with_dropout] / s_per_step[ran], 2)
    if tower_frozen in s_per_step:
        out["cost_vision_blocks"] = round(s_per_step[ran] / s_per_step[tower_frozen], 2)
    return out


def step_seconds(registry, data, recipe: dict, steps: int, mixed_precision: str | None) -> float:
    """Seconds per optimizer step of a LoRA stage from `small` with `recipe` on `data` (`steps` + 1 steps are run; the
    first, with its warm-up, is dropped)."""
    from ..train.tuner import StageConfig, StageRecipe

    times = []
    cfg = StageConfig(data=str(data), method=recipe["method"], parent="small", max_steps=steps + 1, lr=recipe["lr"],
                      lora=True, lora_r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"],
                      lora_dropout=recipe.get("lora_dropout", StageConfig.lora_dropout),
                      batch_size=recipe.get("batch_size", 16), vision_blocks=recipe.get("vision_blocks", 0),
                      mixed_precision=mixed_precision, checkpoint_every=0, evaluate_after=False)
    stage = StageRecipe(cfg, registry, on_event=lambda e: e["type"] == "step" and times.append(time.perf_counter()))
    stage.setup()
    stage.train()
    return (times[-1] - times[0]) / (len(times) - 1)


def matmul_ms(repeats: int = 5) -> dict:
    """One 512x576 @ 576x1536 matmul (an MLP projection of `small` on a batch) in fp32 and bf16: why "auto"."""
    import torch

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        start = time.perf_counter()
        for _ in range(repeats):
            x @ y
        out[name] = round((time.perf_counter() - start) / repeats * 1000, 1)
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine_stamp() -> dict:
    """Where and when a timing ran (CPU, torch threads, load average at the end, UTC time): in every timing file."""
    return {"cpu": cpu_model(), "torch_threads": torch_threads(), "load_avg_end": os.getloadavg(),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench small", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/small")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--zero-shot-limit", type=int, default=50)
    p.add_argument("--force", action="store_true", help="measure again even where a cached result exists")
    p.add_argument("--candidate", type=Path, default=None,
                   help="measure a build's output folder (adapter/ + meta.json) instead of the shipped assets/small")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    home = out / "work" / "home"
    from ..versions import Registry, load_version

    results = {}
    model = processor = None
    for section in a.sections:
        cache = out / f"{section}.json"
        if cache.is_file() and not a.force:
            results[section] = json.loads(cache.read_text())
            continue
        t0 = time.time()
        if section == "install":
            import shutil

            shutil.rmtree(home, ignore_errors=True)
            res = install(home, a.candidate)
        else:
            if model is None:
                install(home, a.candidate)
                model, processor = load_version(Registry(home), "small")
            res = {"own": lambda: own_test(model, processor, Registry(home)),
                   "text": lambda: text_agreement(model, processor, cache=out / "work"),
                   "zeroshot": lambda: zero_shot_row(model, processor, out / "work", a.zero_shot_limit),
                   "photos": lambda: photos(model, processor),
                   "chat": lambda: chat_cost(model, processor),
                   "stage": lambda: stage_cost(Registry(home))}[section]()
        res.update(measured=time.strftime("%Y-%m-%d %H:%M"), seconds=round(time.time() - t0, 1),
                   load_avg_end=os.getloadavg()[0])
        atomic_write_json(cache, res)
        results[section] = res
        print(json.dumps({section: {k: v for k, v in res.items() if k != "rows"}}), flush=True)
    (out / "table.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    lines = []
    if "install" in r:
        lines += [f"- first launch (assemble from the wheels + adapter, write the version): "
                  f"{r['install']['install_seconds']} s, peak RSS {r['install']['peak_rss_mb']} MB "
                  f"(load {r['install']['load_avg_end']:.1f})"]
    if "own" in r:
        fam = ", ".join(f"{k} {v['accuracy']} (n={v['n']})" for k, v in r["own"]["per_family"].items())
        lines += [f"- own test: **{r['own']['accuracy']}%** (n={r['own']['n']}); per family: {fam}"]
    if "text" in r:
        t = r["text"]
        lines += [f"- text agreement with SmolLM2-135M-Instruct: **{t['agreement']}%** of {t['n']} prompts (key answer "
                  f"found in both or neither; small {t['small_key_accuracy']}% / SmolLM2 {t['smollm2_key_accuracy']}% "
                  f"right; identical answers {t['identical_answers']})"]
    if "zeroshot" in r:
        z = r["zeroshot"]
        lines += ["- zero-shot CoIN-mini: " + ", ".join(f"{k} {v}" for k, v in z["zero_shot"].items())
                  + f" ({z['tasks_in_10_70']} of 8 in 10-70)"]
    if "chat" in r:
        c = r["chat"]
        fp32 = c.get("per_mode", {}).get("fp32")
        versus = (f"; fp32 decoding, alternating in the same run: {fp32['first_text_ms']} ms, {fp32['tokens_per_s']} "
                  f"tokens/s ({c['decode_speedup']}x; same answers: {c['same_answers']})" if fp32 else "")
        lines += [f"- chat, one user, as the app serves it: first text {c['first_text_ms']} ms, {c['tokens_per_s']} "
                  f"tokens/s{versus} ({c['torch_threads']} torch threads, load {c['load_avg'][0]:.1f})"]
    if "stage" in r:
        st = r["stage"]
        per_step = ", ".join(f"{v} s/step {k}" for k, v in st["s_per_step"].items())
        bf16 = (f"bf16 autocast x{st['speedup_bf16']} (alternating runs)" if st.get("native_bf16")
                else f"no native bf16 on this CPU (one matmul: {st['matmul_ms']['fp32']} ms fp32, "
                     f"{st['matmul_ms']['bf16']} ms bf16), so the recipe runs fp32")
        if st.get("speedup_no_dropout"):
            bf16 += f"; without LoRA dropout x{st['speedup_no_dropout']} (alternating runs)"
        lines += [f"- a stage with the CLI recipe (batch {st.get('batch', 16)}) on {st.get('cpu', '?')}: {per_step}; "
                  f"{bf16}; "
                  f"1,000 records = {st['steps_1000_records']} steps = ~{st['minutes_1000_records']} min "
                  f"before evaluation (load {st['load_avg_end']:.1f})"]
    if "photos" in r:
        lines += ["", "| photo | question | answer |", "|---|---|---|"]
        lines += [f"| `{x['photo']}` | {x['question']} | {x['answer']} |" for x in r["photos"]["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

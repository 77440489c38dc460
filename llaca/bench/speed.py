"""What LLaCA costs, measured side by side in one process on the real default model (`base`).

    python -m llaca.bench speed          # -> bench_results/speed.json, bench_results/speed.md

- optimizer step: `AdamW.step()` vs `AdamW.step()` + `rule.after_step()` on the trainable parameters after a real
  backward (and, for scale, the whole training step: forward + backward + step, with and without the rule);
- a whole stage (`run_stage`, same data and steps) with `llaca` vs `seq`;
- memory: the rule's state in bytes (exact, from its tensors) against the trainable parameters and gradients, and
  the peak RSS of two child processes that each run the same stage with `seq` / `llaca`;
- chat: time to first token and tokens/s through `llaca.serve.chat.stream_answer` vs a bare `model.generate` on the same
  inputs (greedy, same max_new_tokens).

Timings alternate A/B/A/B (the order flips every round) so that a machine shared with other work slows both sides
alike; medians are reported. One torch thread, as the training benchmark and the worker use.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"optimizer_step_ratio": 1.05, "stage_ratio": 1.10, "chat_ttft_ms": 150.0, "chat_overhead_ratio": 1.10}


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 3)


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `reps` times, alternating between them (order reversed every other round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


# ------------------------------------------------------------------------------------------------ set-up

def _setup(registry, work: Path, batch_size: int):
    """The base model made trainable as a stage makes it (vision frozen), one real batch, a task folder."""
    from .. import data as D
    from ..data import coin_mini
    from ..versions import load_version

    task_dir = work / "data" / "gqa"   # two objects per image: the longest answers the base model gives
    if not (task_dir / "train" / "data.json").is_file():
        coin_mini.write_task(work / "data", "gqa", n_train=max(64, batch_size * 4), n_test=8, seed=0)
    model, processor = load_version(registry, "base")
    for name, p in model.named_parameters():
        p.requires_grad = "vision_tower" not in name
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    records = D.load_instruction_set(task_dir / "train").records
    encoder = D.RecordEncoder(processor, max_tokens=None)
    batch = D.collate([encoder.encode(r) for r in records[:batch_size]], processor.tokenizer.pad_token_id)
    return model, processor, params, batch, task_dir, records


def _backward(model, params, batch):
    model.train()
    for p in params.values():
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------------------ measurements

def measure_optimizer_step(model, params, batch, reps: int, full_reps: int) -> dict:
    import torch

    from ..train.rules import make_rule

    _backward(model, params, batch)
    opt = torch.optim.AdamW(params.values(), lr=1e-5)
    rules = {"llaca": make_rule("llaca"), "ema": make_rule("ema", beta=0.99)}
    for rule in rules.values():      # state exists from the first step on: time the steady state
        rule.start_stage(params)
        rule.after_step(params)
    t = interleaved({
        "adamw": lambda: opt.step(),
        "adamw+llaca": lambda: (opt.step(), rules["llaca"].after_step(params)),
        "adamw+ema": lambda: (opt.step(), rules["ema"].after_step(params)),
        "llaca_only": lambda: rules["llaca"].after_step(params),
    }, reps)

    def train_step(rule):
        def step():
            _backward(model, params, batch)
            opt.step()
            if rule is not None:
                rule.after_step(params)
        return step

    full = interleaved({"seq": train_step(None), "llaca": train_step(rules["llaca"])}, full_reps)
    med = {k: _median_ms(v) for k, v in t.items()}
    ratio = med["adamw+llaca"] / med["adamw"]
    full_ratio = _median_ms(full["llaca"]) / _median_ms(full["seq"])
    return {
        "adamw_ms": med["adamw"], "adamw_llaca_ms": med["adamw+llaca"], "adamw_ema_ms": med["adamw+ema"],
        "llaca_after_step_ms": med["llaca_only"], "ratio": round(ratio, 3), "ema_ratio": round(med["adamw+ema"] / med["adamw"], 3),
        "goal": GOALS["optimizer_step_ratio"], "met": ratio <= GOALS["optimizer_step_ratio"],
        "train_step_seq_ms": _median_ms(full["seq"]), "train_step_llaca_ms": _median_ms(full["llaca"]),
        "train_step_ratio": round(full_ratio, 3), "reps": reps, "train_step_reps": full_reps,
        "n_tensors": len(params), "n_params": sum(p.numel() for p in params.values()),
    }


def measure_stage(registry, task_dir: Path, work: Path, steps: int, reps: int, batch_size: int) -> dict:
    from ..train.tuner import StageConfig, run_stage
    from ..versions import Registry

    scratch = Registry(work / "stage-home")
    if not scratch.exists("base"):
        shutil.copytree(registry.get("base").path, scratch.root / "base")
    loops: dict[str, list[float]] = {"seq": [], "llaca": []}

    def stage(method):
        marks = []

        def on_event(e):
            if e["type"] in ("start", "step"):
                marks.append(time.perf_counter())

        def run():
            marks.clear()
            v = run_stage(StageConfig(data=str(task_dir / "train"), method=method, parent="base", max_steps=steps,
                                      batch_size=batch_size, evaluate_after=False, checkpoint_every=0), scratch,
                          on_event=on_event)
            loops[method].append(marks[-1] - marks[0])
            scratch.delete(v.id)
        return run

    warmup = int(reps > 1)   # a smoke run (1 rep) skips the warm-up round
    whole = interleaved({"seq": stage("seq"), "llaca": stage("llaca")}, reps, warmup=warmup)
    for v in loops.values():
        del v[:warmup]
    seq_s, llaca_s = statistics.median(whole["seq"]), statistics.median(whole["llaca"])
    loop_ratio = statistics.median(loops["llaca"]) / statistics.median(loops["seq"])
    return {"steps": steps, "reps": reps, "seq_s": round(seq_s, 2), "llaca_s": round(llaca_s, 2),
            "ratio": round(llaca_s / seq_s, 3), "train_loop_seq_s": round(statistics.median(loops["seq"]), 2),
            "train_loop_llaca_s": round(statistics.median(loops["llaca"]), 2), "train_loop_ratio": round(loop_ratio, 3),
            "goal": GOALS["stage_ratio"], "met": llaca_s / seq_s <= GOALS["stage_ratio"],
            "all_seq_s": [round(x, 2) for x in whole["seq"]], "all_llaca_s": [round(x, 2) for x in whole["llaca"]]}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)


def measure_memory(model, params, batch, registry, task_dir: Path, work: Path, steps: int, reps: int) -> dict:
    """Exact bytes of the rule state vs the trainable parameters, then peak RSS of seq / llaca child processes."""
    import torch

    from ..train.rules import make_rule

    _backward(model, params, batch)
    opt = torch.optim.AdamW(params.values(), lr=1e-5)
    opt.step()
    rule = make_rule("llaca")
    rule.start_stage(params)
    rule.after_step(params)
    param_b = _tensor_bytes(params.values())
    grad_b = _tensor_bytes(p.grad for p in params.values() if p.grad is not None)
    adam_b = _tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    state_b = _tensor_bytes(rule.state_dict().values())
    goal_b = param_b + grad_b   # "one extra copy of the trainable parameters plus the gradient copy"
    out = {"trainable_param_bytes": param_b, "grad_bytes": grad_b, "adamw_state_bytes": adam_b,
           "llaca_state_bytes": state_b, "llaca_state_over_params": round(state_b / param_b, 3),
           "goal_bytes": goal_b, "met": state_b <= goal_b}
    if reps:
        rss: dict[str, list[float]] = {"seq": [], "llaca": []}
        for _ in range(reps):   # the two children run at the same time: peak RSS is per process
            children = {m: _start_child(m, registry.home, task_dir, work, steps) for m in rss}
            for method, child in children.items():
                rss[method].append(_child_result(method, child))
        seq_mb, llaca_mb = statistics.median(rss["seq"]), statistics.median(rss["llaca"])
        out.update({"peak_rss_seq_mb": round(seq_mb, 1), "peak_rss_llaca_mb": round(llaca_mb, 1),
                    "peak_rss_delta_mb": round(llaca_mb - seq_mb, 1), "expected_delta_mb": round(state_b / 2**20, 1),
                    "rss_runs_mb": {k: [round(x, 1) for x in v] for k, v in rss.items()}, "rss_steps": steps})
    return out


def _start_child(method: str, home: Path, task_dir: Path, work: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llaca.bench", "speed", "--_mem-child", method, "--home", str(home),
           "--_task", str(task_dir), "--_work", str(work / f"mem-{method}"), "--stage-steps", str(steps)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child_result(method: str, child: subprocess.Popen) -> float:
    out, err = child.communicate()
    if child.returncode:
        raise RuntimeError(f"memory child ({method}) failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])["maxrss_mb"]


def _mem_child(method: str, home: str, task_dir: str, work: str, steps: int) -> int:
    import torch

    from ..train.tuner import StageConfig, run_stage
    from ..versions import Registry

    torch.set_num_threads(1)
    shutil.rmtree(work, ignore_errors=True)
    scratch = Registry(work)
    shutil.copytree(Registry(home).get("base").path, scratch.root / "base")
    run_stage(StageConfig(data=str(Path(task_dir) / "train"), method=method, parent="base", max_steps=steps,
                          evaluate_after=False, checkpoint_every=0), scratch)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))  # Linux: KiB
    return 0


def measure_chat(registry, records, reps: int, max_new_tokens: int) -> dict:
    """The default model loaded as the chat worker loads it (eval mode, no grads), one question, both paths."""
    import torch

    from ..data import load_image
    from ..serve.chat import _generation_kwargs, _prepare, stream_answer
    from ..versions import load_version

    model, processor = load_version(registry, "base")
    model.eval()
    image = load_image(records[0].image)
    question = "Describe the image briefly."
    gen_kw = _generation_kwargs(processor, max_new_tokens, 0.0)
    answers: dict = {}
    stream_first: list[float] = []
    stream_total: list[float] = []

    def prepared():
        inputs = _prepare(processor, image, (), question).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        return inputs

    inputs = prepared()
    n_prompt = inputs["input_ids"].shape[1]

    def stream():   # the library's path: prompt building + generate in a thread + TextIteratorStreamer
        t, text, ttft = time.perf_counter(), "", None
        for text in stream_answer(model, processor, image, question, max_new_tokens=max_new_tokens):
            if ttft is None and text:
                ttft = time.perf_counter() - t
        stream_total.append(time.perf_counter() - t)
        stream_first.append(ttft if ttft is not None else stream_total[-1])
        answers["stream"] = text

    @torch.inference_mode()
    def bare():
        answers["bare_ids"] = model.generate(**inputs, **gen_kw)[0, n_prompt:]

    @torch.inference_mode()
    def bare_first():
        model.generate(**inputs, **{**gen_kw, "max_new_tokens": 1})

    t = interleaved({"stream": stream, "bare": bare, "bare_first_token": bare_first, "prepare": prepared}, reps)
    del stream_first[0], stream_total[0]   # the warm-up round
    n_new = int(answers["bare_ids"].shape[0])
    bare_text = processor.tokenizer.decode(answers["bare_ids"], skip_special_tokens=True).strip()
    stream_s, bare_s, prep_s = (statistics.median(stream_total), statistics.median(t["bare"]),
                                statistics.median(t["prepare"]))
    ttft = statistics.median(stream_first) * 1000
    ratio = stream_s / (bare_s + prep_s)
    return {
        "question": question, "max_new_tokens": max_new_tokens, "new_tokens": n_new, "prompt_tokens": n_prompt,
        "same_text": answers["stream"] == bare_text, "answer": bare_text,
        "ttft_stream_ms": round(ttft, 1), "ttft_bare_ms": _median_ms(t["bare_first_token"]),
        "total_stream_ms": round(stream_s * 1000, 1), "total_bare_ms": _median_ms(t["bare"]),
        "prepare_ms": _median_ms(t["prepare"]),
        "tok_s_stream": round(n_new / stream_s, 1), "tok_s_bare": round(n_new / bare_s, 1),
        "overhead_ratio": round(ratio, 3), "overhead_ratio_vs_generate_only": round(stream_s / bare_s, 3),
        "goal_ttft_ms": GOALS["chat_ttft_ms"], "goal_ratio": GOALS["chat_overhead_ratio"],
        "met": ttft <= GOALS["chat_ttft_ms"] and ratio <= GOALS["chat_overhead_ratio"], "reps": reps,
    }


# ------------------------------------------------------------------------------------------------ report

def markdown(res: dict) -> str:
    o, s, m, c = res["optimizer_step"], res["stage"], res["memory"], res["chat"]
    yes = lambda ok: "yes" if ok else "**no**"   # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f} MiB"       # noqa: E731
    lines = [
        f"Measured {res['date']} on {res['machine']}; one torch thread; medians of interleaved A/B runs "
        f"(shared, noisy machine). {o['n_params']:,} trainable parameters in {o['n_tensors']} tensors.",
        "",
        "| what | without LLaCA | with LLaCA | ratio | goal | met |",
        "|---|---|---|---|---|---|",
        f"| optimizer step (AdamW.step {'+ after_step'}) | {o['adamw_ms']:.2f} ms | {o['adamw_llaca_ms']:.2f} ms | "
        f"{o['ratio']:.2f}x | <= {o['goal']}x | {yes(o['met'])} |",
        f"| training step (fwd + bwd + step) | {o['train_step_seq_ms']:.0f} ms | {o['train_step_llaca_ms']:.0f} ms | "
        f"{o['train_step_ratio']:.3f}x | | |",
        f"| whole stage ({s['steps']} steps, run_stage) | {s['seq_s']:.1f} s | {s['llaca_s']:.1f} s | "
        f"{s['ratio']:.3f}x | <= {s['goal']}x | {yes(s['met'])} |",
        f"| ... its training loop only | {s['train_loop_seq_s']:.1f} s | {s['train_loop_llaca_s']:.1f} s | "
        f"{s['train_loop_ratio']:.3f}x | | |",
        f"| extra state (ema + g_prev, exact) | 0 | {mib(m['llaca_state_bytes'])} | "
        f"{m['llaca_state_over_params']:.2f}x params | <= params + grads = {mib(m['goal_bytes'])} | {yes(m['met'])} |",
    ]
    if "peak_rss_seq_mb" in m:
        lines.append(f"| peak RSS of a {m['rss_steps']}-step stage (child process) | {m['peak_rss_seq_mb']:.0f} MiB | "
                     f"{m['peak_rss_llaca_mb']:.0f} MiB | +{m['peak_rss_delta_mb']:.1f} MiB (state: "
                     f"{m['expected_delta_mb']:.1f}) | | |")
    lines += [
        f"| chat: time to first token | bare generate(max_new_tokens=1) {c['ttft_bare_ms']:.0f} ms | "
        f"stream_answer {c['ttft_stream_ms']:.0f} ms | | <= {c['goal_ttft_ms']:.0f} ms | {yes(c['ttft_stream_ms'] <= c['goal_ttft_ms'])} |",
        f"| chat: {c['new_tokens']} tokens, total | bare {c['total_bare_ms']:.0f} ms + prepare {c['prepare_ms']:.1f} ms "
        f"({c['tok_s_bare']:.0f} tok/s) | stream {c['total_stream_ms']:.0f} ms ({c['tok_s_stream']:.0f} tok/s) | "
        f"{c['overhead_ratio']:.3f}x | <= {c['goal_ratio']}x | {yes(c['overhead_ratio'] <= c['goal_ratio'])} |",
        "",
        f"AdamW keeps {mib(m['adamw_state_bytes'])} of moments; the trainable parameters are {mib(m['trainable_param_bytes'])}, "
        f"their gradients {mib(m['grad_bytes'])}. Streamed and bare answers identical: {c['same_text']}.",
    ]
    return "\n".join(lines) + "\n"


def run_speed(home=None, out: Path = Path("bench_results"), reps: int = 40, train_reps: int = 20, stage_steps: int = 40,
              stage_reps: int = 3, mem_steps: int = 20, mem_reps: int = 2, chat_reps: int = 20,
              max_new_tokens: int = 48, batch_size: int = 16, log=print) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_speed(home, Path(out), reps, train_reps, stage_steps, stage_reps, mem_steps, mem_reps, chat_reps,
                          max_new_tokens, batch_size, log)
    finally:
        torch.set_num_threads(threads)


def _run_speed(home, out, reps, train_reps, stage_steps, stage_reps, mem_steps, mem_reps, chat_reps, max_new_tokens,
               batch_size, log) -> dict:
    import torch
    import transformers

    from ..bases.install import ensure_base
    from ..versions import Registry

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    registry = Registry(home) if home else Registry()
    ensure_base(registry, base="tiny")
    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs, load avg "
           f"{os.getloadavg()[0]:.1f} at start", "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="llaca-speed-") as tmp:
        work = Path(tmp)
        model, processor, params, batch, task_dir, records = _setup(registry, work, batch_size)
        log("optimizer step ...", flush=True)
        res["optimizer_step"] = measure_optimizer_step(model, params, batch, reps, train_reps)
        log(f"  {res['optimizer_step']}", flush=True)
        log("chat ...", flush=True)
        res["chat"] = measure_chat(registry, records, chat_reps, max_new_tokens)
        log(f"  {res['chat']}", flush=True)
        log("memory ...", flush=True)
        res["memory"] = measure_memory(model, params, batch, registry, task_dir, work, mem_steps, mem_reps)
        log(f"  {res['memory']}", flush=True)
        del model
        log("whole stage ...", flush=True)
        res["stage"] = measure_stage(registry, task_dir, work, stage_steps, stage_reps, batch_size)
        log(f"  {res['stage']}", flush=True)
    res["machine"] += f", {os.getloadavg()[0]:.1f} at end"
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(res, indent=1))
    (out / "speed.md").write_text(markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results", help="folder for speed.json and speed.md")
    p.add_argument("--home", help="registry with the `base` version (default $LLACA_HOME)")
    p.add_argument("--reps", type=int, default=40, help="interleaved optimizer-step timings per variant")
    p.add_argument("--train-reps", type=int, default=20, help="interleaved full training steps per variant")
    p.add_argument("--stage-steps", type=int, default=40, help="steps of the timed stages")
    p.add_argument("--stage-reps", type=int, default=3, help="timed stages per method (interleaved)")
    p.add_argument("--mem-steps", type=int, default=20, help="steps of the peak-RSS child stages")
    p.add_argument("--mem-reps", type=int, default=2, help="child runs per method (0: skip peak RSS)")
    p.add_argument("--chat-reps", type=int, default=20, help="interleaved chat timings per variant")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    p.add_argument("--_task", dest="task", help=argparse.SUPPRESS)
    p.add_argument("--_work", dest="work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        return _mem_child(args.mem_child, args.home, args.task, args.work, args.stage_steps)
    res = run_speed(args.home, Path(args.out), args.reps, args.train_reps, args.stage_steps, args.stage_reps,
                    args.mem_steps, args.mem_reps, args.chat_reps, args.max_new_tokens)
    print(markdown(res))
    return 0

"""A tqdm bar for the tuner's events: what the CLI and the benchmarks show while a stage runs."""
from __future__ import annotations

import os
import sys


def progress_printer(desc: str):
    """A tqdm bar fed by the tuner's events (steps, loss, alpha); silent on all but the first process."""
    from tqdm.auto import tqdm

    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, rank 0 speaks for all
        return lambda event: None

    state = {"bar": None, "phase": None}

    def on_event(event: dict):
        kind = event.get("type")
        if kind in ("start", "step"):
            phase = event.get("phase", "stage")
            bar = state["bar"]
            # a new bar per phase, and per stage of a multi-stage job (its total changes or its step restarts)
            new_stage = bar is not None and (bar.total != event["total_steps"] or event.get("step", 0) < bar.n)
            if bar is None or state["phase"] != phase or new_stage:
                if state["bar"] is not None:
                    state["bar"].close()
                state["bar"] = tqdm(total=event["total_steps"], desc=f"{desc} [{phase}]", unit="step",
                                    initial=event.get("step", 0), file=sys.stderr)
                state["phase"] = phase
            if kind == "step":
                bar = state["bar"]
                bar.update(event["step"] - bar.n)
                post = {"loss": f"{event['loss']:.3f}"}
                if "alpha_mean" in event:
                    post["alpha"] = f"{event['alpha_mean']:.3g}"
                bar.set_postfix(post)
        elif kind == "eval":
            print(f"  eval {event['dataset']}: {event['accuracy']:.1f}%", file=sys.stderr)
        elif kind == "start" and event.get("resumed"):
            print(f"  resuming from step {event['step']}", file=sys.stderr)

    return on_event

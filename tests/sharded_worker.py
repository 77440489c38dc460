"""Runs several stages in ONE multi-process launch (tests/test_sharded.py), so that N rule x mode cases pay the
process start-up (~10 s on 2 busy cores) once:

    accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml tests/sharded_worker.py JOBS.json

JOBS.json is a list of {"home": registry dir, "config": StageConfig fields, "crash_at": step or null}. Each job trains
its stage with `run_stage`, exactly as `python -m llaca learn` would. `crash_at`: every rank dies (os._exit, no clean
up, like a kill) right after the checkpoint of that step is written; such a job must come last.
"""
from __future__ import annotations

import json
import os
import sys
import time

CRASH_EXIT = 17


def main(jobs_file: str) -> None:
    from llaca.train.tuner import StageConfig, run_stage
    from llaca.versions import Registry

    for job in json.loads(open(jobs_file).read()):
        crash_at = job.get("crash_at")

        def on_event(event, crash_at=crash_at):
            if crash_at and event["type"] == "checkpoint" and event["step"] == crash_at:
                os._exit(CRASH_EXIT)

        t = time.time()
        run_stage(StageConfig(**job["config"]), Registry(job["home"]), on_event=on_event)
        print(f"{job['home']}: {time.time() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])

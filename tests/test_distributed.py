"""Multi-process training: `accelerate launch ... -m llaca learn` with 2 CPU processes (DDP over gloo) gives the
single-process result for the same global batch and seed, every rank computes the same alpha, only rank 0 writes.

Tolerance. The stage loop normalises the loss by the label tokens of the whole global batch (tuner.py), so two ranks
with 4 records each compute the gradient one process computes with 8, up to float summation order. Measured here on
vizwiz (answers of 2 or 3 label tokens, so the two halves of a batch differ in token count), 4 LLaCA steps:

    max |w_ddp - w_single|                 1.9e-6     tolerance 1e-4
    |D_ddp - D_single| / |D_single|        4.0e-5     tolerance 1e-3   (D = change from the parent, L2 over all)
    alpha, per tensor per step (relative)  4.5e-6     tolerance 1e-4

Real bugs measured on the same run land far outside: each rank a token-mean of its own half (a mean of means) gives
1.6e-3 / 6.6% / 10%; a gradient not scaled for DDP's averaging 9e-4 / 42% / 98% (Adam hides it in the raw weights,
LLaCA's alpha does not); both ranks training on the same shard 1.7e-3 / 58% / >100%.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llaca.data import load_instruction_set
from llaca.tuner import DEFAULT_RECIPE, StageConfig, run_stage
from llaca.versions import Registry

REPO = Path(__file__).resolve().parents[1]
MAX_ABS, MAX_REL_UPDATE, MAX_REL_ALPHA = 1e-4, 1e-3, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_process_ddp_matches_single_process(quick_home, llaca_home, coin_dir, tmp_path):
    data = coin_dir / "vizwiz" / "train"
    args = dict(max_steps=4, batch_size=8, seed=0)  # `learn`'s defaults otherwise: llaca + 20% replay, lr 3e-4

    # The data must exercise the token normalisation: answers of different lengths.
    assert len({len(r.answer) for r in load_instruction_set(data).records}) > 1

    single = run_stage(StageConfig(data=str(data), parent="base", evaluate_after=False,
                                   trace_dir=str(tmp_path / "single"), **DEFAULT_RECIPE, **args), Registry(llaca_home))
    assert single.meta["hparams"]["replay_fraction"] == DEFAULT_RECIPE["replay_fraction"]

    ddp_home = tmp_path / "ddp_home"
    shutil.copytree(quick_home, ddp_home, symlinks=True)
    env = {**os.environ, "LLACA_HOME": str(ddp_home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "examples/accelerate_ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "llaca", "learn", str(data), "--from", "base",
           "--max-steps", str(args["max_steps"]), "--batch-size", str(args["batch_size"]), "--seed", str(args["seed"]),
           "--trace-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["v1"]  # rank 0 prints the new version; rank 1 writes nothing

    # Only rank 0 wrote: one new version, nothing half-written, evaluated (rank 0 only) after the stage.
    registry = Registry(ddp_home)
    assert [v.id for v in registry.list()] == ["base", "v1"]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]
    meta = registry.get("v1").meta
    assert meta["processes"] == 2 and "vizwiz-test" in meta["metrics"]["test"]

    # Every rank computed the same alpha per tensor per step, the same loss, and ended with the same weights.
    rank0, rank1 = read_trace(tmp_path / "ddp" / "rank0.jsonl"), read_trace(tmp_path / "ddp" / "rank1.jsonl")
    assert len(rank0) == args["max_steps"] + 1
    assert rank0 == rank1

    # ... and the single-process run's.
    ref = read_trace(tmp_path / "single" / "rank0.jsonl")
    for s, d in zip(ref[:-1], rank0[:-1]):
        assert abs(s["loss"] - d["loss"]) <= 1e-5 * abs(s["loss"])
        assert s["alpha"].keys() == d["alpha"].keys()
        worst = max(abs(s["alpha"][k] - d["alpha"][k]) / s["alpha"][k] for k in s["alpha"])
        assert worst <= MAX_REL_ALPHA, f"step {s['step']}: alpha differs by {worst:.2e} (relative)"

    got = load_file(str(registry.get("v1").path / "model" / "model.safetensors"))
    want = load_file(str(single.path / "model" / "model.safetensors"))
    parent = load_file(str(registry.get("base").path / "model" / "model.safetensors"))
    max_abs = max((got[k] - want[k]).abs().max().item() for k in want)
    diff = sum(((got[k] - want[k]).double() ** 2).sum() for k in want) ** 0.5
    update = sum(((want[k] - parent[k]).double() ** 2).sum() for k in want) ** 0.5
    assert update > 0.01  # the stage really moved the weights
    assert max_abs <= MAX_ABS, f"max weight difference {max_abs:.2e}"
    assert diff / update <= MAX_REL_UPDATE, f"relative update difference {float(diff / update):.2e}"


def test_launches_the_loop_cannot_run_correctly_are_refused(monkeypatch):
    """A multi-process launch that accelerate did not set up as DDP would have every rank train alone and save;
    sharded launches (FSDP, DeepSpeed) would hand the rule stale or partial tensors. Both stop with a clear error."""
    from accelerate.utils import DistributedType

    import llaca.tuner as tuner

    class FakeAccelerator:
        num_processes, distributed_type = 1, DistributedType.NO

        def __init__(self, cpu=False):
            pass

    monkeypatch.setattr("accelerate.Accelerator", FakeAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes but accelerate set up 1"):
        tuner.make_accelerator()
    monkeypatch.setenv("WORLD_SIZE", "1")
    FakeAccelerator.distributed_type = DistributedType.FSDP
    with pytest.raises(ValueError, match="FSDP is not supported by the stage loop"):
        tuner.make_accelerator()

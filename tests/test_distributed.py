"""Multi-process training: `accelerate launch ... -m llaca learn` with 2 CPU processes (DDP over gloo) gives the
single-process result for the same global batch and seed, every rank computes the same alpha, only rank 0 writes.
Sharded (FSDP2, configs/accelerate/fsdp_cpu.yaml): the same for every rule, full and LoRA, and a killed stage resumes
from its sharded checkpoint to the uninterrupted result (second half of this file).

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
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llaca.data import load_instruction_set
from llaca.train.tuner import DEFAULT_RECIPE, StageConfig, run_stage
from llaca.versions import Registry, load_version

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
    DeepSpeed zeroes the gradients before the rule reads them (and on CPU accelerate would quietly run DDP instead);
    FSDP version 1 hides the per-tensor shards. Each stops with a clear error that says what to use instead."""
    from accelerate.utils import DistributedType

    import llaca.train.tuner as tuner

    class FakeAccelerator:
        num_processes, distributed_type, is_fsdp2 = 1, DistributedType.NO, False

        def __init__(self, cpu=False):
            pass

    monkeypatch.setattr("accelerate.Accelerator", FakeAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes but accelerate set up 1"):
        tuner.make_accelerator()
    monkeypatch.setenv("WORLD_SIZE", "1")
    FakeAccelerator.distributed_type = DistributedType.FSDP
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        tuner.make_accelerator()
    FakeAccelerator.is_fsdp2 = True
    assert isinstance(tuner.make_accelerator(), FakeAccelerator)
    for how in ("env", "state"):
        with monkeypatch.context() as m:
            if how == "env":  # what `accelerate launch` exports for a DeepSpeed config, CUDA or not
                m.setenv("ACCELERATE_USE_DEEPSPEED", "true")
            else:
                m.setattr(FakeAccelerator, "distributed_type", DistributedType.DEEPSPEED)
            with pytest.raises(ValueError, match="DeepSpeed is not supported.*zeroes the gradients.*fsdp_gpu.yaml"):
                tuner.make_accelerator()


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2 (sharded) stages: `accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml`, 2 CPU processes over gloo.
#
# One launch trains every rule x {full, LoRA} case (tests/sharded_worker.py: the process start-up, ~10-20 s on 2 busy
# cores, is paid once), while this process trains the same configs unsharded; a second launch is the CLI path
# (`-m llaca learn`) resuming a stage the first launch killed. Same data and tolerances' reasoning as the DDP test:
# sharding changes only float summation order (gradient reduce-scatter, L1 shard sums), nothing else.
# Measured (4 steps, batch 8, vizwiz; docs/sharded-training.md has the table): per-tensor relative weight difference
# <= 1.1e-6 (full), all weights together <= 9e-8, alpha per tensor per step within 1.6e-6 relative, the fallback
# steps the same; ranks bit-identical.

FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp_cpu.yaml"
MAX_REL_WEIGHT, MAX_REL_ALPHA_FSDP = 1e-5, 1e-5
RULE_CASES = [(m, mode) for mode in ("full", "lora") for m in ("llaca", "ema", "seq", "replay")]
STAGE = dict(max_steps=4, batch_size=8, seed=0, evaluate_after=False)


def stage_config(data: Path, method: str, mode: str, trace_dir: Path) -> dict:
    """StageConfig fields of one case. llaca runs the default recipe (`learn`'s: + 20% replay), so its FSDP run is
    also the uninterrupted twin of the CLI run in the resume test. LoRA dropout 0: each rank draws its own dropout
    masks for its half of the batch, which no single process reproduces (the equivalence would be statistical only)."""
    cfg = {**DEFAULT_RECIPE, "method": method, **STAGE, "data": str(data), "parent": "base",
           "trace_dir": str(trace_dir)}
    if method != "llaca":
        cfg["replay_fraction"] = 0.0
    if mode == "lora":
        cfg.update(lora=True, lora_dropout=0.0)
    return cfg


def launch(args: list[str], home: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if home:
        env["LLACA_HOME"] = str(home)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--main_process_port", str(free_port()), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def fsdp_runs(quick_home, coin_dir, tmp_path_factory):
    """Every case trained sharded (one launch, in the background) and unsharded (here, meanwhile); plus a llaca stage
    killed right after its step-2 checkpoint. Returns {case: (fsdp home, single home)} and the killed stage's home."""
    from llaca.train.tuner import StageConfig, run_stage

    root = tmp_path_factory.mktemp("fsdp")
    data = coin_dir / "vizwiz" / "train"
    jobs, homes = [], {}
    for method, mode in RULE_CASES:
        case = f"{method}-{mode}"
        fsdp_home, single_home = root / case / "fsdp", root / case / "single"
        for h in (fsdp_home, single_home):
            shutil.copytree(quick_home, h, symlinks=True)
        jobs.append({"home": str(fsdp_home), "config": stage_config(data, method, mode, root / case / "fsdp-trace")})
        homes[case] = (fsdp_home, single_home)
    killed = root / "killed"
    shutil.copytree(quick_home, killed, symlinks=True)
    jobs.append({"home": str(killed), "crash_at": 2,
                 "config": {**stage_config(data, "llaca", "full", root / "killed-trace"), "checkpoint_every": 2}})
    (root / "jobs.json").write_text(json.dumps(jobs))

    proc = launch([str(REPO / "tests" / "sharded_worker.py"), str(root / "jobs.json")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the launch's 2 processes: more threads than cores would slow all three down
    try:
        for method, mode in RULE_CASES:
            case = f"{method}-{mode}"
            run_stage(StageConfig(**stage_config(data, method, mode, root / case / "single-trace")),
                      Registry(homes[case][1]))
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        torch.set_num_threads(threads)
    # The last job kills every rank (exit 17) after its checkpoint: the launch fails, and only that way.
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*17", err), err[-3000:]
    return root, homes, killed


def weights(version) -> dict:
    files = list(version.path.glob("model/*.safetensors")) + list(version.path.glob("adapter/*.safetensors"))
    assert len(files) == 1, files  # one consolidated file, as any version: no shards
    return load_file(str(files[0]))


@pytest.mark.parametrize("method,mode", RULE_CASES, ids=[f"{m}-{mode}" for m, mode in RULE_CASES])
def test_fsdp_stage_matches_single_process(fsdp_runs, method, mode):
    root, homes, _ = fsdp_runs
    case = f"{method}-{mode}"
    fsdp, single = (Registry(h).get("v1") for h in homes[case])
    assert fsdp.meta["processes"] == 2 and fsdp.meta["weights"] == single.meta["weights"]

    # Every rank computed the same alpha (bit for bit: the norms are all-reduced), loss and final weights.
    rank0, rank1 = (read_trace(root / case / "fsdp-trace" / f"rank{k}.jsonl") for k in (0, 1))
    assert len(rank0) == STAGE["max_steps"] + 1 and rank0 == rank1

    # The alpha trace is the single process's: the same tensors, the same fallback steps, values within 1e-5.
    ref = read_trace(root / case / "single-trace" / "rank0.jsonl")
    for s, d in zip(ref[:-1], rank0[:-1]):
        assert abs(s["loss"] - d["loss"]) <= 1e-5 * abs(s["loss"])
        if s["alpha"] is None:  # seq / replay keep no EMA; ema's alpha is the constant 1 - beta, not traced
            assert d["alpha"] is None and method != "llaca"
            continue
        assert s["alpha"].keys() == d["alpha"].keys()
        fallback = 0.01 if method == "llaca" else None
        assert [a == fallback for a in s["alpha"].values()] == [a == fallback for a in d["alpha"].values()]
        worst = max(abs(s["alpha"][k] - d["alpha"][k]) / s["alpha"][k] for k in s["alpha"])
        assert worst <= MAX_REL_ALPHA_FSDP, f"step {s['step']}: alpha differs by {worst:.2e} (relative)"

    # Weights: per tensor ||w_fsdp - w_single|| / ||w_single|| <= 1e-5. That alone would pass a stage that barely
    # moved (ema 0.99 moves the weights ~1e-5 in 4 steps), so the change from the parent must agree too, to 1e-3 as
    # under DDP. LoRA's lora_B starts at 0: it is all change, so it is held to the change criterion only (AdamW's
    # first steps, g / (|g| + eps), amplify float-order noise where |g| ~ eps: measured up to 2.4e-5 relative there).
    got, want = weights(fsdp), weights(single)
    assert got.keys() == want.keys()
    rel = {k: float((got[k] - want[k]).norm() / want[k].norm()) for k in want if "lora_B" not in k}
    worst = max(rel, key=rel.get)
    assert rel[worst] <= MAX_REL_WEIGHT, f"{worst}: relative weight difference {rel[worst]:.2e}"
    parent = (load_file(str(Registry(homes[case][1]).get("base").path / "model" / "model.safetensors"))
              if mode == "full" else {k: torch.zeros_like(t) for k, t in want.items() if "lora_B" in k})
    update = sum(float(((want[k] - parent[k]).double() ** 2).sum()) for k in parent) ** 0.5
    diff = sum(float(((got[k] - want[k]).double() ** 2).sum()) for k in parent) ** 0.5
    assert update > 1e-4, "the stage did not move the weights: the comparison would prove nothing"
    assert diff / update <= MAX_REL_UPDATE, f"relative update difference {diff / update:.2e}"


def test_killed_fsdp_stage_resumes_through_the_cli(fsdp_runs, coin_dir, tmp_path):
    """The stage killed after its step-2 checkpoint resumes from the sharded checkpoint under `accelerate launch
    --config_file configs/accelerate/fsdp_cpu.yaml -m llaca learn` (the documented command) and ends exactly where
    the uninterrupted FSDP stage ended; the version is one safetensors model, evaluated, and rank 0 alone wrote."""
    root, homes, killed = fsdp_runs
    ckpt = killed / "runs"
    (run_dir,) = list(ckpt.iterdir())
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["sharded"] and state["processes"] == 2

    # Sharded: each rank wrote its own shard of the weights and of the rule's state (EMA, previous gradient), and
    # the two shards of every tensor together are the whole tensor.
    shard = [load_file(str(run_dir / "checkpoint" / f"shard-{k}.{what}.safetensors"))
             for k in (0, 1) for what in ("trainable", "rule")]
    w0, r0, w1, r1 = shard
    full_shapes = {n: p.shape for n, p in load_version(Registry(killed), "base")[0].named_parameters()}
    assert w0.keys() == w1.keys() and set(w0) <= set(full_shapes)
    for name in w0:
        for w, r in ((w0, r0), (w1, r1)):
            assert r[f"ema.{name}"].shape == w[name].shape == r[f"g_prev.{name}"].shape
        assert torch.cat([w0[name], w1[name]]).shape == full_shapes[name]   # FSDP2 shards dim 0

    args = ["-m", "llaca", "learn", str(coin_dir / "vizwiz" / "train"), "--from", "base", "--trace-dir", str(tmp_path),
            "--max-steps", str(STAGE["max_steps"]), "--batch-size", str(STAGE["batch_size"]),
            "--seed", str(STAGE["seed"])]
    out, err = launch(args, home=killed).communicate(timeout=300)
    assert out.split() == ["v1"], err[-3000:]
    steps = [e["step"] for e in read_trace(tmp_path / "rank0.jsonl") if "step" in e]
    assert steps == [3, 4]  # resumed: steps 1-2 came from the checkpoint

    registry = Registry(killed)
    assert [v.id for v in registry.list()] == ["base", "v1"] and not run_dir.exists()
    meta = registry.get("v1").meta
    assert meta["processes"] == 2 and meta["metrics"]["test"]["vizwiz-test"]["n"] > 0
    resumed, uninterrupted = weights(registry.get("v1")), weights(Registry(homes["llaca-full"][0]).get("v1"))
    assert resumed.keys() == uninterrupted.keys()
    worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    assert worst == 0.0, f"resumed stage differs from the uninterrupted one by {worst:.2e}"

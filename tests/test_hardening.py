"""Hardening: broken uploads, disk faults and concurrent instances never lose or corrupt a version.

Every broken set in `tests/broken_sets.py` goes through the three front doors (library `validate`, the
CLI, the UI's upload check) and must come back as a message naming file/record/field, with the registry
and the job queue exactly as before. Faults are real where the machine allows it: a tiny tmpfs for a
full disk, a read-only remount for an unwritable `$LLACA_HOME`.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from broken_sets import CASES, png, record
from PIL import Image

from llaca import cli
from llaca.data import Limits, validate
from llaca.jobs import JobStore, try_lock
from llaca.versions import Registry

ROOT = Path(__file__).resolve().parents[1]


def registry_state(home: Path) -> dict:
    """Version ids -> sha256 of every file in the version (what 'nothing lost, nothing changed' means)."""
    state = {}
    for v in Registry(home).list():
        h = hashlib.sha256()
        for f in sorted(p for p in v.path.rglob("*") if p.is_file()):
            h.update(f.relative_to(v.path).as_posix().encode() + f.read_bytes())
        state[v.id] = h.hexdigest()
    return state


@pytest.fixture(scope="module")
def hard_home(quick_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("hard") / "home"
    shutil.copytree(quick_home, home, symlinks=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLACA_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def studio(hard_home):
    from app import Studio

    s = Studio(hard_home, start_worker=False)
    yield s
    s.close()


def run_cli(*argv: str) -> tuple[int, str]:
    """(exit status, stderr without the progress bar): what a user sees of the in-process CLI."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(list(argv))
    text = err.getvalue()
    return rc, text[text.find("error: "):] if "error: " in text else text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_set_is_refused_everywhere_with_where_and_what(case, hard_home, studio, tmp_path):
    from app.learn_tab import _newest_processor, check_upload

    files = case.build(tmp_path / case.name)
    before, jobs_before = registry_state(hard_home), [j.id for j in JobStore(hard_home).list()]
    data = files[0] if files[0].suffix == ".zip" else files[0].parent

    report = validate(data, processor=_newest_processor(studio))  # the token limit needs the tokenizer
    text = "\n".join(str(p) for p in report.problems)
    assert not report.ok and all(f in text for f in case.expect), text

    markdown, gallery, staged = check_upload(studio, [str(f) for f in files], None)
    assert staged == "", "a broken set must not be offered for training"
    assert all(f in html.unescape(markdown) for f in case.expect), markdown
    assert "Traceback" not in markdown

    rc, err = run_cli("learn", str(data), "--method", "llaca", "--max-steps", "2", "--no-eval")
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert all(f in err for f in case.expect), err

    assert registry_state(hard_home) == before
    assert [j.id for j in JobStore(hard_home).list()] == jobs_before
    assert not (tmp_path.parent / "outside.txt").exists() and not (hard_home / "outside.txt").exists()
    assert not list((hard_home / "uploads").glob("*-images*"))  # embedded images are kept only for valid sets


def test_100k_records_validate_streaming_in_bounded_memory(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    png(folder / "a.png")
    head, tail = json.dumps(record("X")).split('"X"')
    with open(folder / "data.jsonl", "w") as f:
        f.writelines(f'{head}"{i}"{tail}\n' for i in range(100_000))
    tracemalloc.start()
    t0 = time.perf_counter()
    report = validate(folder)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\n100k records: validated in {seconds:.1f} s (under tracemalloc), peak {peak / 2**20:.0f} MiB")
    assert report.ok and len(report.records) == 100_000
    assert peak < 256 * 2**20  # the 17 MB file is streamed; what stays is the parsed records
    # The record cap stops reading early instead of parsing everything first.
    capped = validate(folder, Limits(max_records=1_000))
    assert not capped.ok and "more than 1000 records" in str(capped.problems[-1])
    assert len(capped.records) == 1_000
    # A .json list is parsed whole, so its size is capped (JSONL is the way for big sets).
    (folder / "data.jsonl").rename(folder / "data.json.txt")
    (folder / "data.json").write_text("[" + ",".join(json.dumps(record(i)) for i in range(2_000)) + "]")
    small_cap = validate(folder, Limits(max_json_bytes=10_000))
    assert "over the limit of 10000 for a .json list" in str(small_cap.problems[0])


# -------------------------------------------------------------------------------------- disk faults

@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): disk faults need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_disk_full_and_read_only_home_fail_cleanly_and_lose_nothing(quick_home, coin_dir, tmp_path, monkeypatch):
    mount = tmp_path / "disk"
    need = _du(quick_home)
    with tmpfs(mount, f"{need // 1024 + 3 * 1024}k"):  # the base fits; a stage's checkpoint does not
        home = mount / "home"
        shutil.copytree(quick_home, home, symlinks=True)
        monkeypatch.setenv("LLACA_HOME", str(home))
        before = registry_state(home)
        data = str(coin_dir / "sciqa" / "train")

        rc, err = run_cli("learn", data, "--method", "llaca", "--max-steps", "3", "--no-eval")
        print(f"\ndisk full -> {err.strip()}")
        assert rc == 2 and err.startswith("error: ") and "No space left on device" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert registry_state(home) == before  # nothing half-written is listed, the base is byte-identical
        assert not [p for p in (home / "versions").iterdir() if p.name not in before]  # temp dirs cleaned

        # Read-only: listing and answering still work, learning says why it cannot.
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        rc, err = run_cli("learn", data, "--method", "llaca", "--max-steps", "3", "--no-eval")
        assert rc == 2 and "Read-only file system" in err and len(err.strip().splitlines()) == 1, err
        assert run_cli("versions", "--json")[0] == 0
        image = tmp_path / "q.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
        assert run_cli("ask", "base", str(image), "What color is the circle?")[0] == 0

        # Space back: the same command now succeeds on the untouched registry.
        subprocess.run(["mount", "-o", f"remount,rw,size={need // 1024 + 64 * 1024}k", str(mount)], check=True)
        rc, err = run_cli("learn", data, "--method", "llaca", "--max-steps", "3", "--no-eval")
        assert rc == 0, err
        after = registry_state(home)
        assert {k: after[k] for k in before} == before and len(after) == len(before) + 1


# ---------------------------------------------------------------------------------- two instances

def test_second_worker_on_the_same_home_refuses_to_train(tmp_path):
    store = JobStore(tmp_path)
    job = store.submit({"data": str(tmp_path / "nowhere"), "method": "seq"}, label="waits")
    with try_lock(store.worker_lock) as mine:  # what the first app instance's worker holds
        assert mine
        done = subprocess.run([sys.executable, "-m", "llaca.jobs", "worker", "--home", str(tmp_path),
                               "--idle-exit", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0 and "another worker holds the lock" in done.stdout
        assert store.get(job.id).status == "queued"  # untouched: the lock holder will take it
    with try_lock(store.worker_lock) as free:
        assert free  # released when its holder is done (flock dies with the process too)


# ------------------------------------------------------------------------------ SIGKILL mid-stage

KILLABLE_STAGE = """
import sys, time
from llaca.train.tuner import StageConfig, run_stage
from llaca.versions import Registry

def slow(event):  # slow enough to be killed between checkpoints
    if event["type"] == "checkpoint":
        print("checkpoint", event["step"], flush=True)
    if event["type"] == "step":
        time.sleep(0.2)

run_stage(StageConfig(data=sys.argv[1], method="llaca", parent="base", max_steps=8, batch_size=8,
                      checkpoint_every=2, evaluate_after=False, name=sys.argv[2]), Registry(), on_event=slow)
"""


def test_sigkill_mid_stage_loses_nothing_and_resume_equals_uninterrupted(llaca_home, coin_dir):
    import signal

    from llaca.train.tuner import StageConfig, run_stage

    data = str(coin_dir / "vizwiz" / "train")
    before = registry_state(llaca_home)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_STAGE, data, "killed"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ})
    for line in proc.stdout:
        if line.startswith("checkpoint 4"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(60) == -signal.SIGKILL
    assert registry_state(llaca_home) == before  # parent bitwise equal, nothing half-written listed

    common = dict(data=data, method="llaca", parent="base", max_steps=8, batch_size=8, checkpoint_every=2,
                  evaluate_after=False)
    events = []
    resumed = run_stage(StageConfig(**common, name="killed"), Registry(), on_event=events.append)
    assert events[0]["type"] == "start" and events[0]["resumed"] and events[0]["step"] == 4
    ref_events = []
    reference = run_stage(StageConfig(**common, name="reference"), Registry(), on_event=ref_events.append)
    assert not ref_events[0].get("resumed")  # the finished stage removed its checkpoints: this one starts at 0
    from safetensors.torch import load_file

    got, ref = (load_file(next(v.path.rglob("model.safetensors"))) for v in (resumed, reference))
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    after = registry_state(llaca_home)
    assert {k: after[k] for k in before} == before


# ------------------------------------------------------------------------------------- exposure

def test_only_safetensors_are_loaded_and_version_ids_stay_in_the_registry(quick_home, tmp_path):
    """A checkpoint with only a pickle (.bin) is refused before anything is unpickled; ids cannot name paths."""
    import torch

    from llaca.models.llava import load_model
    from llaca.versions import VersionError

    folder = tmp_path / "pickled"
    shutil.copytree(Registry(quick_home).get("base").path / "model", folder)
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(pytorch_model\.bin\)"):
        load_model(str(folder))
    registry = Registry(quick_home)
    for evil in ("../base", "/etc", "base/../../x", "..", "v1/..", ""):
        with pytest.raises(VersionError):
            registry.get(evil)


# ------------------------------------------------------------------------------ the whole app killed

def test_app_killed_mid_stage_keeps_queue_and_job_and_resumes_on_restart(llaca_home, coin_dir, tmp_path):
    """SIGKILL the app (not just the worker) mid-stage: the worker notices its parent is gone, checkpoints and
    stops; the job is still in the queue; a restarted app re-queues it and it finishes from the checkpoint."""
    import signal

    from gradio_client import handle_file
    from test_app import zip_folder

    from llaca.bench.load import connect, free_port
    from llaca.jobs import pid_alive

    def launch(port):
        return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--home",
                                 str(llaca_home)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait(predicate, what, timeout=180):
        deadline = time.time() + timeout
        while not predicate():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.3)

    before = registry_state(llaca_home)
    store = JobStore(llaca_home)
    port = free_port()
    app = launch(port)
    try:
        client = connect(f"http://127.0.0.1:{port}/", timeout=120)
        train_zip = zip_folder(coin_dir / "vqav2" / "train", tmp_path / "vqav2.zip")
        _, _, data_path = client.predict([handle_file(str(train_zip))], None, api_name="/validate")
        client.predict(data_path, "llaca", 0.99, 0.2, "base", "survivor", 1, 100, 1e-3, False,
                       api_name="/start_stage")
        wait(lambda: store.list() and max((e.get("step", 0) for e in store.events(store.list()[0].id)),
                                          default=0) >= 52, "the stage to pass its first checkpoint")
        job = store.list()[0]
        os.kill(app.pid, signal.SIGKILL)
        app.wait(30)
        wait(lambda: not pid_alive(job.pid), "the orphaned worker to stop")
    finally:
        if app.poll() is None:
            app.kill()
    assert store.get(job.id).status in ("interrupted", "running")  # still there, not lost
    assert registry_state(llaca_home) == before  # nothing half-written listed, parent byte-identical

    port = free_port()
    app = launch(port)
    try:
        wait(lambda: store.get(job.id).status == "done", "the restarted app to finish the job", timeout=300)
    finally:
        app.send_signal(signal.SIGTERM)
        app.wait(60)
    starts = [e for e in store.events(job.id) if e.get("type") == "start"]
    assert starts[-1].get("resumed") and starts[-1]["step"] >= 50, starts
    assert Registry(llaca_home).get(store.get(job.id).version_id).name == "survivor"


def test_worker_env_sets_a_short_openmp_spin_unless_the_user_chose_one(tmp_path):
    """The niced worker beside a busy core ran 47x slower with OpenMP's default spin-wait (bench `contention`)."""
    from llaca.jobs import WORKER_THREAD_ENV, worker_env

    env = worker_env(tmp_path, environ={"PATH": "/usr/bin"})
    assert env["GOMP_SPINCOUNT"] == WORKER_THREAD_ENV["GOMP_SPINCOUNT"] == "1000"
    assert env["LLACA_HOME"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/usr/bin"
    assert worker_env(tmp_path, environ={"GOMP_SPINCOUNT": "0"})["GOMP_SPINCOUNT"] == "0"

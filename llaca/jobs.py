"""A persisted job queue (SQLite) and the background worker process that trains one stage at a time.

Like LLaMA-Factory's runner and LLaVA's model worker, training never runs in the UI process: the UI (or the
CLI) only *submits* a job row; a separate OS process (`python -m llaca.jobs worker`) takes the oldest queued
job under an exclusive lock (`$LLACA_HOME/locks/worker.lock`, so two app instances never train at once),
runs `llaca.train.tuner.run_stage`, and records the result. A crash of the worker cannot take the UI or any version
down: versions appear only by atomic rename, and a job left 'running' by a dead process becomes 'interrupted'.

    $LLACA_HOME/jobs.db                  id, kind, status, config JSON, times, version_id, error, pid, ...
    $LLACA_HOME/jobs/<id>/progress.jsonl the tuner's on_event dicts (+ "t"), one per line, flushed
    $LLACA_HOME/jobs/<id>/log.txt        a human-readable log (the UI shows its tail)
    $LLACA_HOME/jobs/<id>/upload/        the uploaded instruction set, copied in at submit time
    $LLACA_HOME/jobs/<id>/cancel         exists when a cancel was requested (the worker polls it every step)

Resuming is free: the tuner keys its run dir by the stage inputs and resumes from its last checkpoint, so
re-queueing an interrupted or cancelled job continues where it stopped. This module imports no UI code.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from .paths import llaca_home, sqlite_connection

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "failed", "cancelled")
AUTO_RESUME_ATTEMPTS = 3  # an interrupted job is re-queued on app start at most this many times

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL DEFAULT 'stage',
    label TEXT,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    parent_job INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    version_id TEXT,
    error TEXT,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
"""


class JobError(ValueError):
    pass


@dataclasses.dataclass
class Job:
    id: int
    kind: str
    label: str
    status: str
    config: dict
    parent_job: int | None
    created: float
    started: float | None
    finished: float | None
    version_id: str | None
    error: str | None
    pid: int | None
    attempts: int
    cancel_requested: bool
    dir: Path

    @property
    def progress_file(self) -> Path:
        return self.dir / "progress.jsonl"

    @property
    def log_file(self) -> Path:
        return self.dir / "log.txt"

    @property
    def cancel_file(self) -> Path:
        return self.dir / "cancel"


# --------------------------------------------------------------------------------------------- locking

@contextlib.contextmanager
def try_lock(path: Path):
    """Yield True while holding an exclusive flock on `path`, False (at once) if someone else holds it.

    The same file `Registry.lock("worker")` uses, so either spelling excludes the other.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------- the store

class JobStore:
    """The job table. Every call opens its own short connection, so threads and processes can share it."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else llaca_home()
        self.jobs_dir = self.home / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "jobs.db"
        self.worker_lock = self.home / "locks" / "worker.lock"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self):
        return sqlite_connection(self.db_path)

    @contextlib.contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE: take the write lock up front, so read-then-update is atomic across processes."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _job(self, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["config"] = json.loads(d["config"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return Job(**d, dir=self.jobs_dir / str(d["id"]))

    # ----------------------------------------------------------------------------- read
    def get(self, job_id: int) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"no job #{job_id}")
        return self._job(row)

    def list(self, limit: int = 100) -> list[Job]:
        """Newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._job(r) for r in rows]

    def count(self, *statuses: str) -> int:
        marks = ",".join("?" * len(statuses))
        with self._connect() as db:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def active(self, kind: str | None = None) -> list[Job]:
        """Queued, running and interrupted jobs, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running', 'interrupted') "
                              "ORDER BY id").fetchall()
        return [j for j in map(self._job, rows) if kind is None or j.kind == kind]

    def events(self, job_id: int) -> list[dict]:
        """The job's progress events (a torn last line, mid-write, is skipped)."""
        path = self.jobs_dir / str(job_id) / "progress.jsonl"
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def log_tail(self, job_id: int, lines: int = 20) -> str:
        path = self.jobs_dir / str(job_id) / "log.txt"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------------------- write
    def submit(self, config: dict, *, kind: str = "stage", label: str | None = None, parent_job: int | None = None,
               upload_dir: str | Path | None = None) -> Job:
        """Queue a job. With `upload_dir`, that folder is copied into the job's `upload/` and `config["data"]`
        (a path inside `upload_dir`) is rewritten to point at the copy, so the job owns its data."""
        config = dict(config)
        if kind == "stage":
            from .train.tuner import StageConfig

            known = {f.name for f in dataclasses.fields(StageConfig)}
            unknown = sorted(set(config) - known)
            if unknown or "data" not in config:
                raise JobError(f"bad stage config: unknown keys {unknown}" if unknown
                               else "bad stage config: no 'data'")
        if parent_job is not None:
            self.get(parent_job)  # must exist
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO jobs (kind, label, status, config, parent_job, created) VALUES (?, ?, 'staging', ?, ?, ?)",
                (kind, label or kind, json.dumps(config), parent_job, time.time()))
            job_id = cur.lastrowid
        job_dir = self.jobs_dir / str(job_id)
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            if upload_dir is not None:
                upload_dir = Path(upload_dir)
                rel = Path(config["data"]).resolve().relative_to(upload_dir.resolve())
                shutil.copytree(upload_dir, job_dir / "upload")
                config["data"] = str(job_dir / "upload" / rel)
            (job_dir / "log.txt").write_text(f"{_now()} queued: {label or kind}\n", encoding="utf-8")
        except BaseException as e:
            with self._transaction() as db:
                db.execute("UPDATE jobs SET status='failed', error=?, finished=? WHERE id=?",
                           (str(e), time.time(), job_id))
            raise
        with self._transaction() as db:  # visible to workers only once its files are in place
            db.execute("UPDATE jobs SET status='queued', config=? WHERE id=?", (json.dumps(config), job_id))
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        """A queued job is cancelled at once; a running one is asked to stop (it checkpoints, then stops)."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (int(job_id),)).fetchone()
            if row is None:
                raise JobError(f"no job #{job_id}")
            status = row["status"]
            if status in ("queued", "interrupted"):
                db.execute("UPDATE jobs SET status='cancelled', finished=? WHERE id=?", (time.time(), job_id))
            elif status == "running":
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            else:
                raise JobError(f"job #{job_id} is already {status}")
        job = self.get(job_id)
        if status == "running":
            job.cancel_file.touch()
        self._log(job, "cancel requested" if status == "running" else "cancelled")
        return job

    def requeue(self, job_id: int) -> Job:
        """Queue an interrupted, cancelled or failed job again; a stage resumes from its last checkpoint."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (int(job_id),)).fetchone()
            if row is None:
                raise JobError(f"no job #{job_id}")
            if row["status"] not in ("interrupted", "cancelled", "failed"):
                raise JobError(f"job #{job_id} is {row['status']}; only interrupted, cancelled or failed jobs resume")
            db.execute("UPDATE jobs SET status='queued', cancel_requested=0, error=NULL, finished=NULL, pid=NULL "
                       "WHERE id=?", (job_id,))
        job = self.get(job_id)
        job.cancel_file.unlink(missing_ok=True)
        self._log(job, "re-queued (resumes from its last checkpoint)")
        return job

    def claim_next(self, pid: int) -> Job | None:
        """Atomically mark the oldest runnable queued job 'running' for `pid`.

        A job with a `parent_job` waits until that job is done (and trains from its version); if the parent
        failed or was cancelled, the child fails with a message saying so.
        """
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status='queued' ORDER BY id").fetchall()
            for row in rows:
                job = self._job(row)
                if job.parent_job is not None:
                    parent = db.execute("SELECT status, version_id FROM jobs WHERE id=?", (job.parent_job,)).fetchone()
                    if parent is None or parent["status"] in ("failed", "cancelled"):
                        ended = "is gone" if parent is None else f"ended {parent['status']}"
                        why = f"parent job #{job.parent_job} {ended}"
                        db.execute("UPDATE jobs SET status='failed', error=?, finished=? WHERE id=?",
                                   (why, time.time(), job.id))
                        continue
                    if parent["status"] != "done":
                        continue
                    job.config["parent"] = parent["version_id"]
                db.execute("UPDATE jobs SET status='running', pid=?, started=?, attempts=attempts+1, config=? "
                           "WHERE id=?", (pid, time.time(), json.dumps(job.config), job.id))
                return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (job.id,)).fetchone())
        return None

    def finish(self, job_id: int, status: str, version_id: str | None = None, error: str | None = None) -> Job:
        if status not in STATUSES:
            raise JobError(f"unknown status {status!r}")
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status=?, version_id=COALESCE(?, version_id), error=?, finished=? WHERE id=?",
                       (status, version_id, error, time.time(), job_id))
        return self.get(job_id)

    def recover(self, requeue: bool = False) -> list[int]:
        """Jobs left 'running' by a dead worker become 'interrupted'; with `requeue` (app start), interrupted
        jobs are queued again (at most AUTO_RESUME_ATTEMPTS times, so a job that kills its worker stops)."""
        changed = []
        with try_lock(self.worker_lock) as no_worker:
            for job in self.active():
                if job.status == "running" and (no_worker or not pid_alive(job.pid)):
                    with self._transaction() as db:
                        db.execute("UPDATE jobs SET status='interrupted', finished=? WHERE id=? AND status='running'",
                                   (time.time(), job.id))
                    self._log(job, f"interrupted (worker pid {job.pid} is gone)")
                    changed.append(job.id)
        if requeue:
            for job in self.active():
                if job.status == "interrupted" and job.attempts < AUTO_RESUME_ATTEMPTS and not job.cancel_requested:
                    self.requeue(job.id)
                    changed.append(job.id)
        return changed

    def _log(self, job: Job, message: str) -> None:
        with contextlib.suppress(OSError):
            with open(job.log_file, "a", encoding="utf-8") as f:
                f.write(f"{_now()} {message}\n")


def _now() -> str:
    return time.strftime("%H:%M:%S")


# --------------------------------------------------------------------------------------------- uploads

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-_")
    return cleaned[:40] or "upload"


def stage_upload(files: list[str | Path], dest: str | Path, split: str = "train", name: str | None = None) -> Path:
    """Assemble uploaded files into `dest/<name>/<split>/` and return that folder (the set to validate and train).

    A browser sends a flat list of files, so: one `.zip` is extracted through `llaca.data`'s safe extractor
    (traversal, link and bomb checks) and copied; otherwise the one data file (any `llaca.data.formats` suffix) is
    copied and every uploaded image is placed at each relative path the records name with its file name. What is still
    missing is left for the validator to report with record and field. With the CoIN layout
    (`<name>/train` + `<name>/test`), the tuner evaluates on the test split automatically.
    """
    from .data import InvalidDataset, Problem, locate_data_file
    from .data.formats import DATA_SUFFIXES

    paths = [Path(f) for f in files or []]
    if not paths:
        raise InvalidDataset([Problem("upload", "no files: upload a .zip, or a data file with its images")])
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    data_files = [p for p in paths if p.suffix.lower() in DATA_SUFFIXES]
    if len(zips) + len(data_files) != 1:
        found = ", ".join(p.name for p in zips + data_files) or "none"
        message = f"expected exactly one .zip or one data file ({', '.join(DATA_SUFFIXES)}) (found: {found})"
        raise InvalidDataset([Problem("upload", message)])
    source = (zips or data_files)[0]
    name = _safe_name(name or (source.stem if source.stem not in ("data", "train", "test") else "upload"))
    target = Path(dest) / name / split
    if target.exists():
        shutil.rmtree(target)
    if zips:
        root, _ = locate_data_file(source)
        shutil.copytree(root, target)
        return target
    target.mkdir(parents=True)
    shutil.copyfile(source, target / source.name)
    by_name = {p.name: p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES}
    for rel in _image_fields(source):
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or rel_path.name not in by_name:
            continue  # the validator names the record and field
        (target / rel_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(by_name[rel_path.name], target / rel_path)
    return target


def _image_fields(data_file: Path) -> list[str]:
    """Every relative image path the data file names, in any accepted format (`llaca.data.formats`)."""
    from .data import InvalidDataset
    from .data.formats import referenced_images

    try:
        return referenced_images(data_file)
    except InvalidDataset:
        return []  # the validator reports it


# --------------------------------------------------------------------------------------------- the worker

class ProgressWriter:
    """The tuner's `on_event`: appends each event (+ wall time) to progress.jsonl and a line to log.txt."""

    def __init__(self, job: Job, log_every: int = 10):
        self.job = job
        self.log_every = log_every
        self.progress = open(job.progress_file, "a", encoding="utf-8")
        self.log = open(job.log_file, "a", encoding="utf-8")

    def __call__(self, event: dict) -> None:
        self.progress.write(json.dumps({**event, "t": round(time.time(), 3)}, default=str) + "\n")
        self.progress.flush()
        line = describe_event(event, self.log_every)
        if line:
            self.write_log(line)

    def write_log(self, line: str) -> None:
        self.log.write(f"{_now()} {line}\n")
        self.log.flush()

    def close(self) -> None:
        self.progress.close()
        self.log.close()


def describe_event(event: dict, log_every: int = 10) -> str | None:
    """One log line for an event (every `log_every`-th step only)."""
    kind = event.get("type")
    phase = event.get("phase", "stage")
    if kind == "start":
        verb = "resumed at step {step}".format(**event) if event.get("resumed") else "started"
        return f"{phase} {verb}: {event['total_steps']} steps over {event.get('n_records', '?')} records"
    if kind == "step" and (event["step"] % log_every == 0 or event["step"] == event.get("total_steps")):
        alpha = f"  alpha {event['alpha_mean']:.3g}" if "alpha_mean" in event else ""
        return f"{phase} step {event['step']}/{event['total_steps']}  loss {event['loss']:.4f}{alpha}"
    if kind == "checkpoint":
        return f"checkpoint at step {event['step']}"
    if kind == "saved":
        return f"saved version {event['version']}; evaluating"
    if kind == "eval":
        return f"eval {event['dataset']}: {event['accuracy']:.1f}%"
    if kind == "grouping":  # a grouped stage's decision (llaca.train.grouping)
        return event.get("text")
    return None


class Worker:
    """Runs queued jobs one at a time while it holds the worker lock; exits when idle for `idle_exit` s."""

    def __init__(self, home: Path, parent_pid: int | None = None, idle_exit: float = 10.0, poll: float = 0.5):
        self.store = JobStore(home)
        self.home = Path(home)
        self.parent_pid = parent_pid
        self.idle_exit = idle_exit
        self.poll = poll
        self.terminating = False
        self.current_kind: str | None = None

    def orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        with try_lock(self.store.worker_lock) as mine:
            if not mine:
                print("another worker holds the lock; exiting", flush=True)
                return 0
            idle_since = time.time()
            while not self.terminating and not self.orphaned():
                job = self.store.claim_next(os.getpid())
                if job is None:
                    if time.time() - idle_since > self.idle_exit:
                        break
                    time.sleep(self.poll)
                    continue
                self.current_kind = job.kind
                try:
                    self.run(job)
                finally:
                    self.current_kind = None
                idle_since = time.time()
        return 0

    def _on_term(self, *_):
        self.terminating = True  # a running stage sees it at its next step, checkpoints and stops
        if self.current_kind not in (None, "stage", "corrections", "grouped-stage"):
            raise KeyboardInterrupt  # a base build has no checkpoint to save: stop now (-> 'interrupted')

    def should_stop(self, job: Job) -> bool:
        return self.terminating or self.orphaned() or job.cancel_file.exists()

    def run(self, job: Job) -> Job:
        """Run one claimed job and record its outcome; nothing raised here escapes the loop."""
        from .train.tuner import StageCancelled

        writer = ProgressWriter(job)
        writer.write_log(f"running in worker pid {os.getpid()} (attempt {job.attempts})")
        try:
            version = self._execute(job, writer)
        except StageCancelled as e:
            status = "cancelled" if job.cancel_file.exists() else "interrupted"
            writer.write_log(f"{status}: {e}")
            return self.store.finish(job.id, status, error=str(e) if status == "interrupted" else None)
        except BaseException as e:  # noqa: BLE001 - record every failure on the job, keep the worker alive
            (job.dir / "traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            message = "stopped (the app or worker shut down)" if status == "interrupted" else error_text(e)
            writer.write_log(f"{status}: {message}")
            return self.store.finish(job.id, status, error=message)
        finally:
            writer.close()
        self.store._log(job, f"done: version {version.id}")
        return self.store.finish(job.id, "done", version_id=version.id)

    def _execute(self, job: Job, on_event):
        from .bases.install import ensure_base
        from .train.tuner import StageConfig, run_stage
        from .versions import Registry

        registry = Registry(self.home)
        if job.kind == "build-base":
            return ensure_base(registry, on_event=on_event, base=job.config.get("base"))
        if job.kind == "corrections":  # a stage on the chat's corrections (llaca/train/corrections.py)
            from .train.corrections import CorrectionStore, run_config

            return run_config(CorrectionStore(self.home), registry, job.config, on_event=on_event,
                              should_stop=lambda: self.should_stop(job))
        if job.kind == "grouped-stage":  # config: data + learn_grouped's arguments (llaca.train.grouping)
            from .train.grouping import learn_grouped

            config = dict(job.config)
            return learn_grouped(registry, config.pop("data"), on_event=on_event,
                                 should_stop=lambda: self.should_stop(job), **config)[0]
        if job.kind != "stage":
            raise JobError(f"unknown job kind {job.kind!r}")
        return run_stage(StageConfig(**job.config), registry, on_event=on_event,
                         should_stop=lambda: self.should_stop(job))


def error_text(e: BaseException) -> str:
    """One line for the UI: the library's message (InvalidDataset names file/record/field), never a traceback."""
    from .data import InvalidDataset

    if isinstance(e, InvalidDataset):
        return "; ".join(str(p) for p in e.problems[:5]) + (f" (+{e.total - 5} more)" if e.total > 5 else "")
    if isinstance(e, (ValueError, OSError, KeyError, RuntimeError)) and str(e):
        return str(e)
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------- supervisor

# The worker runs niced beside the app (and whatever else the machine does). PyTorch's OpenMP threads spin-wait for
# each other by default: when another process holds one core, the niced worker's second thread is starved and every
# op waits for it (measured on 2 cores, `python -m experiments.contention`: 0.14 s/step idle, 6.7 s/step beside one
# busy core). A short spin (then sleep) keeps the idle speed and makes the busy case 0.33 s/step. A value the user
# set in the environment wins (the dict is applied first).
WORKER_THREAD_ENV = {"GOMP_SPINCOUNT": "1000"}


def worker_env(home: Path, environ=None) -> dict:
    """The worker process's environment: offline, its home, and the thread setting (unless the user set one)."""
    return {**WORKER_THREAD_ENV, **(os.environ if environ is None else environ), "LLACA_HOME": str(home),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class WorkerSupervisor:
    """App side: keeps a worker process alive while jobs are queued, and marks jobs of dead workers.

    The worker is started in its own session (Ctrl+C in the app's terminal does not hit it mid-step); it
    watches its parent pid, so when the app goes away it checkpoints, marks its job 'interrupted' and exits,
    and the next app start re-queues that job.
    """

    def __init__(self, home: str | Path | None = None, poll: float = 1.0, nice: int = 10, idle_exit: float = 10.0):
        self.store = JobStore(home)
        self.poll = poll
        self.nice = nice
        self.idle_exit = idle_exit
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, requeue_interrupted: bool = True) -> "WorkerSupervisor":
        self.store.recover(requeue=requeue_interrupted)
        self._thread = threading.Thread(target=self._loop, name="llaca-worker-supervisor", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.poll):
            with contextlib.suppress(Exception):  # a transient sqlite/OS error must not end supervision
                self.poke()

    def poke(self) -> None:
        """Reap a finished worker, recover its jobs, and start a new worker if anything is queued."""
        with self._lock:
            if self.process is not None and self.process.poll() is not None:
                self.process = None
            if self.process is None:
                if self.store.count("running"):  # ours died, or another instance's worker did
                    self.store.recover()
                if self.store.count("queued") and not self.other_worker_busy():
                    self.process = self._spawn()

    def other_worker_busy(self) -> bool:
        """Another app instance's worker holds the lock: it will take our queued jobs too."""
        with try_lock(self.store.worker_lock) as free:
            return not free

    def _spawn(self) -> subprocess.Popen:
        env = worker_env(self.store.home)
        log = open(self.store.jobs_dir / "worker.log", "ab")
        cmd = [sys.executable, "-m", "llaca.jobs", "worker", "--home", str(self.store.home),
               "--parent-pid", str(os.getpid()), "--idle-exit", str(self.idle_exit), "--nice", str(self.nice)]
        try:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
        finally:
            log.close()

    def worker_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop supervising and ask the worker to checkpoint and exit (its job becomes 'interrupted')."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.store.recover()


# --------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.jobs", description="LLaCA job queue")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run queued jobs (one at a time, under the worker lock)")
    w.add_argument("--home", default=None)
    w.add_argument("--parent-pid", type=int, default=None, help="exit (checkpointing) when this process is gone")
    w.add_argument("--idle-exit", type=float, default=10.0, help="exit after this many idle seconds")
    w.add_argument("--nice", type=int, default=0, help="lower the worker's CPU priority (keeps chat responsive)")
    s = sub.add_parser("list", help="list jobs")
    s.add_argument("--home", default=None)
    args = p.parse_args(argv)
    home = Path(args.home) if args.home else llaca_home()
    if args.command == "worker":
        if args.nice:
            os.nice(args.nice)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return Worker(home, args.parent_pid, args.idle_exit).serve()
    for job in JobStore(home).list():
        print(f"#{job.id:<4} {job.status:11s} {job.kind:10s} {job.label[:40]:40s} {job.version_id or '':8s} "
              f"{job.error or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

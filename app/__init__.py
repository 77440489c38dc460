"""LLaCA Studio's web UI: a thin Gradio layer over the `llaca` library, one module per tab (like LLaMA-Factory's
webui/components), wired together in `main.py`.

`Studio` is the little state the tabs share: the version registry, the job queue and its worker supervisor, and
the library's `ModelPool` (a small LRU of loaded models; LoRA versions share their base) for chat and compare.
Training never runs here (a worker process does, see `llaca.jobs`); the tabs only call the library and turn its
errors into readable messages.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from llaca.jobs import JobError, JobStore, WorkerSupervisor, error_text
from llaca.paths import ASSETS_DIR, llaca_home
from llaca.serve.serving import ModelPool
from llaca.versions import Registry, Version, VersionError

SAMPLES_DIR = ASSETS_DIR / "samples"


def _quiet_transformers() -> None:
    """Loading reports and progress bars belong in a terminal session, not in a server's log per chat turn."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_quiet_transformers()


class Studio:
    """What every tab needs: where things live, the registry, the job queue, loaded models."""

    def __init__(self, home: str | Path | None = None, start_worker: bool = True):
        self.home = Path(home) if home else llaca_home()
        self.registry = Registry(self.home)
        self.jobs = JobStore(self.home)
        self.models = ModelPool(self.registry, max_models=6)
        self._load_lock = threading.Lock()
        self.supervisor = WorkerSupervisor(self.home)
        self.started = time.time()
        self._clean_staging()
        if start_worker:
            self.supervisor.start(requeue_interrupted=True)

    def close(self) -> None:
        self.supervisor.stop()

    def _clean_staging(self, max_age_s: float = 86400) -> None:
        """Uploads validated but never started are dropped after a day (a started job keeps its own copy)."""
        staging = self.home / "uploads" / "staging"
        for d in staging.glob("*") if staging.is_dir() else []:
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------------------------- versions
    def versions(self) -> list[Version]:
        return self.registry.list()

    def version_choices(self) -> list[tuple[str, str]]:
        """(label, id) pairs for dropdowns, newest first."""
        return [(version_label(v), v.id) for v in reversed(self.versions())]

    def ready(self, version_id: str) -> None:
        """Load a version into the pool, one load at a time: transformers' `from_pretrained` is not thread-safe
        (two loads in parallel threads silently give garbage weights; measured here), and chat and compare
        sessions run in parallel threads. Once loaded, this takes no lock (a lock here would wait for a running
        generation)."""
        if self.models.is_loaded(version_id):
            return
        with self._load_lock, self.models.use(version_id):
            pass

    def newest_id(self) -> str | None:
        versions = self.versions()
        return versions[-1].id if versions else None

    @property
    def base(self) -> str:
        """Which embedded base chat starts on (`small` or `tiny`; `--base` / $LLACA_BASE)."""
        from llaca.models.catalog import default_base

        return default_base()

    def base_ready(self) -> bool:
        from llaca.models.catalog import base_version_id

        return self.registry.exists(base_version_id(self.base))

    def base_line(self) -> str:
        """One line under the title: the base every lineage here starts from."""
        from llaca.models.catalog import BASE_DESCRIPTIONS, base_version_id

        return (f"Base: **{self.base}** (version `{base_version_id(self.base)}`): {BASE_DESCRIPTIONS[self.base]}. "
                "Start with `--base tiny` or `--base small` to change it.")

    def preload_base(self, poll_s: float = 1.0) -> threading.Thread:
        """Load the base into the model pool in the background (once it exists) and run one 1-token answer, so the
        first question is answered at chat speed: without it, the first answer on `small` took 3.5 s after a
        13 s load (the first generate sets up its kernels); with it, 1.3 s (first text 1.08 s, load 2.8)."""
        from llaca.models.catalog import base_version_id

        def run():
            vid = base_version_id(self.base)
            while not self.registry.exists(vid):
                time.sleep(poll_s)
            try:
                self.ready(vid)
                with self.models.use(vid) as (model, processor):  # the first generate pays one-off kernel set-up
                    from PIL import Image

                    from llaca.serve.chat import answer_once

                    answer_once(model, processor, Image.new("RGB", (64, 64), "white"), "Hi", max_new_tokens=1)
            except Exception:  # noqa: BLE001 - the first chat turn loads it again and shows the error
                pass

        thread = threading.Thread(target=run, name="preload-base", daemon=True)
        thread.start()
        return thread

    # ----------------------------------------------------------------------------- base build
    def ensure_base_job(self):
        """Queue a 'build-base' job unless the base exists or one is already queued/running."""
        if self.base_ready():
            return None
        pending = self.jobs.active(kind="build-base")
        if pending:
            job = pending[0]
            return self.jobs.requeue(job.id) if job.status == "interrupted" else job
        return self.jobs.submit({"base": self.base}, kind="build-base", label=f"install the {self.base} base model")

    def base_build_status(self) -> str:
        """A markdown banner while the base model is being built; empty once it exists."""
        if self.base_ready():
            return ""
        pending = self.jobs.active(kind="build-base")
        failed = [j for j in self.jobs.list(20) if j.kind == "build-base" and j.status == "failed"]
        if not pending:
            if failed:
                return f"**The base model build failed:** {failed[0].error}. See job #{failed[0].id} in *Learn*."
            return "**No base model yet.** Start the app with `python launch.py` to build it."
        job = pending[0]
        steps = [e for e in self.jobs.events(job.id) if e.get("type") == "step"]
        if not steps:
            return f"**Building the base model** (job #{job.id}, {job.status}): preparing data and tokenizer…"
        last = steps[-1]
        if last.get("phase") == "assemble":  # the small base: assembled from pretrained parts, under a minute
            return (f"**Assembling the {self.base} base** (once, under a minute): {last['step']}/{last['total_steps']} "
                    f"{last.get('label', '')} done. Chat becomes available when it is done.")
        phase = {"vision": "1/2 vision pre-training"}.get(last.get("phase"), "2/2 language model + projector")
        pct = 100 * last["step"] / max(1, last["total_steps"])
        return (f"**Building the base model** (a few minutes, once): {phase}, step {last['step']}/"
                f"{last['total_steps']} ({pct:.0f}%), loss {last['loss']:.3f}. Chat becomes available when it is done.")


def version_label(v: Version) -> str:
    """'v3 · sciqa-train · llaca · 14:02' — what a person picks a version by."""
    stage = v.meta.get("stage", {}).get("name")
    bits = [v.id if v.name == v.id else f"{v.id} '{v.name}'"]
    if v.id != "base" and stage:
        bits += [stage, v.method or "?"]
    bits.append(time.strftime("%H:%M", time.localtime(v.created)))
    return " · ".join(bits)


def message_for(e: BaseException) -> str:
    """The error text a person sees (the library's own message names file, record and field)."""
    if isinstance(e, VersionError):
        return str(e)
    return error_text(e)


def warn(e: BaseException | str) -> str:
    """Show a toast with the error (never a traceback) and return the text for a markdown box."""
    import gradio as gr

    text = e if isinstance(e, str) else message_for(e)
    gr.Warning(text)
    return text


# --------------------------------------------------------------------------- uploads (Learn tab and grouped stages)

def staging_root(studio: Studio) -> Path:
    return studio.home / "uploads" / "staging"


def staged_data(studio: Studio, data_path: str) -> Path:
    """The validated upload's staged folder, or a JobError saying why there is none (any stage kind)."""
    if not data_path:
        raise JobError("upload a valid instruction set first (the report above must show ✔)")
    data = Path(data_path).resolve()
    if data.parent.parent.parent != staging_root(studio).resolve() or not data.is_dir():
        raise JobError("that upload is no longer staged; upload it again")
    return data

"""Learn: upload an instruction set, read its validation report, choose how to learn it, and queue the stage.

Nothing trains here: *Start* submits a job to `llaca.jobs` (SQLite), and a worker process trains it. This tab
polls the job's files (LLaMA-Factory's runner pattern): progress bar with ETA, loss and alpha curves, log
tail. Jobs queue up (one trains at a time) and survive an app restart.
"""
from __future__ import annotations

import html
import shutil
import time
import types
import uuid
from pathlib import Path

import gradio as gr

from llaca.data import InvalidDataset, demo, validate
from llaca.data.formats import DATA_SUFFIXES
from llaca.jobs import JobError, stage_upload
from llaca.models.catalog import default_base
from llaca.train.recipes import base_name_of, base_stage_options, describe, recipe_for
from llaca.versions import method_label

from . import Studio, groups_ui, plots, staged_data, staging_root, warn

# `llaca` with StageConfig.replay_fraction: tiny's default recipe (llaca.train.tuner.DEFAULT_RECIPE, docs/method.md).
LLACA_REPLAY = "llaca+replay"
METHODS = [("llaca + replay: the adaptive EMA over a stage that also replays earlier samples", LLACA_REPLAY),
           ("llaca: adaptive EMA (the paper)", "llaca"), ("seq: plain fine-tuning", "seq"),
           ("ema: fixed β", "ema"), ("replay: plain steps, earlier samples mixed in", "replay"),
           ("grouped: llaca per instruction group (later LLaCA)", groups_ui.GROUPED)]
PREVIEW = 6
LOG_LINES = 10
POLL_SECONDS = 2.0
AUTO = 0  # job selector value meaning "follow the active job"

# Why each base's defaults are what they are (llaca.train.recipes; docs/benchmarks.md).
REGIME_NOTES = {
    "tiny": "Default on **tiny**: `llaca + replay` (20% of earlier records mixed into the stage) at lr 3e-4, 5 epochs. "
            "Over 8 CoIN-mini tasks from the shipped base it forgot 3.4-3.6 points at 93% Avg.ACC (2 seeds; 150-step "
            "stages: 3.7 / 85.7, `replay` alone 3.1 / 86.7); the paper's rule alone forgets about as much as `seq` "
            "on this small model (78.4 vs 86.9 at lr 1e-3). *Run the demo* shows the three side by side at one lr. "
            "See docs/benchmarks.md, 'The default recipe and the demo'.",
    "small": "Default on **small**: `replay` (plain steps, 20% of earlier records mixed into the stage), LoRA "
             "without dropout at lr 3e-4 in batches of 2 (also on the vision tower's last block), one epoch, and a "
             "set under 2,000 records passed over until the stage has trained on 2,000: one held-out stage learned "
             "Tux Paint drawings to 81.8% and digits to 95.4% (means of four seeds; over at least 1,800 records: 79.1 "
             "and 94.5; in batches of 4 over 1,000 records: 69.3 and 91.2). Over 4 CoIN-mini stages (at lr 2e-4) on "
             "this base (3 seeds) it forgot 4.5 points at "
             "58.6% Avg.ACC, llaca + replay 12.2 / 51.7, and the paper's rule alone 18.1 / 53.6 against seq's "
             "40.0 / 38.6: the adaptive EMA halves seq's forgetting, replay does better (in batches of 16 on build 2, "
             "one held-out stage learned digits to 68.0% with replay, 28.5% with llaca + replay). See docs/benchmarks.md, 'The paper's setting on small'.",
}


def ui_method(recipe: dict) -> str:
    """The Method radio's value for a recipe: llaca with a replay share is the `llaca+replay` choice."""
    return LLACA_REPLAY if recipe["method"] == "llaca" and recipe.get("replay_fraction") else recipe["method"]


# ------------------------------------------------------------------------------------------ validation

def report_markdown(report, split: str) -> str:
    """Counts and every problem (file, record, field) as markdown."""
    n_turns = sum(len(r.turns) for r in report.records)
    detected = f"\n\nDetected: {html.escape(report.format, quote=False)}." if report.format else ""
    if report.ok:
        head = f"✔ **{split} set `{report.name}`**: {len(report.records)} records, {n_turns} turns, all valid."
        return head + detected
    lines = [f"✘ **{split} set `{report.name}`**: {report.total_problems} problem(s); "
             f"{len(report.records)} valid record(s). Nothing trains until every problem is fixed:{detected}"]
    lines += [f"- {html.escape(str(p), quote=False)}" for p in report.problems]
    if report.total_problems > len(report.problems):
        lines.append(f"- … and {report.total_problems - len(report.problems)} more")
    return "\n".join(lines)


def preview(report) -> list[tuple[str, str]]:
    """The first records' images (their questions and answers are listed in the report)."""
    return [str(r.image) for r in report.records[:PREVIEW] if Path(r.image).is_file()]


def samples_markdown(report, n: int = 3) -> str:
    def cell(text: str, width: int) -> str:
        return html.escape(text.splitlines()[0][:width], quote=False).replace("|", "\\|")

    rows = [f"| `{r.id}` | {cell(r.question, 90)} | {cell(r.answer, 40)} |" for r in report.records[:n]]
    return "\n".join(["| id | question | answer |", "|---|---|---|", *rows]) if rows else ""


def check_upload(studio: Studio, files, test_files) -> tuple[str, list, str]:
    """Stage the upload, validate it (and the optional test split); returns (markdown, preview, data path or '')."""
    dest = staging_root(studio) / uuid.uuid4().hex[:12]
    processor = _newest_processor(studio)
    try:
        train = stage_upload(files, dest, "train")
        reports = [("training", validate(train, processor=processor))]
        if test_files:
            test = stage_upload(test_files, dest, "test", name=train.parent.name)
            reports.append(("test", validate(test, processor=processor)))
    except InvalidDataset as e:
        shutil.rmtree(dest, ignore_errors=True)
        problems = "\n".join(f"- {html.escape(str(p), quote=False)}" for p in e.problems)
        return f"✘ **Cannot read the upload:**\n{problems}", [], ""
    md = "\n\n".join(report_markdown(r, split) for split, r in reports)
    md += "\n\n" + samples_markdown(reports[0][1])
    ok = all(r.ok for _, r in reports)
    if ok and len(reports) == 1:
        md += "\n\n_No test split uploaded: the stage is evaluated on earlier stages' test sets only._"
    return md, preview(reports[0][1]), str(train) if ok else ""


def export_upload(studio: Studio, data_path: str, fmt: str) -> str:
    """Convert the validated upload (`llaca.data.formats.export`): a .parquet, or a .zip of a LLaVA/ShareGPT folder."""
    from llaca.data.formats.export import export_download

    if not data_path:
        raise JobError("upload a valid instruction set first (the report above must show ✔)")
    return str(export_download(data_path, fmt, studio.home / "exports" / uuid.uuid4().hex[:12]))


def _newest_processor(studio: Studio):
    """The processor checks each record fits the model's token limit; skipped while no model exists."""
    vid = studio.newest_id()
    if vid is None:
        return None
    try:
        studio.ready(vid)
        with studio.models.use(vid) as (_, processor):
            return processor
    except Exception:  # noqa: BLE001 - validation still runs, only the token check is skipped
        return None


# ------------------------------------------------------------------------------------------ submitting

def recipe_line(studio: Studio, ref: str | None) -> str:
    """One line: the defaults a stage from `ref` starts with, and why (they depend on the parent's base)."""
    base = base_name_of(studio.registry, ref) or "tiny"
    why = {"small": "measured on this base: least forgetting over 4 CoIN-mini stages and the best held-out stages; "
                    "1,000 records (1,200 steps of 2 with the replay) took 13.2 min with native bf16, ~17-23 in fp32",
           "tiny": "measured on this base: least forgetting over 8 CoIN-mini tasks"}[base]
    return f"Defaults for a stage on **{base}**: {describe(recipe_for(studio.registry, ref))} ({why})."


def regime_note(studio: Studio, ref: str | None) -> str:
    return REGIME_NOTES[base_name_of(studio.registry, ref) or "tiny"]


def stage_config(data: str, method: str, beta: float, replay_fraction: float, parent: str | None, name: str,
                 epochs: float, max_steps: float, lr: float, lora: bool) -> dict:
    rule = {"ema": {"beta": float(beta)}, "replay": {"fraction": float(replay_fraction)}}.get(method, {})
    mixed = {"method": "llaca", "replay_fraction": float(replay_fraction)} if method == LLACA_REPLAY else {}
    return {"data": data, "method": method, "parent": parent or None, "name": (name or "").strip() or None,
            "epochs": float(epochs), "max_steps": int(max_steps) if max_steps else None, "lr": float(lr),
            "lora": bool(lora), "rule_hparams": rule, **mixed}


def submit_upload(studio: Studio, data_path: str, config: dict):
    """Queue a stage on a validated upload; the staged folder is copied into the job's own dir."""
    data = staged_data(studio, data_path)
    upload_dir = data.parent.parent
    if config["parent"] is None:
        config["parent"] = studio.newest_id()
    studio.registry.get(config["parent"])  # a clear error now rather than in the worker
    recipe = recipe_for(studio.registry, config["parent"])
    options = base_stage_options(recipe, bool(config.get("lora")), config.get("epochs"))  # small: r=32, no dropout, bf16, batches of 2
    for key, value in options.items():
        config.setdefault(key, value)
    label = f"{method_label(config['method'], config.get('replay_fraction'))} · {data.parent.name}" + (f" → {config['name']}" if config["name"] else "")
    return studio.jobs.submit(config, label=label, upload_dir=upload_dir)


def demo_plan() -> demo.Demo:
    """The demo of the app's base (`llaca.data.demo.DEMOS`): what the button queues and its label says."""
    return demo.DEMOS[default_base()]


def queue_demo(studio: Studio) -> list:
    """Write the demo tasks (once) and queue each arm of the app base's demo over them, each stage from the previous
    one of its arm."""
    busy = [j for j in studio.jobs.active() if j.label.startswith("demo")]
    if busy:
        raise JobError(f"the demo is already queued (jobs {', '.join('#' + str(j.id) for j in busy)})")
    if not studio.base_ready():
        raise JobError("the base model is still being built; start the demo when it is ready")
    from llaca.bases.install import ensure_base

    plan = demo_plan()
    ensure_base(studio.registry, base=plan.base)
    root = demo.ensure_tasks(studio.home / "datasets" / "demo", plan.tasks)
    jobs = []
    for arm in plan.arms:
        previous = None
        for k, config in enumerate(plan.stage_configs(root, arm), 1):
            previous = studio.jobs.submit(config, label=f"demo {arm} {k}/{len(plan.tasks)} · {plan.tasks[k - 1]}",
                                          parent_job=previous.id if previous else None)
            jobs.append(previous)
    return jobs


# ------------------------------------------------------------------------------------------ job display

def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def job_progress(job, events: list[dict]) -> dict:
    """Fraction done, step text and ETA of a job, from its status and progress events."""
    steps = [e for e in events if e.get("type") == "step"]
    if job.status == "done":
        return {"fraction": 1.0, "text": f"done → {job.version_id}"}
    if not steps:
        return {"fraction": 0.0, "text": {"running": "starting…"}.get(job.status, job.status)}
    last = steps[-1]
    phase = [e for e in steps if e.get("phase") == last.get("phase")]
    eta = last.get("eta")
    if eta is None and len(phase) > 1 and phase[-1]["t"] > phase[0]["t"]:
        rate = (phase[-1]["step"] - phase[0]["step"]) / (phase[-1]["t"] - phase[0]["t"])
        eta = (last["total_steps"] - last["step"]) / max(rate, 1e-9)
    phase_name = f"{last['phase']} " if last.get("phase") else ""
    evals = [e for e in events if e.get("type") == "eval"]
    if last["step"] >= last["total_steps"] and job.status == "running":
        text = f"{phase_name}trained; evaluating ({len(evals)} test set(s) done)"
    else:
        text = f"{phase_name}step {last['step']}/{last['total_steps']} · loss {last['loss']:.3f} · ETA {_clock(eta)}"
    return {"fraction": last["step"] / max(1, last["total_steps"]), "text": text}


def progress_html(job, events: list[dict]) -> str:
    if job is None:
        return "<div class='llaca-progress'>No jobs yet: upload a set and press <b>Start</b>, or run the demo.</div>"
    p = job_progress(job, events)
    note = ""
    if job.error:
        note = f"<div class='llaca-error'>{html.escape(job.error)}</div>"
    evals = [e for e in events if e.get("type") == "eval"]
    if evals:
        scores = " · ".join(f"{html.escape(e['dataset'])}: <b>{e['accuracy']:.1f}%</b>" for e in evals)
        note += f"<div>{scores}</div>"
    return (f"<div class='llaca-progress'><b>#{job.id} {html.escape(job.label)}</b> — {job.status}"
            f"<progress value='{p['fraction']:.4f}' max='1' style='width:100%;height:14px'></progress>"
            f"<div>{html.escape(p['text'])}</div>{note}</div>")


def job_rows(studio: Studio) -> list[list]:
    rows = []
    for job in studio.jobs.list(50):
        events = studio.jobs.events(job.id) if job.status == "running" else []
        p = job_progress(job, events)
        rows.append([job.id, job.label, job.status, p["text"] if job.status == "running" else f"{p['fraction']:.0%}",
                     job.version_id or "", time.strftime("%m-%d %H:%M", time.localtime(job.created)), job.error or ""])
    return rows


JOB_COLUMNS = ["#", "job", "status", "progress", "version", "queued", "error"]


def shown_job(studio: Studio, selected):
    """The selected job, or (AUTO) the running one, else the oldest queued, else the newest."""
    if selected not in (None, AUTO, ""):
        try:
            return studio.jobs.get(int(selected))
        except JobError:
            pass
    jobs = studio.jobs.list(50)
    running = [j for j in jobs if j.status == "running"]
    queued = [j for j in jobs if j.status == "queued"]
    return (running or queued[-1:] or jobs or [None])[0]


def job_choices(studio: Studio) -> list[tuple[str, int]]:
    return [("follow the active job", AUTO)] + [(f"#{j.id} {j.label}", j.id) for j in studio.jobs.list(50)]


# ------------------------------------------------------------------------------------------ the tab

def build(studio: Studio):
    def on_upload(files, test_files):
        if not files:
            return "", [], "", gr.Button(interactive=False)
        md, gallery, data = check_upload(studio, files, test_files)
        return md, gallery, data, gr.Button(interactive=bool(data))

    def on_start(data, method, beta, replay_fraction, parent, name, epochs, max_steps, lr, lora,
                 threshold=groups_ui.DEFAULT_THRESHOLD):
        try:
            if method == groups_ui.GROUPED:
                job = groups_ui.submit_grouped(studio, data, parent, threshold, name, epochs, max_steps, lr, lora)
            else:
                config = stage_config(data, method, beta, replay_fraction, parent, name, epochs, max_steps, lr, lora)
                job = submit_upload(studio, data, config)
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}", gr.skip()
        gr.Info(f"Queued job #{job.id}")
        return f"Queued job **#{job.id}** ({job.label}).", gr.Dropdown(choices=job_choices(studio), value=job.id)

    def on_demo():
        try:
            jobs = queue_demo(studio)
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}", gr.skip()
        gr.Info(f"Queued {len(jobs)} demo stages")
        ids = ", ".join(f"#{j.id}" for j in jobs)
        plan = demo_plan()
        arms = ", then ".join(f"`{arm}`" for arm in plan.arms)
        note = f" ({plan.note})" if plan.note else ""
        return (f"Queued the demo on `{plan.base}` ({ids}): {' then '.join(plan.tasks)} with {arms}, "
                f"{plan.stage['max_steps']} steps each{note}. Watch forgetting in *Versions & evaluation* when they "
                "finish."), gr.Dropdown(choices=job_choices(studio), value=AUTO)

    def act_on_job(selected, verb: str, action, done) -> str:
        """Cancel / resume the shown job; a refusal (no job, wrong state) is a message, not an exception."""
        job = shown_job(studio, selected)
        try:
            if job is None:
                raise JobError(f"no job to {verb}")
            return done(action(job.id))
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}"

    def on_cancel(selected):
        return act_on_job(selected, "cancel", studio.jobs.cancel, lambda job: f"Job #{job.id}: "
                          f"{'stopping at the next step' if job.status == 'running' else job.status}.")

    def on_resume(selected):
        return act_on_job(selected, "resume", studio.jobs.requeue,
                          lambda job: f"Job #{job.id} queued again; it resumes from its last checkpoint.")

    def list_jobs():
        return job_rows(studio)

    def poll(selected, seen):
        """Timer tick: refresh only what changed (plots are redrawn when the job got new events)."""
        seen = dict(seen or {})
        rows = job_rows(studio)
        choices = job_choices(studio)
        job = shown_job(studio, selected)
        events = studio.jobs.events(job.id) if job else []
        panel_key = (job.id, job.status, len(events), job.error) if job else None
        out_rows = rows if rows != seen.get("rows") else gr.skip()
        out_choices = gr.Dropdown(choices=choices) if choices != seen.get("choices") else gr.skip()
        if panel_key == seen.get("panel") and panel_key is not None:
            panel = [gr.skip()] * 4
        else:
            method = job.config.get("method") if job else None
            panel = [progress_html(job, events), plots.loss_figure(events), plots.alpha_figure(events, method),
                     studio.jobs.log_tail(job.id, LOG_LINES) if job else ""]
        seen.update(rows=rows, choices=choices, panel=panel_key)
        return out_rows, out_choices, *panel, seen

    with gr.Row():
        with gr.Column(scale=5):
            gr.Markdown("### 1 · Instruction set\nA `.zip`, or a data file plus the images it names: LLaVA or "
                        "ShareGPT / OpenAI messages JSON(L), CSV/TSV (image, question, answer), Parquet with "
                        "embedded images. The format is detected; the set is validated before anything trains.")
            files = gr.File(label="Training set (.zip, or a data file + images)", file_count="multiple",
                            file_types=[".zip", *DATA_SUFFIXES, "image"], height=130, elem_id="train-files")
            test_files = gr.File(label="Test split (optional, same formats)", file_count="multiple",
                                 file_types=[".zip", *DATA_SUFFIXES, "image"], height=100)
            report = gr.Markdown(elem_id="validation-report")
            gallery = gr.Gallery(label="Preview: the first records' images", columns=6,
                                 height=170, object_fit="contain", allow_preview=False, show_label=False)
            data_path = gr.Textbox(visible=False)
            with gr.Row():
                export_format = gr.Dropdown(["llava", "sharegpt", "parquet"], value="llava", scale=2,
                                            label="Convert the validated set to")
                export_button = gr.Button("Convert", size="sm", scale=1)
            export_file = gr.File(label="Converted set (download)", interactive=False, height=70)
        with gr.Column(scale=4):
            gr.Markdown("### 2 · How to learn it")
            recipe = recipe_for(studio.registry, studio.newest_id())
            default_method = ui_method(recipe)
            regime = gr.Markdown(regime_note(studio, studio.newest_id()), elem_id="regime-note")
            method = gr.Radio(METHODS, value=default_method, label="Method")
            beta = gr.Slider(0.5, 0.999, value=0.99, step=0.001, label="ema β (weight on the past)", visible=False)
            replay_fraction = gr.Slider(0.05, 1.0, value=recipe.get("replay_fraction") or 0.2, step=0.05,
                                        label="replay fraction", visible=default_method in ("replay", LLACA_REPLAY))
            threshold = gr.Slider(0.05, 1.0, value=groups_ui.DEFAULT_THRESHOLD, step=0.01, visible=False,
                                  label="grouped: TF-IDF similarity to continue a group")
            grouping = gr.Markdown(visible=False, elem_id="grouping-preview")
            parent = gr.Dropdown(label="Parent version", choices=studio.version_choices(), value=studio.newest_id(),
                                 allow_custom_value=True)
            recipe_note = gr.Markdown(recipe_line(studio, studio.newest_id()), elem_id="recipe-note")
            with gr.Row():
                epochs = gr.Number(recipe["epochs"], label="Epochs", minimum=0.1, step=0.5)
                max_steps = gr.Number(0, label="Max steps (0 = by epochs)", minimum=0, precision=0)
                lr = gr.Number(recipe["lr"], label="Learning rate", minimum=0)
            with gr.Row():
                lora = gr.Checkbox(bool(recipe.get("lora")), label="LoRA (adapters + projector)")
                name = gr.Textbox(label="Version name (optional)", max_length=64)
            with gr.Row():
                start = gr.Button("Start", variant="primary", interactive=False)
                plan = demo_plan()
                demo_button = gr.Button(f"Run the demo ({len(plan.tasks)} CoIN-mini stages: "
                                        f"{' vs '.join(a.split(',')[0] for a in plan.arms)}"
                                        + (", reduced for 2 cores" if plan.note else "") + ")")
            message = gr.Markdown()
    gr.Markdown("### 3 · Jobs")
    with gr.Row():
        job = gr.Dropdown(label="Show job", choices=job_choices(studio), value=AUTO, scale=3, allow_custom_value=True)
        cancel = gr.Button("Cancel", size="sm", scale=1)
        resume = gr.Button("Resume", size="sm", scale=1)
        refresh = gr.Button("Refresh", size="sm", scale=1)
    progress = gr.HTML(progress_html(None, []))
    with gr.Row():
        loss_plot = gr.Plot(label="loss", format="png", show_label=False)
        alpha_plot = gr.Plot(label="alpha", format="png", show_label=False)
    log = gr.Textbox(label="Log (tail)", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False)
    jobs_table = gr.Dataframe(headers=JOB_COLUMNS, value=job_rows(studio), interactive=False, wrap=True,
                              label="Queue (newest first; one job trains at a time)")
    seen = gr.State({})
    timer = gr.Timer(POLL_SECONDS)

    def on_grouping(data, method, parent, threshold_value):
        """The grouped decision preview (similarity to each group), shown while the method is 'grouped'."""
        grouped = method == groups_ui.GROUPED
        if not grouped:
            return gr.Slider(visible=False), gr.Markdown(visible=False)
        try:
            text = groups_ui.preview_markdown(studio, data, parent, threshold_value)
        except Exception as e:  # noqa: BLE001
            text = f"⚠ {warn(e)}"
        return gr.Slider(visible=True), gr.Markdown(text, visible=True)

    method.change(lambda m: (gr.Slider(visible=m == "ema"), gr.Slider(visible=m in ("replay", LLACA_REPLAY))),
                  method, [beta, replay_fraction], queue=False, api_visibility="private")
    def on_parent(ref):
        """The parent's base decides the defaults (tiny: full fine-tuning; small: LoRA, llaca.train.recipes)."""
        r = recipe_for(studio.registry, ref)
        m = ui_method(r)
        return (r["epochs"], r["lr"], bool(r.get("lora")), recipe_line(studio, ref), regime_note(studio, ref), m,
                gr.Slider(value=r.get("replay_fraction") or 0.2, visible=m in ("replay", LLACA_REPLAY)),
                gr.Slider(visible=False))

    parent.change(on_parent, parent, [epochs, lr, lora, recipe_note, regime, method, replay_fraction, beta],
                  queue=False, api_visibility="private")
    grouping_inputs = [data_path, method, parent, threshold]
    for trigger in (method.change, parent.change, threshold.release):
        trigger(on_grouping, grouping_inputs, [threshold, grouping], api_visibility="private", concurrency_limit=2,
                show_progress="hidden")
    data_path.change(on_grouping, grouping_inputs, [threshold, grouping], api_name="grouping_preview",
                     concurrency_limit=2, show_progress="hidden")
    files.upload(on_upload, [files, test_files], [report, gallery, data_path, start], api_name="validate",
                 concurrency_limit=2)
    test_files.upload(on_upload, [files, test_files], [report, gallery, data_path, start],
                      api_visibility="private", concurrency_limit=2)

    def on_export(data, fmt):
        try:
            return export_upload(studio, data, fmt), ""
        except Exception as e:  # noqa: BLE001
            return None, f"⚠ {warn(e)}"

    export_button.click(on_export, [data_path, export_format], [export_file, message], api_name="export_data",
                        concurrency_limit=1)
    files.clear(lambda: ("", [], "", gr.Button(interactive=False)), None, [report, gallery, data_path, start],
                api_visibility="private", queue=False)
    start.click(on_start, [data_path, method, beta, replay_fraction, parent, name, epochs, max_steps, lr, lora,
                           threshold], [message, job], api_name="start_stage", concurrency_limit=None)
    demo_button.click(on_demo, None, [message, job], api_name="run_demo", concurrency_limit=1)
    cancel.click(on_cancel, job, message, api_name="cancel_job", concurrency_limit=None)
    resume.click(on_resume, job, message, api_name="resume_job", concurrency_limit=None)
    refresh.click(list_jobs, None, jobs_table, api_name="jobs", concurrency_limit=None)
    panel_outputs = [jobs_table, job, progress, loss_plot, alpha_plot, log, seen]
    timer.tick(poll, [job, seen], panel_outputs, api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    job.change(lambda sel, s: poll(sel, {**s, "panel": None}), [job, seen], panel_outputs,
               api_visibility="private", concurrency_limit=None, show_progress="hidden")
    return types.SimpleNamespace(parent=parent, timer=timer)

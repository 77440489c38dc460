"""Learn tab, *Corrections*: the pending set the chat's Correct builds (count, preview, remove one), and
**Learn corrections**, which queues it as a stage with the product's default method (`llaca`) from the newest
version, using the small-set recipe of `llaca.train.corrections`. Learned batches are listed with their version.
"""
from __future__ import annotations

import dataclasses
import types

import gradio as gr

from llaca.train.corrections import CorrectionStore, queue_learn, recipe_for_parent
from llaca.train.rules import RULES
from llaca.train.tuner import StageConfig

from . import Studio, warn

COLUMNS = ["id", "question", "corrected answer", "was", "by"]
DEFAULT_METHOD = StageConfig.method  # the library's default rule, llaca (corrections keep their own small-set recipe)


def preview_rows(store: CorrectionStore) -> list[list]:
    return [[c.id, c.question.splitlines()[0][:80], c.answer[:80], (c.original or "")[:60], c.version or ""]
            for c in store.list()]


def status(store: CorrectionStore, registry) -> str:
    n = store.count()
    recipe = recipe_for_parent(registry, registry.list()[-1].id if registry.list() else None)
    lines = [f"**{n} pending correction(s).**" if n else "**No pending corrections.** Correct an answer in *Chat* "
             "or *Compare* (the ✎ pencil) and it appears here."]
    if n:
        lines.append(f"*Learn corrections* trains them from the newest version (default `{DEFAULT_METHOD}`, at least "
                     f"{recipe.min_steps} steps or 3 epochs, lr {recipe.lr:g}" + (" LoRA" if recipe.lora else "")
                     + f", {recipe.replay_per_correction:g} replay records from the lineage per correction: the "
                     "small-set recipe measured on this base).")
    learned = [b for b in store.archived() if b.get("version")]
    if learned:
        lines.append("Learned: " + ", ".join(f"{b['n_corrections']} → `{b['version']}`" for b in learned[:5]))
    return "\n\n".join(lines)


def build(studio: Studio) -> types.SimpleNamespace:
    def view():
        store = CorrectionStore(studio.home)
        rows = preview_rows(store)
        images = [str(c.image) for c in store.list()][:24]
        ids = [r[0] for r in rows]
        return status(store, studio.registry), rows, images, gr.Dropdown(choices=ids, value=None)

    def remove(correction_id):
        try:
            if not correction_id:
                raise ValueError("pick the correction to remove")
            CorrectionStore(studio.home).remove(correction_id)
        except Exception as e:  # noqa: BLE001
            warn(e)
        return view()

    def learn(method, min_steps):
        try:
            newest = studio.newest_id()
            recipe = dataclasses.replace(recipe_for_parent(studio.registry, newest), min_steps=int(min_steps or 0))
            job = queue_learn(CorrectionStore(studio.home), studio.registry, studio.jobs, method=method or DEFAULT_METHOD,
                              recipe=recipe)
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}", None
        return f"Queued job #{job.id}: {job.label}. Its progress is shown above.", job.id

    with gr.Accordion("Corrections from the chat", open=True, elem_id="corrections-panel"):
        head = gr.Markdown()
        with gr.Row():
            with gr.Column(scale=3):
                table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, label="Pending corrections")
            with gr.Column(scale=2):
                gallery = gr.Gallery(show_label=False, columns=6, height=150, object_fit="contain",
                                     allow_preview=False, interactive=False)
        with gr.Row():
            which = gr.Dropdown(label="Remove one", choices=[], scale=2, allow_custom_value=True)
            remove_btn = gr.Button("Remove", size="sm", scale=1)
            refresh_btn = gr.Button("Refresh", size="sm", scale=1)
        with gr.Row():
            method = gr.Dropdown(RULES, value=DEFAULT_METHOD, label="Method", scale=1)
            min_steps = gr.Number(recipe_for_parent(studio.registry, studio.newest_id()).min_steps, label="At least this many steps", precision=0,
                                  minimum=1, scale=1)
            learn_btn = gr.Button("Learn corrections", variant="primary", scale=2, elem_id="learn-corrections")
        message = gr.Markdown()
        job_id = gr.Number(visible=False, precision=0)

    outputs = [head, table, gallery, which]
    refresh_btn.click(view, None, outputs, api_name="corrections", concurrency_limit=None)
    remove_btn.click(remove, which, outputs, api_name="remove_correction", concurrency_limit=None)
    learn_btn.click(learn, [method, min_steps], [message, job_id], api_name="learn_corrections", concurrency_limit=1).then(
        view, None, outputs, api_visibility="private")
    return types.SimpleNamespace(view=view, outputs=outputs)

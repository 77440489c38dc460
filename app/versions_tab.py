"""Versions & evaluation: the lineage, the accuracy matrix per lineage (heatmap + Avg.ACC / Forgetting / BWT),
per-version test accuracy, and rename / delete / export.

The numbers come from the evaluations the worker ran after each stage (`meta["metrics"]["test"]`: the new
version on its own test split and every earlier stage's), so row j of a lineage's matrix is version j's record.
"""
from __future__ import annotations

import shutil
import time
import types
from pathlib import Path

import gradio as gr

from llaca.evaluation.metrics import cl_metrics_lower
from llaca.paths import atomic_dir
from llaca.versions import Version

from . import Studio, groups_ui, plots, version_label, warn

MAX_PANELS = 3
LINEAGE_COLUMNS = ["version", "name", "parent", "method", "data (records)", "steps", "created", "test accuracy %"]
METRIC_COLUMNS = ["lineage", "methods", "stages", "Avg.ACC", "Forgetting", "BWT", "New.ACC"]


# ------------------------------------------------------------------------------------------ lineage + metrics

def _tests(v: Version) -> dict:
    return v.meta.get("metrics", {}).get("test", {}) or {}


def lineage_rows(studio: Studio) -> list[list]:
    """One row per version, depth-first from the roots, indented to show parent → child."""
    versions = studio.versions()
    kids: dict[str | None, list[Version]] = {}
    ids = {v.id for v in versions}
    for v in versions:
        kids.setdefault(v.parent if v.parent in ids else None, []).append(v)
    rows = []

    def walk(v: Version, depth: int):
        stage = v.meta.get("stage", {})
        data = f"{stage.get('name', '–')} ({stage.get('n_records', '?')})" if stage else "–"
        accs = " · ".join(f"{k} {d['accuracy']:.0f}" for k, d in _tests(v).items())
        rows.append([("\u2003" * depth) + ("└ " if depth else "") + v.id, v.name if v.name != v.id else "",
                     v.parent or "", v.method or "", data, v.meta.get("steps", ""),
                     time.strftime("%m-%d %H:%M", time.localtime(v.created)), accs])
        for kid in kids.get(v.id, []):
            walk(kid, depth + 1)

    for root in kids.get(None, []):
        walk(root, 0)
    return rows


def leaves(studio: Studio) -> list[Version]:
    """Versions without children, newest first (each ends one lineage)."""
    versions = studio.versions()
    parents = {v.parent for v in versions}
    return [v for v in reversed(versions) if v.id not in parents]


def lineage_matrix(scores: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows of a lineage's accuracy matrix from each version's test scores (root→leaf). Columns are the
    test sets the newest version was scored on (it is scored on every stage's), in the order they first appear: a
    set only an early phase was scored on (base v2's alignment test, inside its build) is not a stage of the lineage
    and would make the matrix non-square, so no Avg.ACC / Forgetting."""
    last = set(scores[-1]) if scores else set()
    tests: list[str] = []
    for s in scores:
        tests += [t for t in s if t in last and t not in tests]
    return tests, [[s.get(t, {}).get("accuracy") for t in tests] for s in scores]


def lineage_panel(studio: Studio, version_id: str) -> dict:
    """The accuracy matrix of a lineage: rows = evaluated versions root→leaf, columns = test sets in stage order."""
    chain = [v for v in studio.registry.lineage(version_id) if _tests(v)]
    tests, matrix = lineage_matrix([_tests(v) for v in chain])
    square = len(tests) == len(chain) and all(matrix[j][i] is not None for j in range(len(chain)) for i in range(j + 1))
    metrics = cl_metrics_lower(matrix) if square and chain else None
    methods = [v.method for v in chain if v.meta.get("method") not in (None, "pretrain")]
    return {"title": f"{version_id} ({' → '.join(dict.fromkeys(methods)) or 'base'})",
            "stages": [v.id if v.id == "base" else f"{v.id} {v.meta.get('stage', {}).get('name', '')}" for v in chain],
            "tests": tests, "matrix": matrix, "metrics": metrics, "methods": methods}


def _num(x) -> str:
    return "" if x is None else f"{x:.1f}"


def metric_rows(studio: Studio) -> list[list]:
    rows = []
    for leaf in leaves(studio):
        panel = lineage_panel(studio, leaf.id)
        m = panel["metrics"] or {}
        rows.append([leaf.id, " → ".join(panel["methods"]) or "–", len(panel["stages"]), _num(m.get("avg_acc")),
                     _num(m.get("forgetting")), _num(m.get("bwt")), _num(m.get("new_acc"))])
    return rows


def heatmap(studio: Studio, version_ids: list[str]):
    panels = [lineage_panel(studio, vid) for vid in version_ids[:MAX_PANELS] if studio.registry.exists(vid)]
    return plots.accuracy_heatmaps([p for p in panels if p["matrix"]])


# ------------------------------------------------------------------------------------------ export

def export_version(studio: Studio, version_id: str) -> tuple[Path, Path]:
    """Write a version as a plain Hugging Face folder (LoRA merged into full weights) and a zip of it.

    `LlavaForConditionalGeneration.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` load it.
    """
    from llaca.models.llava import save_pretrained
    from llaca.versions import load_version

    v = studio.registry.get(version_id)
    out = studio.home / "exports" / v.id
    if v.weights == "full":
        with atomic_dir(out) as tmp:
            shutil.copytree(v.path / "model", tmp, dirs_exist_ok=True)
    else:  # a LoRA adapter is merged into its base (in full precision); an external checkpoint is re-saved
        model, processor = load_version(studio.registry, v.id, bits=None)
        save_pretrained(model.merge_and_unload() if v.weights == "lora" else model, processor, out)
    shutil.copyfile(v.path / "meta.json", out / "llaca_meta.json")
    archive = shutil.make_archive(str(out), "zip", root_dir=out.parent, base_dir=out.name)
    return out, Path(archive)


# ------------------------------------------------------------------------------------------ the tab

def build(studio: Studio):
    def leaf_choices():
        return [(version_label(v), v.id) for v in leaves(studio)]

    def refresh(picked=None, selected=None):
        """Everything on the tab, recomputed from the registry."""
        leaf_ids = [vid for _, vid in leaf_choices()]
        picked = [v for v in (picked or []) if v in leaf_ids] or leaf_ids[:MAX_PANELS]
        choices = studio.version_choices()
        ids = [vid for _, vid in choices]
        return (lineage_rows(studio), metric_rows(studio), heatmap(studio, picked),
                gr.Dropdown(choices=leaf_choices(), value=picked),
                gr.Dropdown(choices=choices, value=selected if selected in ids else (ids[0] if ids else None)),
                groups_ui.group_rows(studio))

    def on_rename(version_id, new_name, picked):
        try:
            studio.registry.rename(version_id, (new_name or "").strip())
            note = f"Renamed {version_id} to '{new_name.strip()}'."
        except Exception as e:  # noqa: BLE001
            note = f"⚠ {warn(e)}"
        return note, *refresh(picked, version_id)

    def on_delete(version_id, confirm_children, picked):
        try:
            if not version_id:
                raise ValueError("pick a version to delete")
            studio.registry.delete(version_id, force=bool(confirm_children))
            studio.models.forget(version_id)
            note = f"Deleted {version_id}."
        except Exception as e:  # noqa: BLE001
            note = f"⚠ {warn(e)}"
        return note, *refresh(picked, None)

    def on_export(version_id):
        try:
            if not version_id:
                raise ValueError("pick a version to export")
            folder, archive = export_version(studio, version_id)
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}", None
        return f"Exported {version_id} as a Hugging Face folder: `{folder}` (and the zip below).", str(archive)

    gr.Markdown("Each row of a heatmap is a version after one more stage; each column a stage's test set "
                "(stage 0 = the base model's own tasks). Falling numbers below the diagonal are **forgetting**.")
    with gr.Row():
        picked = gr.Dropdown(label="Lineages to plot (by their newest version; up to 3)", choices=leaf_choices(),
                             value=[vid for _, vid in leaf_choices()][:MAX_PANELS], multiselect=True,
                             max_choices=MAX_PANELS, allow_custom_value=True, scale=4)
        refresh_btn = gr.Button("Refresh", size="sm", scale=1)
    heat = gr.Plot(label="Accuracy matrix A[stage][test set] (%)", format="png", show_label=False)
    metrics = gr.Dataframe(headers=METRIC_COLUMNS, value=metric_rows(studio), interactive=False,
                           label="Continual-learning metrics per lineage")
    lineage = gr.Dataframe(headers=LINEAGE_COLUMNS, value=lineage_rows(studio), interactive=False, wrap=True,
                           label="Lineage (parent → child)",
                           column_widths=["9%", "15%", "6%", "8%", "15%", "6%", "10%", "31%"])
    groups = gr.Dataframe(headers=groups_ui.GROUP_COLUMNS, value=groups_ui.group_rows(studio), interactive=False,
                          wrap=True, label="Grouped versions: each group and the version that answers for it",
                          elem_id="groups-table")
    with gr.Row():
        selected = gr.Dropdown(label="Version", choices=studio.version_choices(), value=studio.newest_id(), scale=2,
                               allow_custom_value=True)
        compare_btn = gr.Button("Compare before vs after this stage", scale=1)
    with gr.Row():
        with gr.Column():
            new_name = gr.Textbox(label="New name", max_length=64)
            rename_btn = gr.Button("Rename")
        with gr.Column():
            confirm = gr.Checkbox(False, label="Yes, also when it has children (they are re-attached to its parent)")
            delete_btn = gr.Button("Delete", variant="stop")
        with gr.Column():
            export_btn = gr.Button("Export as a Hugging Face folder")
            export_file = gr.File(label="Download", interactive=False, height=90)
    note = gr.Markdown()

    view = [lineage, metrics, heat, picked, selected, groups]
    refresh_btn.click(refresh, [picked, selected], view, api_name="versions", concurrency_limit=None)
    picked.input(lambda p: heatmap(studio, p), picked, heat, api_visibility="private", concurrency_limit=None)
    rename_btn.click(on_rename, [selected, new_name, picked], [note, *view], api_name="rename_version")
    delete_btn.click(on_delete, [selected, confirm, picked], [note, *view], api_name="delete_version")
    export_btn.click(on_export, selected, [note, export_file], api_name="export_version")
    return types.SimpleNamespace(selected=selected, picked=picked, compare_btn=compare_btn, view=view,
                                 refresh=refresh)

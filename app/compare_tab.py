"""Compare: one image and one question to several versions, answers side by side, streamed in parallel
(FastChat's side-by-side arena, without the voting). "Before vs after" picks a version and its parent.
Full-weight versions generate in parallel; LoRA versions on one base take turns (one active adapter per model).
"""
from __future__ import annotations

import contextlib
import threading
import time
import types

import gradio as gr

from llaca.data import load_image

from . import Studio, groups_ui, version_label, warn
from .chat_tab import GENERATE_CONCURRENCY, samples

MAX_SLOTS = 4  # answer columns on screen


def before_after(studio: Studio, version_id: str | None) -> list[str]:
    """[parent, version]: what one stage changed."""
    if not version_id:
        return []
    v = studio.registry.get(version_id)
    return [v.parent, v.id] if v.parent else [v.id]


def default_selection(studio: Studio) -> list[str]:
    """The newest version and its parent: the most common question is 'what did the last stage change?'."""
    newest = studio.newest_id()
    return before_after(studio, newest) if newest else []


def stream_many(studio: Studio, version_ids: list[str], image_path: str | None, question: str, max_tokens: int):
    """Yield the list of answers-so-far, one per version, while all versions generate in parallel threads.
    A grouped version answers through the member of its most similar group (`groups_ui.route`)."""
    routes = [groups_ui.route(studio, vid, question) for vid in version_ids]
    version_ids = [r.version if r else vid for r, vid in zip(routes, version_ids)]
    texts = [""] * len(version_ids)
    done = [False] * len(version_ids)
    image = load_image(image_path) if image_path else None

    def run(k: int, vid: str):
        try:
            with contextlib.closing(studio.models.stream(vid, image, question, max_new_tokens=max_tokens)) as tokens:
                for texts[k] in tokens:
                    pass
            texts[k] = texts[k] or "(no answer)"
        except Exception as e:  # noqa: BLE001 - one version failing must not stop the others
            from . import message_for

            texts[k] = f"⚠ {message_for(e)}"
        finally:
            done[k] = True

    for vid in version_ids:  # load one after the other (see Studio.ready), then generate in parallel
        with contextlib.suppress(Exception):  # a version that fails to load reports it in its own column
            studio.ready(vid)
    threads = [threading.Thread(target=run, args=(k, vid), daemon=True) for k, vid in enumerate(version_ids)]
    for t in threads:
        t.start()
    while not all(done):
        time.sleep(0.1)
        yield list(texts)
    yield list(texts)


def build(studio: Studio):
    def slots(version_ids, texts, routes=()):
        boxes = []
        for k in range(MAX_SLOTS):
            if k < len(version_ids):
                label = version_label(studio.registry.get(version_ids[k]))
                if k < len(routes) and routes[k]:  # the badge: which group of a grouped version answered
                    label += " · " + groups_ui.badge(studio, routes[k]).strip("`")
                boxes.append(gr.Textbox(value=texts[k], label=label, visible=True))
            else:
                boxes.append(gr.Textbox(value="", visible=False))
        return boxes

    def compare(version_ids, image, question, max_tokens):
        version_ids = list(version_ids or [])
        question = (question or "").strip()
        problem = ("Pick at least one version." if not version_ids else
                   "Type a question." if not question else None)
        if problem:
            warn(problem)
            yield *[gr.skip()] * MAX_SLOTS, {}
            return
        if len(version_ids) > MAX_SLOTS:
            warn(f"Comparing the first {MAX_SLOTS} versions picked.")
            version_ids = version_ids[:MAX_SLOTS]
        try:
            labels = [studio.registry.get(v).id for v in version_ids]
            routes = [groups_ui.route(studio, v, question) for v in labels]
            texts = [""] * len(labels)
            for texts in stream_many(studio, labels, image, question, int(max_tokens)):
                yield *slots(labels, texts, routes), gr.skip()
        except Exception as e:  # noqa: BLE001
            warn(e)
            yield *[gr.skip()] * MAX_SLOTS, {}
            return
        answers = dict(zip(labels, texts))
        if any(routes):  # which group answered for each grouped version
            answers["routing"] = {v: {"group": r.group, "version": r.version, "similarity": round(r.similarity, 4)}
                                  for v, r in zip(labels, routes) if r}
        yield *slots(labels, texts, routes), answers

    def pick_before_after(version_id):
        if not version_id:
            return gr.skip()
        try:
            return gr.Dropdown(value=before_after(studio, version_id))
        except Exception as e:  # noqa: BLE001
            warn(e)
            return gr.skip()

    def refresh_versions(current):
        choices = studio.version_choices()
        ids = [vid for _, vid in choices]
        keep = [v for v in (current or []) if v in ids]
        stage_choices = [c for c in choices if c[1] != "base"]
        return (gr.Dropdown(choices=choices, value=keep or default_selection(studio)),
                gr.Dropdown(choices=stage_choices, value=None))

    gr.Markdown("Ask several versions the same question about the same image; answers stream side by side.")
    with gr.Row():
        with gr.Column(scale=3):
            versions = gr.Dropdown(label="Versions (2 to 4)", choices=studio.version_choices(), multiselect=True,
                                   elem_id="compare-versions",
                                   max_choices=MAX_SLOTS, value=default_selection(studio), allow_custom_value=True)
            stage = gr.Dropdown(label="Shortcut: before vs after this stage",
                                choices=[c for c in studio.version_choices() if c[1] != "base"], value=None,
                                info="selects the version and its parent", allow_custom_value=True)
            question = gr.Textbox(label="Question", lines=2)
            with gr.Row():
                max_tokens = gr.Slider(1, 256, value=48, step=1, label="Max new tokens", scale=2)
                ask = gr.Button("Ask all", variant="primary", scale=1)
        with gr.Column(scale=2):
            image = gr.Image(label="Image", type="filepath", height=236, sources=["upload"], elem_id="compare-image")
        with gr.Column(scale=2):
            gr.Markdown("**Samples**: click one")
            sample_gallery = gr.Gallery(value=[p for p, _, _ in samples()], show_label=False, columns=3, height=290,
                                        allow_preview=False, object_fit="contain", elem_id="compare-samples",
                                        interactive=False)
    with gr.Row():
        answers = [gr.Textbox(label=f"answer {k + 1}", lines=3, interactive=False, visible=k < 2,
                              elem_classes=["compare-answer"]) for k in range(MAX_SLOTS)]
    answers_json = gr.JSON(visible=False)

    def pick_sample(event: gr.SelectData):
        path, text, _ = samples()[event.index]
        return path, text

    inputs = [versions, image, question, max_tokens]
    ask.click(compare, inputs, [*answers, answers_json], api_name="compare", concurrency_id="generate",
              concurrency_limit=GENERATE_CONCURRENCY, show_progress="hidden")
    question.submit(compare, inputs, [*answers, answers_json], api_visibility="private", concurrency_id="generate",
                    show_progress="hidden")
    stage.input(pick_before_after, stage, versions, api_visibility="private", queue=False)
    sample_gallery.select(pick_sample, None, [image, question], api_visibility="private", queue=False)
    return types.SimpleNamespace(versions=versions, stage=stage, refresh=refresh_versions, image=image, question=question,
                                 answers_json=answers_json)

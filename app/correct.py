"""Correct: turn a wrong answer in Chat or Compare into a pending correction (`llaca.train.corrections`).

Chat: every message has Gradio's edit pencil (`Chatbot(editable="all")`); editing an *assistant* message saves
the image, the conversation up to it and the edited text as a correction (editing a question only edits it).
Compare: pick whose answer to correct, edit it, save. Both also have an API endpoint (`/correct`,
`/correct_compare`) so clients and tests drive the same code.
"""
from __future__ import annotations

import types

import gradio as gr

from llaca.train.corrections import CorrectionStore

from . import Studio, warn
from .chat_tab import _assistant, _parts, split_conversation


def save_from_chat(studio: Studio, history: list[dict], index: int, answer: str, version_id: str | None,
                   original: str | None = None) -> str:
    """Save the correction of assistant message `index` of `history`; returns the note to show."""
    history = list(history or [])
    if not 0 <= index < len(history) or history[index].get("role") != "assistant":
        raise ValueError(f"message {index} is not an answer of the assistant")
    image, turns, question = split_conversation(history[:index])
    if not question:
        raise ValueError("that answer has no question before it")
    original = original if original is not None else _parts(history[index])[1].strip()
    store = CorrectionStore(studio.home)
    store.add(image, turns + [(question, answer)], version=version_id or studio.newest_id(), original=original)
    return f"✔ Saved as a correction ({store.count()} pending; learn them in the *Learn* tab)."


def wire_chat(studio: Studio, chat) -> types.SimpleNamespace:
    """Hook Correct into the Chat tab (whose Chatbot is built with editable="all")."""

    def on_edit(history, version_id, edit: gr.EditData):
        history = list(history or [])
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        new_text = _text(edit.value).strip()
        if not 0 <= index < len(history):
            return history, ""
        message = history[index]
        if message.get("role") != "assistant":  # a question edited: keep the edit, nothing to learn from it
            content = message.get("content")
            files = [p for p in content if isinstance(p, dict) and p.get("type") == "file"] \
                if isinstance(content, list) else []
            history[index] = {**message, "content": files + [{"type": "text", "text": new_text}]}
            return history, ""
        try:
            original = _text(getattr(edit, "previous_value", None)) or _parts(message)[1]
            note = save_from_chat(studio, history, index, new_text, version_id, original=original)
            history[index] = _assistant(new_text)
            gr.Info(note)
        except Exception as e:  # noqa: BLE001 - a message, never a traceback
            note = f"⚠ {warn(e)}"
        return history, note

    def on_api(history, index, answer, version_id):
        try:
            return save_from_chat(studio, history, int(index), (answer or "").strip(), version_id)
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}"

    note = gr.Markdown("✎ **Correct** a wrong answer: click the pencil under it, write the right answer, and save. "
                       "It joins the pending corrections that *Learn → Corrections* turns into the next version.")
    with gr.Row(visible=False):
        index = gr.Number(precision=0)
        answer = gr.Textbox()
        api_btn = gr.Button()
    chat.chatbot.edit(on_edit, [chat.chatbot, chat.version], [chat.chatbot, note], api_visibility="private")
    api_btn.click(on_api, [chat.chatbot, index, answer, chat.version], note, api_name="correct")
    return types.SimpleNamespace(note=note)


def _text(value) -> str:
    """The text of an edited value (a string, a list of parts, or a message dict)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return _parts(value)[1]
    return _parts({"content": value})[1]


def wire_compare(studio: Studio, compare) -> types.SimpleNamespace:
    """Below the Compare answers: pick a version's answer, edit it, save it as a correction."""

    def pick(answers, version_id):
        return (answers or {}).get(version_id, "")

    def on_answers(answers):
        ids = list((answers or {}).keys())
        return gr.Dropdown(choices=ids, value=ids[0] if ids else None), (answers or {}).get(ids[0], "") if ids else ""

    def save(image, question, version_id, answer, answers):
        try:
            if not version_id or version_id not in (answers or {}):
                raise ValueError("ask the versions first, then pick whose answer to correct")
            store = CorrectionStore(studio.home)
            store.add(image, [((question or "").strip(), (answer or "").strip())], version=version_id,
                      original=answers[version_id])
            return f"✔ Saved as a correction ({store.count()} pending; learn them in the *Learn* tab)."
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}"

    with gr.Accordion("✎ Correct one of these answers", open=False):
        with gr.Row():
            which = gr.Dropdown(label="Answer of", choices=[], scale=1, allow_custom_value=True)
            corrected = gr.Textbox(label="Corrected answer", scale=3)
            save_btn = gr.Button("Save correction", scale=1)
        note = gr.Markdown()
    compare.answers_json.change(on_answers, compare.answers_json, [which, corrected], api_visibility="private",
                                queue=False)
    which.input(pick, [compare.answers_json, which], corrected, api_visibility="private", queue=False)
    save_btn.click(save, [compare.image, compare.question, which, corrected, compare.answers_json], note,
                   api_name="correct_compare")
    return types.SimpleNamespace(note=note)

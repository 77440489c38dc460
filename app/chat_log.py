"""Chat tab: the one switch for conversation logging (`llaca.serve.convlog`, off by default) and its delete-all.

When on, every finished reply logs the conversation so far (like LLaVA's serve), through the chat tab's
`reply_hooks` (a `.then` event would run only for browsers: the frontend chains events, API clients do not).
"""
from __future__ import annotations

import types

import gradio as gr

from llaca.serve.convlog import ConversationLog

from . import Studio, warn
from .chat_tab import _parts, split_conversation


def messages_of(history: list[dict]) -> tuple[str | None, list[dict]]:
    """(the last image, [{role, content text}]) of a Chatbot history."""
    image, _, _ = split_conversation(list(history or []) + [{"role": "user", "content": ""}])
    return image, [{"role": m["role"], "content": _parts(m)[1]} for m in history or []]


def status(log: ConversationLog) -> str:
    state = "**on**" if log.enabled else "off"
    return f"Logging is {state}; {log.count()} conversation turn(s) logged under `{log.dir}`."


def build(studio: Studio, chat) -> types.SimpleNamespace:
    log = ConversationLog(studio.home)

    def record(history, version_id, request):
        """After each finished reply (a hook of the chat tab, so API clients are logged too)."""
        if not log.enabled or not history or history[-1].get("role") != "assistant":
            return
        image, messages = messages_of(history)
        try:
            log.log(model=version_id, messages=messages, image=image,
                    session=getattr(request, "session_hash", None))
        except Exception as e:  # noqa: BLE001 - a failing log must never break the chat
            warn(f"conversation log: {e}")

    def switch(on):
        log.set_enabled(on)
        return status(log)

    def delete_all():
        n = log.delete_all()
        gr.Info(f"Deleted {n} logged conversation turn(s).")
        return status(log)

    with gr.Accordion("Conversation log (opt-in)", open=False):
        enabled = gr.Checkbox(log.enabled, label="Log conversations (like LLaVA's serve; off by default)",
                              elem_id="conv-log-switch")
        note = gr.Markdown(status(log))
        delete_btn = gr.Button("Delete all logs", variant="stop", size="sm")
    enabled.input(switch, enabled, note, api_name="conversation_log", concurrency_limit=None)
    delete_btn.click(delete_all, None, note, api_name="delete_conversation_logs", concurrency_limit=None)
    chat.reply_hooks.append(record)
    return types.SimpleNamespace(enabled=enabled, note=note)

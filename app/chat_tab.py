"""Chat: an image and a question, multi-turn, answers streamed token by token (LLaVA's web-server pattern).

The conversation lives in the Chatbot itself (Gradio's messages format); each reply re-reads it: the last
image sent opens the context (this LLaVA takes one image per conversation), and the text turns after it are
the history handed to `llaca.serve.chat.stream_answer` (through the library's `ModelPool`). Stop sets a per-session
event that generation checks at every token.

Speed (issue 15, `python -m experiments.overhead`): answers asked together are generated in one batch (so many
requests may wait in the function at once), the Chatbot is updated at most every `UPDATE_EVERY_S` instead of per
token, a conversation's image is decoded once, and the hot path reads no files.
"""
from __future__ import annotations

import contextlib
import mimetypes
import os
import random
import threading
import types

import gradio as gr

from llaca.data import coin_mini, load_image
from llaca.serve.chat import at_most_every

from . import SAMPLES_DIR, Studio, groups_ui, warn

# Requests in the chat function at once. They do not generate in parallel: those of one version are gathered
# into one batched generate (llaca.serve.batching, up to 32 rows), so more in flight means bigger batches, not more threads
# fighting for the cores.
GENERATE_CONCURRENCY = 32
UPDATE_EVERY_S = 0.1  # at most ~10 Chatbot updates a second per answer (each costs a postprocess + diff + message)
THINKING = "…"

# (task, seed): a few images per kind, rendered with coin_mini from a fixed seed (so the question is known).
SAMPLES = [("colour_qa", 5), ("shape_qa", 2), ("caption", 7), ("sciqa", 4), ("textvqa", 2), ("vqav2", 5)]


def samples() -> list[tuple[str, str, str]]:
    """(png path, question, expected answer) per sample; renders any PNG missing from assets/samples."""
    out = []
    for task_name, seed in SAMPLES:
        image, question, answer = coin_mini.get_task(task_name).sample(random.Random(seed))
        path = SAMPLES_DIR / f"{task_name}.png"
        if not path.is_file():
            SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
            image.save(path)  # native 64 px: exactly what the model was trained on
        out.append((str(path), question, answer))
    return out


# ------------------------------------------------------------------------------------------ conversation

def _parts(message: dict) -> tuple[list[str], str]:
    """(file paths, text) of one Chatbot message in either content form (string, or list of parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return [], content
    files, texts = [], []
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, dict) and part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif isinstance(part, dict) and ("file" in part or "path" in part):
            files.append((part.get("file") or part)["path"])
    return files, "\n".join(texts)


def split_conversation(history: list[dict]) -> tuple[str | None, list[tuple[str, str]], str]:
    """(image path, earlier (question, answer) turns, current question) for a history ending in a user turn."""
    image, turns, question = None, [], None
    for message in history:
        files, text = _parts(message)
        if message["role"] == "user":
            if files:  # a new image starts a new context
                image, turns = files[-1], []
            question = text.strip() if question is None else f"{question}\n{text.strip()}"
        elif message["role"] == "assistant" and question is not None:
            turns.append((question, text.strip()))
            question = None
    return image, turns, question or ""


class ImageCache:
    """Decoded images by path, so the turns of one conversation decode its image once (Gradio keeps an upload at
    one path; size and mtime catch a file replaced in place). Small and bounded: a dict in insertion order."""

    def __init__(self, size: int = 64):
        self.size, self._images = size, {}
        self._evict = threading.Lock()  # only on a miss: sessions run in parallel threads

    def get(self, path: str):
        try:
            stat = os.stat(path)
        except OSError:
            return load_image(path)  # its readable error for a missing file
        key = (path, stat.st_mtime_ns, stat.st_size)
        image = self._images.get(key)
        if image is None:
            image = load_image(path)  # raises the readable error for a bad file
            with self._evict:
                self._images[key] = image
                while len(self._images) > self.size:
                    self._images.pop(next(iter(self._images)))
        return image


def _image_part(path: str) -> dict:
    """A file part the Chatbot shows as an image (it needs the mime type to know)."""
    return {"type": "file", "file": {"path": path, "mime_type": mimetypes.guess_type(path)[0] or "image/png"}}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# ------------------------------------------------------------------------------------------ the tab

def build(studio: Studio):
    stops: dict[str, threading.Event] = {}
    reply_hooks: list = []  # called with (history, version id, request) after every finished reply
    images = ImageCache()

    def stream_reply(history, version_id, max_tokens, temperature, request: gr.Request):
        """Append an assistant message to `history` and grow it token by token."""
        history = list(history) + [_assistant(THINKING)]
        shown = None
        yield history
        session = getattr(request, "session_hash", None) or "default"
        stop = stops[session] = threading.Event()
        try:
            image_path, turns, question = split_conversation(history[:-1])
            image = images.get(image_path) if image_path else None
            text = ""
            version_id = version_id or studio.newest_id() or "base"
            route = groups_ui.route(studio, version_id, question)  # a grouped version: its most similar group answers
            version_id = route.version if route else version_id
            studio.ready(version_id)
            tokens = at_most_every(studio.models.stream(version_id, image, question, history=turns,
                                                        max_new_tokens=int(max_tokens), temperature=float(temperature),
                                                        stop_event=stop), UPDATE_EVERY_S)
            with contextlib.closing(tokens):  # drops this answer from its batch even if the client goes away
                for text in tokens:
                    history[-1] = shown = _assistant(text or THINKING)
                    yield history
            suffix = " [stopped]" if stop.is_set() else ""
            history[-1] = _assistant((text or "(no answer)") + suffix)
            if route:
                history.append(groups_ui.badge_message(studio, route))
        except Exception as e:  # noqa: BLE001 - shown in the chat, never as a traceback
            history[-1] = _assistant(f"⚠ {warn(e)}")
        finally:
            stop.set()  # ends generation if the client went away mid-stream
            stops.pop(session, None)
        for hook in reply_hooks:  # e.g. the opt-in conversation log (app/chat_log.py)
            hook(history, version_id, request)
        if history[-1] != shown:  # else the last update already showed the whole answer: no duplicate message
            yield history

    def respond(message, history, version_id, max_tokens, temperature, request: gr.Request):
        """Submit: add the user's image + text, then stream the answer."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        if not text:
            warn("Type a question (an image alone is not a question).")
            yield history, message
            return
        if not (version_id or studio.newest_id()):  # a picked version exists: no registry scan per message
            warn("No model yet: the base model is still being built (see the banner at the top).")
            yield history, message
            return
        user = {"role": "user", "content": [_image_part(f) for f in files[-1:]] + [{"type": "text", "text": text}]}
        for h in stream_reply(list(history or []) + [user], version_id, max_tokens, temperature, request):
            yield h, None

    def regenerate(history, version_id, max_tokens, temperature, request: gr.Request):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            warn("Nothing to regenerate yet.")
            yield history
            return
        yield from stream_reply(history, version_id, max_tokens, temperature, request)

    def stop(request: gr.Request):
        event = stops.get(getattr(request, "session_hash", None) or "default")
        if event:
            event.set()

    def pick_sample(event: gr.SelectData):
        path, question, _ = samples()[event.index]
        return {"text": question, "files": [path]}

    def refresh_versions(current):
        choices = studio.version_choices()
        ids = [vid for _, vid in choices]
        return gr.Dropdown(choices=choices, value=current if current in ids else (ids[0] if ids else None))

    with gr.Row():
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="Conversation", height=440, buttons=["copy"], feedback_options=None,
                                 editable="all",  # the pencil on an answer is "Correct" (app/correct.py)
                                 placeholder="Click a sample image on the right, or attach your own, and ask about it.")
            chat_input = gr.MultimodalTextbox(
                placeholder="Ask about an image (attach one with the clip, or click a sample)…", show_label=False,
                file_types=["image"], file_count="single", sources=["upload"], elem_id="chat-input")
            with gr.Row():
                stop_btn = gr.Button("Stop", size="sm", variant="stop")
                regen_btn = gr.Button("Regenerate", size="sm")
                clear_btn = gr.Button("Clear", size="sm")
        with gr.Column(scale=2):
            version = gr.Dropdown(label="Version", choices=studio.version_choices(), value=studio.newest_id(),
                                  info="newest first", interactive=True, allow_custom_value=True,
                                  elem_id="chat-version")
            with gr.Accordion("Generation settings", open=True):
                max_tokens = gr.Slider(1, 256, value=48, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            gr.Markdown("**Sample images**: click one, then press Enter")
            sample_gallery = gr.Gallery(value=[p for p, _, _ in samples()], show_label=False, columns=3, height=290,
                                        allow_preview=False, object_fit="contain", elem_id="chat-samples",
                                        interactive=False)

    settings = [version, max_tokens, temperature]
    submit_event = chat_input.submit(respond, [chat_input, chatbot, *settings], [chatbot, chat_input],
                                     api_name="chat", concurrency_limit=GENERATE_CONCURRENCY,
                                     concurrency_id="generate", show_progress="hidden")
    regen_event = regen_btn.click(regenerate, [chatbot, *settings], [chatbot], api_name="regenerate",
                                  concurrency_id="generate", show_progress="hidden")
    sample_gallery.select(pick_sample, None, chat_input, api_visibility="private", queue=False)
    stop_btn.click(stop, None, None, api_name="stop", queue=False)
    clear_btn.click(lambda: ([], None), None, [chatbot, chat_input], api_name="clear", queue=False)
    return types.SimpleNamespace(version=version, chatbot=chatbot, input=chat_input, refresh=refresh_versions,
                                 events=[submit_event, regen_event], reply_hooks=reply_hooks)

"""Compare, blind: two versions drawn at random answer the same image + question as "A" and "B"; the person votes
A / B / tie / both bad, and only then are the names shown. Votes go to `llaca.serve.votes` (SQLite), which the
Versions tab's leaderboard reads.

The draw: two distinct versions from those picked in Compare, or (the other mode) one of them against its parent
("did this stage help?"). Which one is A is a coin flip, so position cannot tell.
"""
from __future__ import annotations

import random
import types

import gradio as gr

from llaca.serve.votes import VoteStore, lineage_of

from . import Studio, version_label, warn
from .compare_tab import stream_many

MODES = [("two of the versions picked above", "pool"), ("a version vs its parent", "parent")]
OUTCOMES = {"a": "A is better", "b": "B is better", "tie": "Tie", "bothbad": "Both are bad"}


def draw(studio: Studio, picked: list[str], mode: str, rng: random.Random) -> tuple[str, str]:
    """(version shown as A, version shown as B)."""
    picked = [studio.registry.get(v).id for v in picked or []]
    if mode == "parent":
        candidates = [v for v in (picked or [studio.newest_id()]) if v and studio.registry.get(v).parent]
        if not candidates:
            raise ValueError("pick a version that has a parent (not only the base)")
        child = rng.choice(candidates)
        pair = [child, studio.registry.get(child).parent]
    else:
        distinct = list(dict.fromkeys(picked))
        if len(distinct) < 2:
            raise ValueError("pick at least two versions above to draw from")
        pair = rng.sample(distinct, 2)
    rng.shuffle(pair)
    return pair[0], pair[1]


def build(studio: Studio, compare) -> types.SimpleNamespace:
    """The blind section, rendered under Compare; it reuses Compare's versions, image and question."""
    rng = random.SystemRandom()

    def ask(picked, mode, image, question, request: gr.Request):
        question = (question or "").strip()
        hidden = gr.Button(interactive=False)
        try:
            if not question:
                raise ValueError("type a question above first")
            a, b = draw(studio, list(picked or []), mode, rng)
        except Exception as e:  # noqa: BLE001
            warn(e)
            yield gr.skip(), gr.skip(), {}, "", *[hidden] * 4
            return
        texts = ["", ""]
        for texts in stream_many(studio, [a, b], image, question, 48):
            yield texts[0], texts[1], {}, "*answering…*", *[hidden] * 4
        state = {"a": a, "b": b, "answers": list(texts), "image": image, "question": question, "voted": False,
                 "session": getattr(request, "session_hash", None)}
        live = gr.Button(interactive=True)
        yield texts[0], texts[1], state, "Which answer is better? The names are shown after your vote.", *[live] * 4

    def vote(outcome, state):
        hidden = gr.Button(interactive=False)
        if not state or state.get("voted") or outcome not in OUTCOMES:
            warn("Ask a blind question first (one vote per question)." if not state or not state.get("voted")
                 else "Already voted on this one; ask again.")
            return gr.skip(), state, *[gr.skip()] * 4
        a, b = state["a"], state["b"]
        try:
            VoteStore(studio.home).add(version_a=a, version_b=b, outcome=outcome, question=state["question"],
                                       answer_a=state["answers"][0], answer_b=state["answers"][1],
                                       image=state.get("image"), lineage=lineage_of(studio.registry, a, b),
                                       session=state.get("session"))
        except Exception as e:  # noqa: BLE001
            return f"⚠ {warn(e)}", state, *[gr.skip()] * 4
        reveal = (f"**You voted: {OUTCOMES[outcome]}.**  A was **{_label(studio, a)}**, "
                  f"B was **{_label(studio, b)}**. The leaderboard is in *Versions & evaluation*.")
        return reveal, {**state, "voted": True}, *[hidden] * 4

    gr.Markdown("### Blind vote\nTwo versions drawn at random answer the image and question above as **A** and "
                "**B**; vote, then see which was which.")
    with gr.Row():
        mode = gr.Radio(MODES, value="pool", label="Draw", scale=3)
        ask_btn = gr.Button("Ask blind", variant="primary", scale=1, elem_id="blind-ask")
    with gr.Row():
        answer_a = gr.Textbox(label="A", lines=3, interactive=False, elem_id="blind-a")
        answer_b = gr.Textbox(label="B", lines=3, interactive=False, elem_id="blind-b")
    with gr.Row():
        buttons = {k: gr.Button(text, interactive=False, elem_id=f"blind-vote-{k}") for k, text in OUTCOMES.items()}
    reveal = gr.Markdown(elem_id="blind-reveal")
    state = gr.State({})
    with gr.Row(visible=False):
        outcome = gr.Textbox()
        vote_api = gr.Button()

    outputs = [answer_a, answer_b, state, reveal, *buttons.values()]
    ask_btn.click(ask, [compare.versions, mode, compare.image, compare.question], outputs, api_name="blind_ask",
                  concurrency_id="generate", show_progress="hidden")
    vote_outputs = [reveal, state, *buttons.values()]
    for key, button in buttons.items():
        button.click(lambda s, k=key: vote(k, s), state, vote_outputs, api_visibility="private", queue=False)
    vote_api.click(vote, [outcome, state], vote_outputs, api_name="blind_vote")
    return types.SimpleNamespace(state=state, reveal=reveal)


def _label(studio: Studio, version_id: str) -> str:
    try:
        return version_label(studio.registry.get(version_id))
    except Exception:  # noqa: BLE001 - deleted since the question was asked
        return version_id

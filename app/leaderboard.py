"""Versions tab: the live leaderboard from blind votes (Bradley-Terry per lineage, bootstrap 95% intervals) and the
votes' JSONL export. A timer re-reads the vote count every few seconds and refits only when it changed.
"""
from __future__ import annotations

import time
import types

import gradio as gr

from llaca.serve.votes import VoteStore, leaderboards

from . import Studio, warn

COLUMNS = ["lineage", "rank", "version", "rating", "95% interval", "votes", "wins", "losses", "ties / both bad"]
POLL_SECONDS = 3.0


def rows(studio: Studio) -> list[list]:
    out = []
    for lineage, board in leaderboards(VoteStore(studio.home)).items():
        for rank, r in enumerate(board, 1):
            out.append([lineage, rank, r["version"], r["rating"], f"{r['ci_low']:.0f} – {r['ci_high']:.0f}",
                        r["votes"], r["wins"], r["losses"], r["ties"]])
    return out


def summary(n: int) -> str:
    if not n:
        return "No blind votes yet: vote in *Compare → Blind vote*."
    return (f"**{n} blind vote(s).** Rating: Bradley-Terry on the Elo scale (1000 = average; +100 = wins 64% of the "
            "time), ties and 'both bad' count half; interval: 95% bootstrap over the votes.")


def build(studio: Studio) -> types.SimpleNamespace:
    def refresh():
        n = VoteStore(studio.home).count()
        return summary(n), rows(studio), n

    def poll(seen):
        n = VoteStore(studio.home).count()
        if n == seen:
            return gr.skip(), gr.skip(), gr.skip()
        return summary(n), rows(studio), n

    def export():
        try:
            path = VoteStore(studio.home).export_jsonl(studio.home / "exports" / f"votes-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        except Exception as e:  # noqa: BLE001
            warn(e)
            return None
        return str(path)

    gr.Markdown("### Blind-vote leaderboard")
    n0 = VoteStore(studio.home).count()
    head = gr.Markdown(summary(n0), elem_id="leaderboard-summary")
    table = gr.Dataframe(headers=COLUMNS, value=rows(studio), interactive=False, label="Leaderboard per lineage",
                         elem_id="leaderboard")
    with gr.Row():
        export_btn = gr.Button("Export votes (JSONL)", size="sm", scale=1)
        export_file = gr.File(label="votes.jsonl", interactive=False, height=70, scale=3)
    seen = gr.State(n0)
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(poll, seen, [head, table, seen], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    gr.Button(visible=False).click(refresh, None, [head, table, seen], api_name="leaderboard", concurrency_limit=None)
    export_btn.click(export, None, export_file, api_name="export_votes", concurrency_limit=None)
    return types.SimpleNamespace(refresh=refresh, outputs=[head, table, seen])

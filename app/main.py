"""The Blocks: four tabs (one module each) plus the wiring between them and the base-build banner.

    studio = Studio(home)              # registry, job queue + worker supervisor, model cache
    demo = build_app(studio)
    demo.queue(**QUEUE).launch(**launch_options(studio))
"""
from __future__ import annotations

import gradio as gr

from . import SAMPLES_DIR, Studio, chat_tab, compare_tab, learn_tab, versions_tab
from . import blind, chat_log, correct, corrections_panel, leaderboard

QUEUE = dict(default_concurrency_limit=2, max_size=64)

CSS = """
#app-title h1 {margin-bottom: 0}
#base-banner {background: #fff7e0; border-radius: 8px; padding: 0 12px}
#base-banner:empty {display: none}
.llaca-progress progress {accent-color: #4c72b0; margin: 6px 0}
.llaca-error {color: #b00020; margin-top: 4px}
.compare-answer textarea {font-size: 1.05em}
footer {display: none !important}
"""


def launch_options(studio: Studio, **overrides) -> dict:
    """Arguments for `demo.launch`: which folders may be served (samples, uploads' previews, exports)."""
    allowed = [str(SAMPLES_DIR), str(studio.home / "uploads"), str(studio.home / "exports")]
    return {"allowed_paths": allowed, "show_error": False, "css": CSS, "theme": gr.themes.Soft(),
            "footer_links": [], **overrides}


def build_app(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="LLaCA Studio", analytics_enabled=False) as demo:
        gr.Markdown("# LLaCA Studio\nTeach a small LLaVA new tasks one stage at a time, and measure what each update "
                    "rule makes it forget.", elem_id="app-title")
        gr.Markdown(studio.base_line(), elem_id="base-line")
        banner = gr.Markdown(studio.base_build_status(), elem_id="base-banner")
        with gr.Tabs(selected="chat") as tabs:
            with gr.Tab("Chat", id="chat") as chat_page:
                chat = chat_tab.build(studio)
                correct.wire_chat(studio, chat)
                chat_log.build(studio, chat)
            with gr.Tab("Learn", id="learn") as learn_page:
                learn = learn_tab.build(studio)
                corrections = corrections_panel.build(studio)
            with gr.Tab("Compare", id="compare") as compare_page:
                compare = compare_tab.build(studio)
                correct.wire_compare(studio, compare)
                blind.build(studio, compare)
            with gr.Tab("Versions & evaluation", id="versions") as versions_page:
                versions = versions_tab.build(studio)
                votes = leaderboard.build(studio)
        _wire(demo, studio, tabs, banner, chat, learn, compare, versions,
              pages=(chat_page, learn_page, compare_page, versions_page))
        fast = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
        learn_page.select(corrections.view, None, corrections.outputs, **fast)
        versions_page.select(votes.refresh, None, votes.outputs, **fast)
        demo.load(corrections.view, None, corrections.outputs, **fast)
    return demo


def _version_dropdown(studio: Studio, current):
    choices = studio.version_choices()
    ids = [vid for _, vid in choices]
    return gr.Dropdown(choices=choices, value=current if current in ids else (ids[0] if ids else None))


def _wire(demo, studio, tabs, banner, chat, learn, compare, versions, pages):
    """Cross-tab events: version lists follow the registry, and 'compare before vs after' jumps tabs."""
    chat_page, learn_page, compare_page, versions_page = pages
    fast = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")

    chat_page.select(chat.refresh, chat.version, chat.version, **fast)
    learn_page.select(lambda p: _version_dropdown(studio, p), learn.parent, learn.parent, **fast)
    compare_page.select(compare.refresh, compare.versions, [compare.versions, compare.stage], **fast)
    versions_page.select(versions.refresh, [versions.picked, versions.selected], versions.view, **fast)

    def jump_to_compare(version_id):
        try:
            pair = compare_tab.before_after(studio, version_id)
        except Exception as e:  # noqa: BLE001
            from . import warn

            warn(e)
            return gr.skip(), gr.skip()
        return gr.Tabs(selected="compare"), gr.Dropdown(choices=studio.version_choices(), value=pair)

    versions.compare_btn.click(jump_to_compare, versions.selected, [tabs, compare.versions], **fast)

    def watch_base(current, was_ready):
        """While the base model builds: show its progress; once it exists, fill the version pickers."""
        ready = studio.base_ready()
        if ready and was_ready:
            return gr.skip(), gr.skip(), gr.skip(), True, gr.Timer(active=False)
        status = studio.base_build_status()
        if ready:
            pickers = _version_dropdown(studio, current), _version_dropdown(studio, None)
            return status, *pickers, True, gr.Timer(active=False)
        return status, gr.skip(), gr.skip(), False, gr.skip()

    ready = gr.State(studio.base_ready())
    base_timer = gr.Timer(2.0, active=not studio.base_ready())
    base_timer.tick(watch_base, [chat.version, ready], [banner, chat.version, learn.parent, ready, base_timer], **fast)
    demo.load(lambda current: (chat.refresh(current), studio.base_build_status()), chat.version,
              [chat.version, banner], **fast)

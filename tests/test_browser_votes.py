"""In a real headless browser: a blind vote in Compare (answers as A and B, names revealed only after the vote),
then the live leaderboard in *Versions & evaluation*. Screenshots as in test_browser.py; the committed ones
(assets/screenshots/blind-*.png, leaderboard.png) were made with

    LLACA_SCREENSHOTS=assets/screenshots LLACA_SCREENSHOT_HOME=<the $LLACA_HOME `python -m llaca.bench corrections
    --home DIR` leaves> LLACA_SCREENSHOT_POOL=v3 .venv/bin/python -m pytest tests/test_browser_votes.py

(votes are cast by a judge that knows each sample's right answer, so that leaderboard reflects real judgments).
"""
from __future__ import annotations

import os

import pytest
from test_browser import CHROMIUM, page, served, shots_dir  # noqa: F401 - fixtures reused

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")

ENABLED = """id => { const el = document.querySelector('#' + id);
                     const b = el && (el.tagName === 'BUTTON' ? el : el.querySelector('button'));
                     return b && !b.disabled; }"""


def judge(answer_a: str, answer_b: str, gold: str) -> str:
    """The vote of a judge who knows the right answer (so the committed leaderboard reflects real judgments)."""
    from llaca.evaluation.metrics import is_correct

    a, b = is_correct(answer_a, gold), is_correct(answer_b, gold)
    return {(True, False): "a", (False, True): "b", (True, True): "tie", (False, False): "bothbad"}[(a, b)]


def test_blind_vote_reveals_names_after_the_vote_and_fills_the_leaderboard(page, served, tmp_path_factory):
    from app.chat_tab import samples

    out = shots_dir(tmp_path_factory)
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_timeout(2500)
    for version in filter(None, os.environ.get("LLACA_SCREENSHOT_POOL", "").split(",")):  # more versions to draw from
        page.locator("#compare-versions input").fill(version)
        page.keyboard.press("Enter")
        page.wait_for_timeout(500)
    rounds = [5, 0, 1, 5, 3, 2, 5, 4, 0, 1, 3, 2]  # sample images: counting (which the corrections taught), colours, shapes
    for k, index in enumerate(rounds):
        page.locator("#compare-samples .thumbnail-item").nth(index).click()  # image + question
        page.wait_for_timeout(800)
        page.locator("#blind-ask").click()
        page.wait_for_function(ENABLED, arg="blind-vote-a", timeout=240_000)
        reveal = page.locator("#blind-reveal").inner_text()
        assert "names are shown after" in reveal and "A was" not in reveal
        outcome = judge(page.locator("#blind-a textarea").input_value(), page.locator("#blind-b textarea").input_value(),
                        samples()[index][2])
        if k == 0:
            page.wait_for_timeout(800)
            page.screenshot(path=str(out / "blind-vote.png"), full_page=True)
        page.locator(f"#blind-vote-{outcome}").click()
        page.wait_for_function("() => document.querySelector('#blind-reveal').innerText.includes('A was')",
                               timeout=60_000)
        if k == 0:
            page.wait_for_timeout(800)
            page.screenshot(path=str(out / "blind-revealed.png"), full_page=True)
        assert not page.evaluate(ENABLED, f"blind-vote-{outcome}")  # one vote per question
    page.get_by_role("tab", name="Versions").click()
    page.wait_for_function(
        f"() => document.querySelector('#leaderboard-summary').innerText.includes('{len(rounds)} blind vote')",
        timeout=60_000)
    page.wait_for_timeout(1500)
    page.locator("#leaderboard").scroll_into_view_if_needed()
    page.screenshot(path=str(out / "leaderboard.png"), full_page=True)
    table = page.locator("#leaderboard").inner_text()
    assert "base" in table
    for name in ("blind-vote", "blind-revealed", "leaderboard"):
        assert (out / f"{name}.png").stat().st_size > 20_000, f"{name}.png looks empty"


def test_editing_an_answer_in_the_chat_saves_a_correction(page, served, tmp_path_factory):
    """Correct = Gradio's edit pencil on an assistant message: the edit is saved with image + question."""
    from app.chat_tab import samples
    from llaca.train.corrections import CorrectionStore

    store = CorrectionStore(served.studio.home)
    before = store.count()
    page.get_by_role("tab", name="Chat").click()
    image, question, _ = samples()[5]
    page.set_input_files("#chat-input input[type=file]", image)
    page.wait_for_selector("#chat-input img", timeout=30_000)
    page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function("""() => { const m = document.querySelectorAll('[data-testid="bot"]');
                                      return m.length && m[m.length - 1].innerText.trim()
                                             && m[m.length - 1].innerText.trim() !== '…'; }""", timeout=240_000)
    page.wait_for_timeout(1500)
    page.locator('[data-testid="bot"]').last.hover()
    page.get_by_role("button", name="Edit").last.click()
    page.locator('[data-testid="bot"] textarea, .message textarea').first.fill("3")  # the edit box
    page.get_by_role("button", name="Submit").first.click()
    page.wait_for_function("() => document.body.innerText.includes('Saved as a correction')", timeout=30_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots_dir(tmp_path_factory) / "correct.png"), full_page=True)
    saved = store.list()[-1]
    assert store.count() == before + 1 and (saved.question, saved.answer) == (question, "3")
    assert saved.image.is_file() and saved.original  # the image was copied; what the model had said is kept

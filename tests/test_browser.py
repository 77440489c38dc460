"""A real headless browser (the system Chromium, driven by Playwright) loads the app, asks a question about an
image in the chat, sees the streamed answer, and takes a screenshot of every tab.

Screenshots go to pytest's tmp dir. The committed ones (assets/screenshots) were made with

    LLACA_SCREENSHOTS=assets/screenshots LLACA_SCREENSHOT_HOME=<a $LLACA_HOME after the demo> \
    LLACA_SCREENSHOT_VERSION=v12 .venv/bin/python -m pytest tests/test_browser.py   # learn.png, versions.png
    LLACA_SCREENSHOT_VERSION=base ...   # chat.png (the demo's versions learned other tasks than colours)

(the real base and the demo's versions give real heatmaps; v12 is the demo's last stage with the default recipe;
Compare's shot comes from scripts/demo_screenshot.py on the same home). chat.png and learn.png were retaken on the
default base `small` (2026-12-02):

    LLACA_BASE=small LLACA_SCREENSHOT_HOME=<a $LLACA_HOME with small installed> LLACA_SCREENSHOT_VERSION=small \
    LLACA_SCREENSHOTS=DIR .venv/bin/python -m pytest tests/test_browser.py -k screenshots_every_tab
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import served_app


CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
TABS = {"chat": "Chat", "learn": "Learn", "compare": "Compare", "versions": "Versions"}


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):

    source = Path(os.environ.get("LLACA_SCREENSHOT_HOME") or request.getfixturevalue("chatty_home"))
    home = tmp_path_factory.mktemp("browser") / "home"
    shutil.copytree(source, home, ignore=shutil.ignore_patterns("runs", "uploads", "locks", "exports"))
    with served_app(home) as served:
        yield served


def served_copy(source: Path) -> Path:
    """A throwaway copy of a $LLACA_HOME for a screenshot script to serve (no run caches, uploads, locks, exports
    or job queue), so nothing the script does touches the original."""
    served = Path(tempfile.mkdtemp()) / "home"
    shutil.copytree(source, served, ignore=shutil.ignore_patterns("runs", "uploads", "locks", "exports", "jobs*"))
    return served


@contextlib.contextmanager
def browser_page(url: str):
    """Headless Debian chromium (Playwright) on the app at `url`, once the chat box is there; closed after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#chat-input textarea", timeout=60_000)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(served):
    with browser_page(served.url) as page:
        yield page


def shots_dir(tmp_path_factory) -> Path:
    out = Path(os.environ.get("LLACA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def zip_task(coin_dir: Path, tmp_path_factory) -> Path:
    from test_app import zip_folder

    task = sorted(p.name for p in coin_dir.iterdir() if (p / "train").is_dir())[0]
    return zip_folder(coin_dir / task / "train", tmp_path_factory.mktemp("upload") / f"{task}.zip")


def wait_for_answer(page, n: int) -> str:
    """Wait until the n-th bot message holds text (not the '…' placeholder) and the stream has settled."""
    page.wait_for_function(
        """n => { const m = document.querySelectorAll('[data-testid="bot"]');
                  return m.length >= n && m[n - 1].innerText.trim() && m[n - 1].innerText.trim() !== '…'; }""",
        arg=n, timeout=60_000)
    page.wait_for_timeout(1500)
    return page.locator('[data-testid="bot"]').nth(n - 1).inner_text().strip()


def test_browser_asks_about_an_image_and_screenshots_every_tab(page, coin_dir, tmp_path_factory):
    from app.chat_tab import samples

    if os.environ.get("LLACA_SCREENSHOT_VERSION"):  # README shots: chat with a chosen version
        page.locator("#chat-version input").fill(os.environ["LLACA_SCREENSHOT_VERSION"])
        page.keyboard.press("Enter")
    image, question, _ = samples()[0]
    page.set_input_files("#chat-input input[type=file]", image)
    page.wait_for_selector("#chat-input img", timeout=30_000)  # the attachment's thumbnail
    page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")
    answer = wait_for_answer(page, 1)
    assert answer and "⚠" not in answer and "Traceback" not in page.content()
    assert page.locator('[data-testid="user"]').first.locator("img").count() >= 1  # the image is in the chat
    page.fill("#chat-input textarea", "What shape is this?")  # a second turn about the same image
    page.press("#chat-input textarea", "Enter")
    assert wait_for_answer(page, 2)

    out = shots_dir(tmp_path_factory)
    page.screenshot(path=str(out / "chat.png"), full_page=True)
    for key, name in list(TABS.items())[1:]:
        page.get_by_role("tab", name=name).click()
        page.wait_for_timeout(2500)  # the tab refreshes its lists and plots on select
        if key == "learn":  # upload a set: its validation report and preview appear before anything trains
            page.set_input_files("#train-files input[type=file]", str(zip_task(coin_dir, tmp_path_factory)))
            page.wait_for_function("() => document.querySelector('#validation-report').innerText.includes('all valid')",
                                   timeout=60_000)
            page.wait_for_timeout(1500)
        if key == "compare":
            page.locator("#compare-samples .thumbnail-item").first.click()  # a sample: image + question
            page.wait_for_timeout(1000)
            page.get_by_role("button", name="Ask all").click()
            page.wait_for_function(
                """() => [...document.querySelectorAll('.compare-answer textarea')]
                         .some(t => t.value.trim().length > 0)""", timeout=60_000)
            page.wait_for_timeout(1000)
        page.screenshot(path=str(out / f"{key}.png"), full_page=True)
    for key in TABS:
        assert (out / f"{key}.png").stat().st_size > 20_000, f"{key}.png looks empty"

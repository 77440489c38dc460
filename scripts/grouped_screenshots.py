"""Screenshots of a grouped version in the app (headless Debian chromium via Playwright), for docs/guide.md.

    .venv/bin/python scripts/grouped_screenshots.py HOME VERSION CHAT_IMAGE "QUESTION" UPLOAD_ZIP [OUT_DIR
                                                    [IMAGE2 "QUESTION2"]]

HOME: a $LLACA_HOME holding a grouped lineage (copied, never changed); VERSION: its grouped version; the chat asks
QUESTION about CHAT_IMAGE, then QUESTION2 about IMAGE2 (each answer shows the badge of the group that answered);
UPLOAD_ZIP is uploaded in the Learn tab with the "grouped" method (the similarity to each group and the decision
appear before Start).
Writes grouped_chat.png, grouped_learn.png, grouped_compare.png, grouped_versions.png (default assets/screenshots).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import served_app  # noqa: E402
from test_browser import browser_page, served_copy, wait_for_answer  # noqa: E402


def main(home, version, image, question, upload_zip, out="assets/screenshots", image2=None, question2=None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    served = served_copy(Path(home))
    os.environ["LLACA_HOME"] = str(served)
    with served_app(served, start_worker=False) as app, browser_page(app.url) as page:
        page.locator("#chat-version input").fill(version)
        page.keyboard.press("Enter")
        page.set_input_files("#chat-input input[type=file]", str(image))
        page.wait_for_selector("#chat-input img", timeout=30_000)
        page.fill("#chat-input textarea", question)
        page.press("#chat-input textarea", "Enter")
        wait_for_answer(page, 2)   # the answer, then the badge naming the group
        page.wait_for_function("() => document.body.innerText.includes('answered by group')", timeout=60_000)
        if image2:
            page.set_input_files("#chat-input input[type=file]", str(image2))
            page.wait_for_selector("#chat-input img", timeout=30_000)
            page.fill("#chat-input textarea", question2)
            page.press("#chat-input textarea", "Enter")
            wait_for_answer(page, 4)
        page.screenshot(path=str(out / "grouped_chat.png"), full_page=True)

        page.get_by_role("tab", name="Learn").click()
        page.wait_for_timeout(2000)
        page.get_by_label("grouped: llaca per instruction group (later LLaCA)").check()
        page.set_input_files("#train-files input[type=file]", str(upload_zip))
        preview = "(document.querySelector('#grouping-preview')?.innerText || '')"
        page.wait_for_function(f"() => (t => t.includes('answered by') || t.includes('no groups yet'))({preview})",
                               timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "grouped_learn.png"), full_page=True)

        page.get_by_role("tab", name="Compare").click()
        page.wait_for_timeout(2500)
        page.set_input_files("#compare-image input[type=file]", str(image))
        page.wait_for_timeout(1500)
        page.get_by_label("Question").fill(question)
        page.get_by_role("button", name="Ask all").click()
        page.wait_for_function("() => document.body.innerText.includes('answered by group')", timeout=60_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out / "grouped_compare.png"), full_page=True)

        page.get_by_role("tab", name="Versions").click()
        page.wait_for_timeout(3000)
        page.locator("#groups-table").scroll_into_view_if_needed()
        page.screenshot(path=str(out / "grouped_versions.png"), full_page=True)
    for name in ("chat", "learn", "compare", "versions"):
        print(out / f"grouped_{name}.png")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Run the app's one-click demo for real, then screenshot Compare: what each arm kept of the first task.

    .venv/bin/python scripts/demo_screenshot.py HOME [OUT_DIR]

HOME: a fresh (or existing) $LLACA_HOME. The demo is queued exactly as the Learn tab's "Run the demo" button does
(`app.learn_tab.queue_demo`: `llaca.data.demo.TASKS` learned by each of `llaca.data.demo.DEFAULT_ARMS` at the default lr) and
the background worker trains it. Compare then asks four demo versions (`seq` after the first task, and every arm
after the last) the question of a held-out test record of the *first* task, so the picture shows what the later
stages made each arm forget. Writes `compare.png` (default assets/screenshots) and prints the four answers, the
gold, and every demo version's accuracy on every task's test split (one record is an anecdote; the accuracies are
the figure).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import served_app  # noqa: E402
from test_browser import browser_page, served_copy  # noqa: E402


def run_demo(home: Path) -> dict[str, str]:
    """Queue the demo through the job store and wait for the worker; {version name: id}."""
    from app import Studio
    from app.learn_tab import queue_demo
    from llaca.bases.install import ensure_base
    from llaca.data import demo

    studio = Studio(home, start_worker=True)
    try:
        ensure_base(studio.registry)
        names = {v.meta.get("name"): v.id for v in studio.versions()}
        last = [c["name"] for c in (demo.stage_configs(home, arm)[-1] for arm in demo.DEFAULT_ARMS)]
        if not all(n in names for n in last):
            jobs = queue_demo(studio)
            while True:
                states = [studio.jobs.get(j.id).status for j in jobs]
                if any(s in ("failed", "cancelled") for s in states):
                    raise SystemExit(f"a demo stage did not finish: {states}")
                if all(s == "done" for s in states):
                    break
                time.sleep(3)
        return {v.meta.get("name"): v.id for v in studio.versions()}
    finally:
        studio.close()


def demo_accuracies(home: Path, version_ids: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each demo version's accuracy on every demo task's test split (50 records each): the picture's context."""
    from llaca.data import load_instruction_set
    from llaca.data.demo import TASKS
    from llaca.evaluation.evaluate import evaluate
    from llaca.versions import Registry, load_version

    registry = Registry(home)
    tests = {t: load_instruction_set(home / "datasets" / "demo" / t / "test") for t in TASKS}
    out = {}
    for name, vid in version_ids.items():
        model, processor = load_version(registry, vid)
        out[name] = {t: round(evaluate(model, processor, ts).accuracy, 1) for t, ts in tests.items()}
    return out


def main(home: str, out: str = "assets/screenshots") -> None:
    from llaca.data import demo

    home, out = Path(home), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = run_demo(home)
    first = demo.TASKS[0]
    chains = [[c["name"] for c in demo.stage_configs(home, arm)] for arm in demo.DEFAULT_ARMS]
    order = [chains[0][0]] + [chain[-1] for chain in chains]  # seq after task 1, then every arm after the last task
    ids = [names[n] for n in order]
    record = json.loads((home / "datasets" / "demo" / first / "test" / "data.json").read_text())[0]
    image = home / "datasets" / "demo" / first / "test" / record["image"]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    gold = record["conversations"][1]["value"]

    served = served_copy(home)
    os.environ["LLACA_HOME"] = str(served)
    with served_app(served, start_worker=False) as app, browser_page(app.url) as page:
        page.get_by_role("tab", name="Compare").click()
        page.wait_for_timeout(2500)
        box = page.locator("#compare-versions")
        while box.locator(".token-remove, [aria-label^='Remove']").count():
            box.locator(".token-remove, [aria-label^='Remove']").first.click()
            page.wait_for_timeout(300)
        field = box.locator("input").first
        for vid in ids:
            field.click()
            field.fill(vid)
            page.keyboard.press("Enter")
            page.wait_for_timeout(400)
        page.keyboard.press("Escape")
        page.set_input_files("#compare-image input[type=file]", str(image))
        page.wait_for_timeout(1500)
        page.get_by_label("Question").fill(question)
        page.get_by_role("button", name="Ask all").click()
        page.wait_for_function(
            """n => [...document.querySelectorAll('.compare-answer textarea')]
                    .filter(t => t.value.trim().length > 0).length >= n""", arg=len(ids), timeout=120_000)
        page.wait_for_timeout(2500)
        answers = page.eval_on_selector_all(".compare-answer textarea", "ts => ts.map(t => t.value)")
        page.screenshot(path=str(out / "compare.png"), full_page=True)
    print(json.dumps({"question": question, "gold": gold, "versions": dict(zip(order, ids)),
                      "answers": dict(zip(order, answers)),
                      "test accuracy (%)": demo_accuracies(home, dict(zip(["base", *order], ["base", *ids])))},
                     indent=1))
    print(out / "compare.png")


if __name__ == "__main__":
    main(*sys.argv[1:])

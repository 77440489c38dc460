"""Through the app's HTTP API (`gradio_client`): correct an answer -> learn the corrections -> the new version gives
the corrected answer; and blind votes -> the leaderboard and the JSONL export; and the opt-in conversation log.

The app runs in-process over a private copy of conftest's `chatty_home`; the corrections stage trains in the real
worker process. It uses `seq` and a small minimum of steps (the API's parameters) to stay fast on the quick
base; the measured recipe for the shipped base is `python -m llaca.bench corrections`.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
from conftest import served_app
from test_app import as_input, last_answer, sample  # the chat helpers, shared

from llaca.jobs import JobStore

LEARN_TIMEOUT = 1200  # ~1 min on a quiet machine; a loaded shared one took 9 min to start the worker and the stage
CORRECTED = "a purple owl"


@pytest.fixture(scope="module")
def app(chatty_home, tmp_path_factory):

    home = tmp_path_factory.mktemp("teach") / "home"
    shutil.copytree(chatty_home, home)
    with served_app(home) as served:
        yield served


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def ask(client, image, question, version):
    from gradio_client import handle_file

    history, _ = client.predict({"text": question, "files": [handle_file(image)]}, [], version, 16, 0.0,
                                api_name="/chat")
    return history


def test_correct_then_learn_then_the_answer_is_fixed(client, app):
    from llaca.evaluation.metrics import normalize_answer

    image, question, _ = sample()
    history = ask(client, image, question, "chatty")
    before = last_answer(history)
    assert normalize_answer(before) != normalize_answer(CORRECTED)
    note = client.predict(as_input(history), 1, CORRECTED, "chatty", api_name="/correct")
    assert note.startswith("✔") and "1 pending" in note, note
    head, table, _, _ = client.predict(api_name="/corrections")
    assert "1 pending" in head and [r[2] for r in table["data"]] == [CORRECTED]
    assert table["data"][0][3] == before  # what the version had said

    # 120 steps: at the per-base recipe's lr (tiny 5e-4, 4 replay records beside the one correction) 50 left "purple"
    message, job_id = client.predict("seq", 120, api_name="/learn_corrections")
    assert message.startswith("Queued job"), message
    jobs = JobStore(app.home)
    deadline = time.time() + LEARN_TIMEOUT
    while jobs.get(int(job_id)).status not in ("done", "failed", "cancelled") and time.time() < deadline:
        time.sleep(1.0)
    job = jobs.get(int(job_id))
    assert job.status == "done", (job.status, job.error, jobs.log_tail(job.id))

    after = last_answer(ask(client, image, question, job.version_id))
    assert normalize_answer(after) == normalize_answer(CORRECTED), after
    head, table, _, _ = client.predict(api_name="/corrections")
    assert table["data"] == [] and f"`{job.version_id}`" in head  # archived with the version it produced
    version = app.studio.registry.get(job.version_id)
    tests = version.meta["metrics"]["test"]
    assert any(k.startswith("corrections-") and d["accuracy"] == 100.0 for k, d in tests.items()), tests


def test_compare_correct_saves_the_picked_answer(client, app):
    from gradio_client import handle_file

    from llaca.train.corrections import CorrectionStore

    image, question, _ = sample()
    *_, answers = client.predict(["base", "chatty"], handle_file(image), question, 8, api_name="/compare")
    chatty = app.studio.registry.get("chatty").id
    assert set(answers) == {"base", chatty}  # answers by version id
    note = client.predict(handle_file(image), question, chatty, "a red circle", answers,
                          api_name="/correct_compare")
    assert note.startswith("✔"), note
    saved = CorrectionStore(app.home).list()[-1]
    assert (saved.version, saved.answer, saved.original) == (chatty, "a red circle", answers[chatty])
    CorrectionStore(app.home).remove(saved.id)


def test_blind_votes_feed_the_leaderboard_and_export(client, app):
    from gradio_client import Client, handle_file

    image, question, _ = sample()
    voter = Client(app.url, verbose=False)  # its own session: the drawn pair lives in the session's state
    outcomes = ["a", "b", "tie", "bothbad", "a"]
    for outcome in outcomes:
        a_text, b_text, reveal = voter.predict(["base", "chatty"], "pool", handle_file(image), question,
                                               api_name="/blind_ask")
        assert a_text.strip() and b_text.strip()
        assert "names are shown after" in reveal and "chatty" not in reveal  # nothing revealed before the vote
        reveal = voter.predict(outcome, api_name="/blind_vote")
        assert "A was" in reveal and "base" in reveal and "chatty" in reveal, reveal
    voter.predict("a", api_name="/blind_vote")  # one vote per question: a second one is refused
    chatty = app.studio.registry.get("chatty").id

    summary, board = client.predict(api_name="/leaderboard")
    assert f"{len(outcomes)} blind vote" in summary
    rows = {r[2]: r for r in board["data"]}
    assert set(rows) == {"base", chatty} and all(r[0] == "base" for r in rows.values())  # one lineage: base's
    assert all(r[5] == len(outcomes) for r in rows.values())  # every vote counts for both versions
    assert sum(r[6] for r in rows.values()) == 3 and all(r[8] == 2 for r in rows.values())  # 3 decided, 2 even

    exported = client.predict(api_name="/export_votes")
    lines = [json.loads(x) for x in open(exported, encoding="utf-8").read().splitlines()]
    assert [v["outcome"] for v in lines] == outcomes
    assert all({v["version_a"], v["version_b"]} == {"base", chatty} and v["image_sha256"] for v in lines)


def test_conversation_log_is_opt_in_and_deletable(client, app):
    from llaca.serve.convlog import ConversationLog

    log = ConversationLog(app.home)
    image, question, _ = sample()
    ask(client, image, question, "chatty")
    assert log.count() == 0 and not log.enabled  # off by default: nothing written
    client.predict(True, api_name="/conversation_log")
    ask(client, image, question, "chatty")
    deadline = time.time() + 10
    while log.count() == 0 and time.time() < deadline:  # logged by the event that follows the reply
        time.sleep(0.2)
    record = json.loads(log.files()[0].read_text().splitlines()[0])
    assert record["model"] == "chatty" and record["messages"][0]["content"] == question
    assert (log.dir / record["image"]).is_file()
    note = client.predict(api_name="/delete_conversation_logs")
    assert log.count() == 0 and not log.dir.exists() and "0 conversation" in note
    client.predict(False, api_name="/conversation_log")

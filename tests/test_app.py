"""The web app driven through its real HTTP API with `gradio_client`, plus the job queue it stands on.

The app runs in-process on a free loopback port over a private $LLACA_HOME; stages train in the real worker
process it supervises. The quick base of conftest stops at once (it emits end-of-sequence first), so the
module's home adds one short stage ("chatty") on the base mixture, after which the model answers in words.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import zipfile
from pathlib import Path

import pytest
from conftest import served_app

from llaca.jobs import JobError, JobStore, pid_alive

STAGE_TIMEOUT = 420  # seconds; the stage below takes ~20 s on an idle 2-core machine
STAGE_STEPS = 20


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def app(chatty_home, tmp_path_factory):
    """The real app (Blocks + queue + worker supervisor) serving a private copy of chatty_home."""
    home = tmp_path_factory.mktemp("served") / "home"
    shutil.copytree(chatty_home, home)
    broken = home / "versions" / "broken"  # weights gone (e.g. deleted by hand): must fail as a message
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"id": "broken", "parent": "base", "weights": "full", "created": 1.0}))
    with served_app(home) as served:
        yield served


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def sample():
    from app.chat_tab import samples

    return samples()[0]  # (image path, question, gold answer)


def last_answer(history: list[dict]) -> str:
    content = history[-1]["content"]
    assert history[-1]["role"] == "assistant"
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


def as_input(history: list[dict]) -> list[dict]:
    """A history the client got back, made sendable again (the client turned file parts into local paths)."""
    from gradio_client import handle_file

    def part(p):
        if p.get("type") == "file" and isinstance(p.get("file"), str):
            return {**p, "file": handle_file(p["file"])}
        return p

    return [{**m, "content": [part(p) for p in m["content"]]} for m in history]


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f.relative_to(folder))
    return out


def wait_for_job(client, predicate, timeout: float = STAGE_TIMEOUT, what: str = "job") -> list:
    """Poll the /jobs endpoint until `predicate(newest row)` holds; returns that row."""
    deadline = time.time() + timeout
    row = None
    while time.time() < deadline:
        table = client.predict(api_name="/jobs")
        rows = table["data"]
        row = rows[0] if rows else None
        if row and predicate(row):
            return row
        time.sleep(1.0)
    raise AssertionError(f"{what} did not get there in {timeout}s; last row: {row}")


def chat_timed(client, image: str, question: str) -> tuple[float, float, str]:
    """(seconds to the first streamed token, seconds to the full answer, answer) for one /chat request."""
    from llaca.bench.load import one_request  # the load benchmark's request, so both measure the same way

    out = one_request(client, image, question, max_tokens=24)
    assert out["error"] is None or out["answer"].strip(), out
    return out["first_s"], out["total_s"], out["answer"]


# ------------------------------------------------------------------------------------------ chat

def test_chat_answers_with_an_image_and_keeps_the_conversation(client):
    from gradio_client import handle_file

    image, question, _ = sample()
    history, box = client.predict({"text": question, "files": [handle_file(image)]}, [], None, 24, 0.0,
                                  api_name="/chat")
    first = last_answer(history)
    assert first.strip() and not first.startswith("⚠") and first != "(no answer)"
    assert history[0]["role"] == "user" and any(p.get("type") == "file" for p in history[0]["content"])
    history, _ = client.predict({"text": "And what shape is it?", "files": []}, as_input(history), None, 24, 0.0,
                                api_name="/chat")
    assert len(history) == 4 and last_answer(history).strip()
    again = client.predict(as_input(history), None, 24, 0.0, api_name="/regenerate")
    assert len(again) == 4 and last_answer(again).strip()


def test_sample_images_in_assets_match_their_questions():
    """The committed samples are the images coin_mini renders for their seeds (else the shown question is wrong)."""
    import random

    import numpy as np
    from PIL import Image

    from app.chat_tab import SAMPLES, samples
    from llaca.data import coin_mini

    for (task, seed), (path, question, _) in zip(SAMPLES, samples()):
        image, expected, _ = coin_mini.get_task(task).sample(random.Random(seed))
        assert question == expected
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image.convert("RGB"))), \
            f"{path} is stale: delete it and the app renders it again"


def test_chat_errors_are_messages_not_tracebacks(client):
    from gradio_client import handle_file

    image, question, _ = sample()
    history, _ = client.predict({"text": question, "files": [handle_file(image)]}, [], "broken", 8, 0.0,
                                api_name="/chat")
    text = last_answer(history)
    assert text.startswith("⚠") and "Traceback" not in text


def test_bad_chat_input_is_a_message_not_a_crash(client, tmp_path):
    """Empty message and image-only are refused (nothing sent); a non-image file and a decompression bomb
    come back as a ⚠ message in the chat; the chat still answers afterwards."""
    from gradio_client import handle_file
    from PIL import Image

    image, question, _ = sample()
    for message in ({"text": "", "files": []}, {"text": "  ", "files": [handle_file(image)]}):
        history, _ = client.predict(message, [], None, 8, 0.0, api_name="/chat")
        assert history == []  # a warning toast; nothing is asked
    fake = tmp_path / "photo.png"
    fake.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    Image.new("L", (4200, 4200)).save(huge)  # 17.6 Mpx: over the 16.8 Mpx cap, ~20 kB on disk
    for path, expected in ((fake, "not a readable image"), (huge, "4200x4200 pixels")):
        history, _ = client.predict({"text": "What is this?", "files": [handle_file(str(path))]}, [], None, 8, 0.0,
                                    api_name="/chat")
        text = last_answer(history)
        assert text.startswith("⚠") and expected in text and "Traceback" not in text, text
    history, _ = client.predict({"text": question, "files": [handle_file(image)]}, [], None, 8, 0.0,
                                api_name="/chat")
    assert not last_answer(history).startswith("⚠")


# ------------------------------------------------------------------------------------------ learn

def write_bad_set(folder: Path) -> list[Path]:
    """Three records: one good, one naming a missing image, one without conversations."""
    import random

    from llaca.data.coin_mini import get_task

    folder.mkdir(parents=True)
    image, q, a = get_task("colour_qa").sample(random.Random(0))
    image.save(folder / "good.png")
    conv = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
    rows = [{"id": "ok", "image": "images/good.png", "conversations": conv},
            {"id": "lost", "image": "images/missing.png", "conversations": conv},
            {"id": "mute", "image": "images/good.png"}]
    (folder / "bad.json").write_text(json.dumps(rows))
    return [folder / "bad.json", folder / "good.png"]


def test_bad_upload_shows_every_error_with_record_and_field(client, tmp_path):
    from gradio_client import handle_file

    files = write_bad_set(tmp_path / "bad")
    report, gallery, data_path = client.predict([handle_file(str(f)) for f in files], None,
                                                        api_name="/validate")
    assert "2 problem(s)" in report
    assert "record 1 (id 'lost')" in report and "field 'image'" in report and "missing.png" in report
    assert "record 2 (id 'mute')" in report and "field 'conversations'" in report
    assert data_path == "" and len(gallery) == 1  # the one valid record is previewed, nothing is staged
    message, _ = client.predict("", "llaca", 0.99, 0.2, None, "", 1, 5, 1e-3, False, api_name="/start_stage")
    assert message.startswith("⚠") and "valid instruction set" in message


def test_csv_upload_shows_detected_format_and_converts_to_parquet(client, tmp_path):
    """Another format through the real app: a CSV + its images, the detected format in the report, and the
    Convert button's download (a Parquet file the loader reads back)."""
    from gradio_client import handle_file

    from llaca.bench.formats import write_example
    from llaca.data import load_instruction_set

    src = write_example("csv", tmp_path / "csv", n=4, n_images=2)
    flat = [src / "data.csv", *sorted((src / "images").iterdir())]
    report, gallery, data_path = client.predict([handle_file(str(f)) for f in flat], None, api_name="/validate")
    assert report.startswith("✔") and "Detected: image / question / answer columns in CSV." in report, report
    download, message = client.predict(data_path, "parquet", api_name="/export_data")
    assert message == "" and Path(download).suffix == ".parquet"
    assert [r.answer for r in load_instruction_set(download).records] == ["red", "green", "red", "green"]


def test_a_stage_runs_in_the_worker_survives_a_worker_crash_and_becomes_a_version(client, app, coin_dir, tmp_path):
    """Upload (zip) → validate → start; kill the worker mid-stage (the app keeps serving), resume → new version,
    evaluated on its own test split. Chat latency is measured idle and while the worker trains."""
    from gradio_client import handle_file

    task = sorted(p.name for p in coin_dir.iterdir() if (p / "train").is_dir())[0]
    train_zip = zip_folder(coin_dir / task / "train", tmp_path / f"{task}.zip")
    test_zip = zip_folder(coin_dir / task / "test", tmp_path / f"{task}-test.zip")
    report, gallery, data_path = client.predict([handle_file(str(train_zip))], [handle_file(str(test_zip))],
                                                   api_name="/validate")
    assert report.startswith("✔") and "all valid" in report and data_path and gallery
    before = {v.id for v in app.studio.versions()}
    image, question, _ = sample()
    idle = chat_timed(client, image, question)

    message, _ = client.predict(data_path, "llaca", 0.99, 0.2, "base", "ui-stage", 1, STAGE_STEPS, 1e-3, False,
                                api_name="/start_stage")
    assert "Queued job" in message
    row = wait_for_job(client, lambda r: r[2] == "running", what="stage start")
    job = app.studio.jobs.get(row[0])
    assert pid_alive(job.pid)
    os.kill(job.pid, signal.SIGKILL)  # a worker crash...
    wait_for_job(client, lambda r: r[2] == "interrupted", timeout=60, what="crash detection")
    assert chat_timed(client, image, question)[2].strip()  # ...does not take the UI down
    assert client.predict(0, api_name="/resume_job").startswith(f"Job #{job.id} queued again")
    wait_for_job(client, lambda r: (r[2] == "running" and "step" in r[3]) or r[2] in ("done", "failed"),
                 what="resumed stage")
    busy = chat_timed(client, image, question)  # the worker (most likely) trains while we chat
    row = wait_for_job(client, lambda r: r[2] in ("done", "failed"), what="resumed stage")
    assert row[2] == "done", row
    new = app.studio.registry.get(row[4])
    assert new.id not in before and new.name == "ui-stage" and new.parent == "base"
    assert new.meta["method"] == "llaca" and Path(new.meta["stage"]["path"]).is_relative_to(app.home / "jobs")
    assert f"{task}-test" in new.meta["metrics"]["test"]  # evaluated on its own test split automatically
    lineage, metrics, *_ = client.predict([], None, api_name="/versions")
    assert any(r[0].endswith(new.id) and f"{task}-test" in r[7] for r in lineage["data"])
    print(f"\nchat latency idle: first token {idle[0]:.2f}s, full {idle[1]:.2f}s; "
          f"while training: first token {busy[0]:.2f}s, full {busy[1]:.2f}s")
    assert busy[1] < 60


# ------------------------------------------------------------------------------------------ compare + versions

def test_compare_returns_one_answer_per_version(client):
    from gradio_client import handle_file

    image, question, _ = sample()
    *boxes, answers = client.predict(["base", "v1"], handle_file(image), question, 16, api_name="/compare")
    assert set(answers) == {"base", "v1"} and all(isinstance(a, str) and a for a in answers.values())
    assert answers["v1"] in [b["value"] for b in boxes] and "Traceback" not in json.dumps(answers)


def test_versions_rename_protects_base_and_exports_a_hf_folder(client, app):
    note, *_ = client.predict("v1", "chatty-renamed", [], api_name="/rename_version")
    assert "Renamed v1" in note and app.studio.registry.get("v1").name == "chatty-renamed"
    note, *_ = client.predict("base", True, [], api_name="/delete_version")
    assert note.startswith("⚠") and "base" in note and app.studio.registry.exists("base")
    note, archive = client.predict("v1", api_name="/export_version")
    folder = app.home / "exports" / "v1"
    assert "Exported v1" in note and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    from transformers import LlavaForConditionalGeneration

    assert LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True) is not None


# ------------------------------------------------------------------------------------------ the queue itself

def test_queue_order_parents_cancel_and_recovery(tmp_path):
    store = JobStore(tmp_path)
    a = store.submit({"data": "x"}, label="a")
    b = store.submit({"data": "y"}, label="b", parent_job=a.id)
    c = store.submit({"data": "z"}, label="c")
    claimed = store.claim_next(pid=os.getpid())
    assert claimed.id == a.id and claimed.status == "running"
    assert store.claim_next(pid=os.getpid()).id == c.id  # b waits for its parent
    store.finish(a.id, "done", version_id="v7")
    b_run = store.claim_next(pid=os.getpid())
    assert b_run.id == b.id and b_run.config["parent"] == "v7"  # trains from the parent job's version
    store.finish(b.id, "failed", error="boom")
    d = store.submit({"data": "w"}, parent_job=b.id)
    assert store.claim_next(pid=os.getpid()) is None
    assert "parent job" in store.get(d.id).error and store.get(d.id).status == "failed"

    e = store.submit({"data": "q"})
    assert store.cancel(e.id).status == "cancelled"
    with pytest.raises(JobError):
        store.cancel(e.id)
    f = store.submit({"data": "r"})
    store.claim_next(pid=999_999_999)  # a pid that does not exist: its worker "died"
    assert f.id in store.recover()  # no worker holds the lock: every 'running' job is stale
    assert store.get(f.id).status == "interrupted"
    store.recover(requeue=True)
    assert store.get(f.id).status == "queued"
    with pytest.raises(JobError):
        store.submit({"nonsense": 1})


def test_demo_queues_one_chain_per_default_arm(quick_home, tmp_path, monkeypatch):
    from app import Studio
    from app.learn_tab import queue_demo
    from llaca.data import demo
    from llaca.train.tuner import StageConfig

    home = tmp_path / "home"
    shutil.copytree(quick_home, home)
    monkeypatch.setenv("LLACA_HOME", str(home))
    studio = Studio(home, start_worker=False)
    jobs = queue_demo(studio)
    n = len(demo.TASKS)
    assert len(jobs) == n * len(demo.DEFAULT_ARMS)
    for a, arm in enumerate(demo.DEFAULT_ARMS):
        chain = jobs[a * n:(a + 1) * n]
        assert chain[0].config["parent"] == "base" and chain[1].parent_job == chain[0].id
        for job in chain:
            config = StageConfig(**job.config)  # what the worker will run
            assert (config.method, config.lr) == (demo.ARMS[arm]["method"], demo.ARMS[arm]["lr"])
            assert config.replay_fraction == demo.ARMS[arm].get("replay_fraction", 0.0)
            assert config.max_steps == demo.STAGE["max_steps"]
            assert (Path(config.data).parent / "test" / "data.json").is_file()
    with pytest.raises(JobError):
        queue_demo(studio)  # not twice while it is queued


def test_launch_requires_auth_beyond_loopback():
    import launch

    assert launch.parse_args([]).host == "127.0.0.1"
    with pytest.raises(SystemExit):
        launch.parse_args(["--host", "0.0.0.0"])
    with pytest.raises(SystemExit):
        launch.parse_args(["--share"])
    assert launch.parse_args(["--host", "0.0.0.0", "--auth", "me:secret"]).auth == "me:secret"


def test_learn_tab_llaca_plus_replay_is_llaca_with_a_replay_share():
    """The Learn tab's "llaca + replay" submits the faithful rule over a stage that mixes in earlier records (the
    StageConfig the CLI's `--method llaca --replay-fraction` builds); plain `replay` keeps its own rule fraction."""
    from app.learn_tab import LLACA_REPLAY, METHODS, stage_config
    from llaca.train.tuner import StageConfig

    assert LLACA_REPLAY in [value for _, value in METHODS]
    mixed = StageConfig(**stage_config("d", LLACA_REPLAY, 0.99, 0.3, None, "", 1, 0, 1e-3, False))
    assert (mixed.method, mixed.replay_fraction, mixed.rule_hparams) == ("llaca", 0.3, {})
    assert mixed.hparams()["replay_fraction"] == 0.3
    plain = StageConfig(**stage_config("d", "replay", 0.99, 0.3, None, "", 1, 0, 1e-3, False))
    assert (plain.method, plain.replay_fraction, plain.rule_hparams) == ("replay", 0.0, {"fraction": 0.3})


def test_learn_tab_defaults_follow_the_parents_base():
    """The Method radio, replay share and the why-note start from the parent base's recipe: tiny llaca + replay,
    small plain replay of 20%; what the tab then submits for small is the stage `learn` runs with no options."""
    from app.learn_tab import LLACA_REPLAY, REGIME_NOTES, stage_config, ui_method
    from llaca.train.recipes import RECIPES, resolve_rule
    from llaca.train.tuner import StageConfig

    assert (ui_method(RECIPES["tiny"]), ui_method(RECIPES["small"])) == (LLACA_REPLAY, "replay")
    assert "`replay`" in REGIME_NOTES["small"] and "`llaca + replay`" in REGIME_NOTES["tiny"]
    small = RECIPES["small"]
    submitted = StageConfig(**stage_config("d", ui_method(small), 0.99, small["replay_fraction"], None, "",
                                           small["epochs"], 0, small["lr"], True))
    method, share, hparams = resolve_rule(small, None, None)
    assert (submitted.method, submitted.replay_fraction, submitted.rule_hparams) == (method, share, hparams)
    # what submit_upload adds for the form's unasked options: the same floor of records `learn` takes
    from llaca.train.recipes import base_stage_options, stage_fields

    options = base_stage_options(small, True, submitted.epochs)
    cli = StageConfig(data="d", **stage_fields(small))
    assert (options["min_records"], options["batch_size"], options["lora_dropout"]) == (
        cli.min_records, cli.batch_size, cli.lora_dropout) == (2000, 2, 0.0)


def test_lineage_matrix_is_square_when_the_base_also_scored_a_build_phase():
    """Base v2's meta scores its alignment test too; the lineage's stages are the sets the newest version was scored
    on, so Avg.ACC / Forgetting show (they were blank for every v2 lineage)."""
    from app.versions_tab import lineage_matrix
    from llaca.evaluation.metrics import cl_metrics

    base = {"align-test": {"accuracy": 56.5}, "base-test": {"accuracy": 42.0}}
    v1 = {"base-test": {"accuracy": 33.0}, "sciqa-test": {"accuracy": 100.0}}
    v2 = {"base-test": {"accuracy": 28.0}, "sciqa-test": {"accuracy": 96.0}, "textvqa-test": {"accuracy": 84.0}}
    tests, matrix = lineage_matrix([base, v1, v2])
    assert tests == ["base-test", "sciqa-test", "textvqa-test"]
    assert matrix == [[42.0, None, None], [33.0, 100.0, None], [28.0, 96.0, 84.0]]
    assert cl_metrics(matrix)["forgetting"] == pytest.approx(((42.0 - 28.0) + (100.0 - 96.0)) / 2)


def test_preload_base_loads_the_chosen_base_and_warms_it(llaca_home, monkeypatch):
    """launch.py's background preload: once the base version exists it is in the model pool (so the first chat
    turn pays no model load), and the base line under the title names the base."""
    from app import Studio

    monkeypatch.setenv("LLACA_BASE", "tiny")
    studio = Studio(llaca_home, start_worker=False)
    assert not studio.models.is_loaded("base")
    studio.preload_base(poll_s=0.1).join(timeout=120)
    assert studio.models.is_loaded("base")
    assert studio.base == "tiny" and "**tiny**" in studio.base_line() and "`base`" in studio.base_line()

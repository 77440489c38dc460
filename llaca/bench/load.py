"""`python -m llaca.bench load`: N concurrent chat sessions against the real app while a stage trains.

Loopback only. Starts `launch.py` on a free port over a throw-away $LLACA_HOME (the shipped base), queues a
stage through the app's own API (validate -> start), waits until the worker trains, then runs `--clients`
gradio_client sessions at once, each asking `--requests` questions about CoIN-mini images. Every request
must be answered; latencies (submit -> full answer, and -> first streamed token) are written as JSON and
Markdown. The app's queue limits are what is measured: 2 concurrent generations (two cores), the rest wait
in Gradio's queue (max 64).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from ..paths import ASSETS_DIR

ROOT = ASSETS_DIR.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(url: str, timeout: float = 180.0):
    from gradio_client import Client

    deadline = time.time() + timeout
    while True:
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.time() > deadline:
                raise
            time.sleep(1.0)


def start_app(home: Path, port: int, log: Path, root: Path = ROOT, **env) -> subprocess.Popen:
    """`launch.py` of the checkout `root` over `home` on a loopback port, in its own process (`env`: extra
    variables)."""
    env = {**os.environ, "LLACA_HOME": str(home), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    return subprocess.Popen([sys.executable, str(Path(root) / "launch.py"), "--port", str(port)], env=env,
                            cwd=root, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def export_ref(ref: str, out: Path) -> Path:
    """The app as it was at git `ref`, exported to `out` (`git archive`; the repository is not touched), so a
    benchmark can serve the old code and the new one in the same run."""
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f"{folder.parent.name}/{f.relative_to(folder)}")
    return out


def last_answer(history: list[dict]) -> str:
    content = history[-1]["content"] if history else ""
    if isinstance(content, list):
        content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
    return str(content)


def one_request(client, image: str, question: str, max_tokens: int) -> dict:
    """One /chat request, streamed: seconds to the first token and to the full answer, the answer, any error."""
    from gradio_client import handle_file

    start = time.perf_counter()
    job = client.submit({"text": question, "files": [handle_file(image)]}, [], None, max_tokens, 0.0, api_name="/chat")
    first = None
    while not job.done():
        outputs = job.outputs()
        if first is None and outputs and last_answer(outputs[-1][0]).strip("… "):
            first = time.perf_counter() - start
        time.sleep(0.02)
    total = time.perf_counter() - start
    try:
        answer = last_answer(job.result()[0])
        error = None if answer.strip() and not answer.startswith("⚠") else f"bad answer {answer!r}"
    except Exception as e:  # noqa: BLE001 - counted, reported
        answer, error = "", f"{type(e).__name__}: {e}"
    return {"first_s": first if first is not None else total, "total_s": total, "answer": answer, "error": error}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--requests", type=int, default=3, help="questions per client, one after another")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--stage-steps", type=int, default=2000, help="long enough to outlast the load")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "load"))
    args = p.parse_args(argv)

    from .. import coin_mini

    work = Path(tempfile.mkdtemp(prefix="llaca-load-"))
    home, port = work / "home", free_port()
    from ..base_build import ensure_base
    from ..versions import Registry

    ensure_base(Registry(home))  # the shipped base (seconds), so the stage can start at once
    server = start_app(home, port, work / "server.log")
    try:
        coin_mini.write_task(work / "coin", "vizwiz", n_train=300, n_test=20, seed=0)
        images = []
        rng = random.Random(0)
        for k in range(12):  # questions with known kinds (colour / shape / reading)
            task = coin_mini.get_task(rng.choice(["colour_qa", "shape_qa", "textvqa", "gqa"]))
            image, question, _ = task.sample(rng)
            path = work / f"q{k}.png"
            image.save(path)
            images.append((str(path), question))
        client = connect(f"http://127.0.0.1:{port}/")
        from gradio_client import handle_file

        train_zip = zip_folder(work / "coin" / "vizwiz" / "train", work / "vizwiz.zip")
        report, _, data_path = client.predict([handle_file(str(train_zip))], None, api_name="/validate")
        assert data_path, report
        message, _ = client.predict(data_path, "llaca", 0.99, 0.2, "base", "load-stage", 1, args.stage_steps, 1e-3,
                                    False, api_name="/start_stage")
        if not message.startswith("Queued"):
            raise RuntimeError(f"the stage was not queued: {message}")
        from ..jobs import JobStore

        store = JobStore(home)
        deadline = time.time() + 300
        while not any(j.status == "running" and store.events(j.id) for j in store.list()):
            if time.time() > deadline:
                raise RuntimeError(f"the stage did not start: {message}")
            time.sleep(1.0)
        job = next(j for j in store.list() if j.status == "running")
        step_before = max((e.get("step", 0) for e in store.events(job.id)), default=0)

        results: list[dict] = []
        lock = threading.Lock()

        def session(k: int):
            c = connect(f"http://127.0.0.1:{port}/")
            for r in range(args.requests):
                image, question = images[(k + r) % len(images)]
                out = one_request(c, image, question, args.max_tokens)
                with lock:
                    results.append({"client": k, **out})

        t0 = time.perf_counter()
        threads = [threading.Thread(target=session, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        job = store.get(job.id)
        step_after = max((e.get("step", 0) for e in store.events(job.id)), default=0)
        still_training = job.status == "running"
        store.cancel(job.id)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    ok = [r for r in results if r["error"] is None]
    totals, firsts = [r["total_s"] for r in results], [r["first_s"] for r in results]
    summary = {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "requests": len(results), "answered": len(ok), "errors": [r["error"] for r in results if r["error"]],
        "wall_s": round(wall, 1), "throughput_rps": round(len(results) / wall, 2),
        "latency_s": {"p50": round(statistics.median(totals), 2), "p95": round(pct(totals, 95), 2),
                      "max": round(max(totals), 2)},
        "first_token_s": {"p50": round(statistics.median(firsts), 2), "p95": round(pct(firsts, 95), 2)},
        "stage_steps_during_load": step_after - step_before, "stage_still_training_at_end": still_training,
        "queue": {"generate_concurrency": 2, "max_queue": 64}, "machine": f"{os.cpu_count()} CPUs",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps({**summary, "results": results}, indent=1))
    md = (f"{args.clients} concurrent chat clients x {args.requests} requests ({args.max_tokens} new tokens max) "
          f"while a `llaca` stage trains in the worker ({summary['machine']}, loopback):\n\n"
          f"| requests | answered | p50 full answer | p95 full answer | max | p50 first token | p95 first token | "
          f"stage steps meanwhile |\n|---|---|---|---|---|---|---|---|\n"
          f"| {len(results)} | {len(ok)} | {summary['latency_s']['p50']} s | {summary['latency_s']['p95']} s | "
          f"{summary['latency_s']['max']} s | {summary['first_token_s']['p50']} s | {summary['first_token_s']['p95']} s | "
          f"{summary['stage_steps_during_load']} |\n")
    (out / "load.md").write_text(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

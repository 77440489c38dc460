"""`python -m llaca.bench load`: N concurrent chat sessions against the real app while a stage trains.

Loopback only. Starts `launch.py` on a free port over a throw-away $LLACA_HOME (the shipped base), queues a
stage through the app's own API (validate -> start), waits until the worker trains (`--no-stage`: no stage), then
runs `--clients` gradio_client sessions at once (threads of this process, not the app's), each asking `--requests`
questions about CoIN-mini images. Every request must be answered; latencies (submit -> full answer, and -> first
streamed token), throughput, the stage's steps meanwhile and the CPU time of the clients, the app and its worker
are written as JSON and Markdown (`--name`). `--before REF` serves the app as it was at git REF instead (exported
with `git archive`), to measure old and new code the same way on the same machine.
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
from concurrent import futures
from pathlib import Path

from ..paths import ASSETS_DIR

ROOT = ASSETS_DIR.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(url: str, timeout: float = 180.0, ssl_verify: bool | None = None):
    """A `gradio_client.Client`, waiting for the server to come up.

    `ssl_verify` defaults to False for plain-http URLs: gradio_client makes each upload / join / stream call with a
    new httpx client, and with verification on each one loads the CA bundle into a new TLS context (~20 ms of CPU
    quiet, 160 ms on the loaded machine) for a connection that has no TLS at all. A browser pays nothing like it."""
    from gradio_client import Client

    if ssl_verify is None:
        ssl_verify = not url.startswith("http://")
    deadline = time.time() + timeout
    while True:
        try:
            return Client(url, verbose=False, ssl_verify=ssl_verify)
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


def stop_app(server: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (the app's clean shutdown), then SIGKILL if it has not exited within `timeout`."""
    server.terminate()
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


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
        futures.wait([job.future], timeout=0.005)  # returns at once when the answer is complete
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (0 once it is gone)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_clients(port: int, images: list, clients: int, requests: int, max_tokens: int, server_pid: int,
                store=None, job=None) -> dict:
    """`clients` sessions at once, `requests` questions each: latencies, throughput, CPU, stage steps meanwhile."""
    results: list[dict] = []
    lock = threading.Lock()
    sessions = [connect(f"http://127.0.0.1:{port}/") for _ in range(clients)]

    def session(k: int):
        for r in range(requests):
            image, question = images[(k + r) % len(images)]
            out = one_request(sessions[k], image, question, max_tokens)
            with lock:
                results.append({"client": k, **out})

    steps = lambda: max((e.get("step", 0) for e in store.events(job.id)), default=0)  # noqa: E731
    step_before = steps() if job is not None else None
    cpu_app0, cpu_clients0, load0 = cpu_seconds(server_pid), time.process_time(), os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=session, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu_app, cpu_clients = cpu_seconds(server_pid) - cpu_app0, time.process_time() - cpu_clients0
    ok = [r for r in results if r["error"] is None]
    totals, firsts = [r["total_s"] for r in results], [r["first_s"] for r in results]
    return {
        "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
        "stage_training": job is not None,
        "requests": len(results), "answered": len(ok), "errors": [r["error"] for r in results if r["error"]],
        "wall_s": round(wall, 2), "throughput_rps": round(len(results) / wall, 2),
        "latency_s": {"p50": round(statistics.median(totals), 3), "p95": round(pct(totals, 95), 3),
                      "max": round(max(totals), 3)},
        "first_token_s": {"p50": round(statistics.median(firsts), 3), "p95": round(pct(firsts, 95), 3)},
        "stage_steps_during_load": None if job is None else steps() - step_before,
        "cpu_s": {"clients_process": round(cpu_clients, 1), "app_and_worker": round(cpu_app, 1)},
        "load_avg": [round(load0, 1), round(os.getloadavg()[0], 1)],
        "when_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="20", help="client counts, run one after the other (e.g. 1,20)")
    p.add_argument("--requests", type=int, default=3, help="questions per client, one after another")
    p.add_argument("--requests-alone", type=int, default=12, help="questions of a single client (--clients 1)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--stage", choices=["yes", "no", "both"], default="yes",
                   help="run the clients while a stage trains, without one, or both (without first)")
    p.add_argument("--stage-steps", type=int, default=2000, help="long enough to outlast the load")
    p.add_argument("--stage-wait", type=int, default=900, help="seconds to wait for the stage's first step")
    p.add_argument("--before", default=None, metavar="REF", help="serve the app as it was at git REF")
    p.add_argument("--name", default="load", help="file names of the results (NAME.json, NAME.md)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "load"))
    args = p.parse_args(argv)
    counts = [int(c) for c in str(args.clients).split(",")]
    per_client = lambda n: args.requests_alone if n == 1 else args.requests  # noqa: E731 - a median needs samples

    from ..data import coin_mini

    work = Path(tempfile.mkdtemp(prefix="llaca-load-"))
    home, port = work / "home", free_port()
    from ..bases.install import ensure_base
    from ..versions import Registry

    ensure_base(Registry(home), base="tiny")  # the shipped base (seconds), so the stage can start at once
    root = export_ref(args.before, work / "before") if args.before else ROOT
    server = start_app(home, port, work / "server.log", root=root)
    runs: list[dict] = []
    problem = None
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

        from ..jobs import JobStore

        store = JobStore(home)
        one_request(client, *images[0], args.max_tokens)  # the model loads on the first question: not measured
        if args.stage in ("no", "both"):
            runs += [run_clients(port, images, n, per_client(n), args.max_tokens, server.pid) for n in counts]
        if args.stage in ("yes", "both"):
            train_zip = zip_folder(work / "coin" / "vizwiz" / "train", work / "vizwiz.zip")
            report, _, data_path = client.predict([handle_file(str(train_zip))], None, api_name="/validate")
            assert data_path, report
            message, _ = client.predict(data_path, "llaca", 0.99, 0.2, "base", "load-stage", 1, args.stage_steps,
                                        1e-3, False, api_name="/start_stage")
            if not message.startswith("Queued"):
                raise RuntimeError(f"the stage was not queued: {message}")
            deadline = time.time() + args.stage_wait
            while not any(j.status == "running" and store.events(j.id) for j in store.list()):
                if time.time() > deadline:  # the worker runs at nice 10: on a busy machine it may not get a turn
                    problem = f"the stage made no step within {args.stage_wait} s of being queued"
                    break
                time.sleep(1.0)
            job = next((j for j in store.list() if j.status == "running" and store.events(j.id)), None)
            for n in counts if job is not None else []:
                runs.append(run_clients(port, images, n, per_client(n), args.max_tokens, server.pid, store, job))
                runs[-1]["stage_still_training_at_end"] = store.get(job.id).status == "running"
            if job is not None:
                store.cancel(job.id)
    finally:
        stop_app(server)

    app = f"git {args.before}" if args.before else "this checkout"
    for run in runs:
        run["app"] = app
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"app": app, "machine": f"{os.cpu_count()} CPUs", "runs": runs,
                                                       "problem": problem}, indent=1))
    md = (f"Chat clients x requests ({args.max_tokens} new tokens max, one image each); app: {app}; "
          f"{os.cpu_count()} CPUs shared with other users (load average at start -> end of each run in the last "
          f"column):\n\n" + table_header() + "".join(table_row(r) for r in runs) + "\n"
          + (f"**{problem}**: no run with a training stage.\n" if problem else ""))
    (out / f"{args.name}.md").write_text(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not problem and all(r["answered"] == r["requests"] for r in runs) else 1


def table_header() -> str:
    return ("| app | clients | stage | answered | answers/s | p50 full | p95 full | p50 first token | p95 first token "
            "| stage steps meanwhile | CPU s: clients / app+worker | load avg |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def table_row(s: dict) -> str:
    stage = "trains" if s["stage_training"] else "none"
    return (f"| {s['app']} | {s['clients']} x {s['requests_per_client']} | {stage} | {s['answered']}/{s['requests']} "
            f"| {s['throughput_rps']} | {s['latency_s']['p50']} s | {s['latency_s']['p95']} s "
            f"| {s['first_token_s']['p50']} s | {s['first_token_s']['p95']} s "
            f"| {s['stage_steps_during_load'] if s['stage_training'] else '-'} "
            f"| {s['cpu_s']['clients_process']} / {s['cpu_s']['app_and_worker']} "
            f"| {s['load_avg'][0]} -> {s['load_avg'][1]} |\n")


if __name__ == "__main__":
    raise SystemExit(main())

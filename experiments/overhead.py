"""`python -m experiments.overhead`: where the time of one chat answer goes, old path vs new, in one run.

It serves the app twice over one throw-away $LLACA_HOME holding the shipped base: as it was at git `--before`
(exported with `git archive`; default: the commit before issue 15's work: one `generate` per answer, one UI update
per token) and as it is in this checkout. Each is the real app (`launch.py`, its own process,
`GRADIO_PROFILING=1`), asked `--requests` questions one after another from one `gradio_client` session, each with
an image upload, as a new user would. Per request it records:

- from the client: the upload round trip (a separate POST of the same image), the first streamed token and the
  full answer (the load benchmark's `one_request`), the client process's CPU time;
- from Gradio's own profiler (`/gradio_api/profiling/traces`): queue wait, preprocessing, time inside our
  function, postprocessing (the Chatbot payload), streaming diffs, number of updates sent;
- in this process, on the same version and image: what the library does inside the function (image decode,
  model-pool lookup, prompt + image processing, a bare `generate`), and the Chatbot payload per update.

Both run in the same invocation, alternating, so the shared machine's load is about the same for both (reported).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from llaca.bench.load import ROOT, connect, export_ref, free_port, one_request, start_app, stop_app

BEFORE_REF = "2dea9e2"  # the branch point of issue 15 (chat: one generate per answer, one update per token)

PHASES = [("queue_wait_ms", "Gradio queue wait"), ("preprocess_ms", "Gradio preprocess (textbox + Chatbot in)"),
          ("fn_call_ms", "inside the chat function (all updates)"), ("postprocess_ms", "Gradio postprocess (Chatbot out)"),
          ("streaming_diff_ms", "streaming diffs"), ("total_ms", "Gradio total (server side)")]


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def _library_costs(home: Path, image_path: str, question: str, max_tokens: int, reps: int) -> dict:
    """Milliseconds of each library step of one answer, measured here on the same version and image."""
    import torch
    from gradio import utils as gr_utils
    from gradio.components import Chatbot

    from llaca.data import load_image
    from llaca.serve.chat import _generation_kwargs, _prepare
    from llaca.serve.serving import ModelPool
    from llaca.versions import Registry

    registry = Registry(home)
    pool = ModelPool(registry)
    with pool.use("base"):
        pass

    def timed(fn) -> float:
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t))
        return median(out)

    def lookup():
        registry.list()  # the chat function listed the versions (disk) before every answer
        with pool.use("base"):
            pass

    image = load_image(image_path)
    lookup_ms = timed(lookup)
    with pool.use("base") as (model, processor):
        inputs = _prepare(processor, image, [], question)
        kwargs = _generation_kwargs(processor, max_tokens, 0.0)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        n_new = out.shape[1] - inputs["input_ids"].shape[1]
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        costs = {
            "image_decode_ms": timed(lambda: load_image(image_path)),
            "pool_lookup_ms": lookup_ms,
            "prepare_ms": timed(lambda: _prepare(processor, image, [], question)),
            "generate_ms": timed(lambda: model.generate(**inputs, **kwargs)),
            "new_tokens": int(n_new),
        }
    # The Chatbot payload of one update: the whole history serialized, vs the diff Gradio sends after the first.
    user = {"role": "user", "content": [{"type": "file", "file": {"path": image_path, "mime_type": "image/png"}},
                                        {"type": "text", "text": question}]}
    bot = Chatbot()

    def payload(text):
        return bot.postprocess([user, {"role": "assistant", "content": [{"type": "text", "text": text}]}]).model_dump()

    half, full = payload(answer[: len(answer) // 2]), payload(answer)
    costs["chatbot_postprocess_ms"] = timed(lambda: payload(answer))
    costs["payload_full_bytes"] = len(json.dumps(full))
    costs["payload_diff_bytes"] = len(json.dumps(gr_utils.diff(half, full)))
    return costs


def _profile_app(mode: str, root: Path, home: Path, work: Path, images: list[tuple[str, str]], requests: int,
                 max_tokens: int) -> dict:
    """Run `requests` sequential chat requests against the app of checkout `root`."""
    import httpx

    port = free_port()
    server = start_app(home, port, work / f"server-{mode}.log", root=root, GRADIO_PROFILING="1")
    url = f"http://127.0.0.1:{port}/"
    try:
        clients = {"default": connect(url, ssl_verify=True), "no_tls_ctx": connect(url)}  # see load.connect
        for image, question in images[:2]:  # warm-up: model load, first-call costs
            one_request(clients["no_tls_ctx"], image, question, max_tokens)
        httpx.post(url + "gradio_api/profiling/clear", verify=False)
        rows = []
        for k in range(requests):  # the two client settings alternate, so both see the same machine
            image, question = images[k % len(images)]
            kind = "default" if k % 2 == 0 else "no_tls_ctx"
            t = time.perf_counter()
            with open(image, "rb") as f:
                httpx.post(url + "gradio_api/upload", files={"files": (Path(image).name, f, "image/png")}, verify=False)
            upload_ms = 1000 * (time.perf_counter() - t)
            cpu0 = time.process_time()
            row = one_request(clients[kind], image, question, max_tokens)
            rows.append({**row, "kind": kind, "upload_roundtrip_ms": upload_ms, "cpu_ms": 1000 * (time.process_time() - cpu0)})
        traces = httpx.get(url + "gradio_api/profiling/traces", verify=False).json()
        upload_summary = httpx.get(url + "gradio_api/profiling/summary", verify=False).json().get("upload", {})
    finally:
        stop_app(server)
    chat = [t for t in traces if t.get("fn_name") not in ("gradio_file_upload",) and t.get("n_iterations", 0) > 1]
    errors = [r["error"] for r in rows if r["error"]]
    client = {}
    for kind in ("default", "no_tls_ctx"):
        mine = [r for r in rows if r["kind"] == kind]
        client.update({f"client_full_ms_{kind}": 1000 * median(r["total_s"] for r in mine),
                       f"client_first_ms_{kind}": 1000 * median(r["first_s"] for r in mine),
                       f"client_cpu_ms_{kind}": median(r["cpu_ms"] for r in mine)})
    return {
        "mode": mode, "requests": len(rows), "errors": errors, **client,
        "upload_roundtrip_ms": median(r["upload_roundtrip_ms"] for r in rows),
        "upload_server_ms": upload_summary.get("p50", float("nan")),
        "updates": median(t["n_iterations"] for t in chat),
        **{key: median(t[key] for t in chat) for key, _ in PHASES},
        "answers": sorted({r["answer"] for r in rows}),
    }


def _table(results: list[dict], lib: dict) -> str:
    modes = [r["mode"] for r in results]
    head = "| step (median ms per answer) | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes) + "\n"
    rows = [("client: upload round trip (POST /upload)", "upload_roundtrip_ms"),
            ("server: upload handling", "upload_server_ms")]
    rows += [(label, key) for key, label in PHASES]
    rows += [("UI updates sent per answer (count)", "updates")]
    for kind, label in (("default", "gradio_client default"), ("no_tls_ctx", "gradio_client, ssl_verify=False")):
        rows += [(f"**first token** ({label})", f"client_first_ms_{kind}"),
                 (f"**full answer** ({label})", f"client_full_ms_{kind}"),
                 (f"client process CPU per answer ({label})", f"client_cpu_ms_{kind}")]
    body = "".join(f"| {label} | " + " | ".join(f"{r[key]:.1f}" if key != "updates" else f"{r[key]:.0f}"
                                                 for r in results) + " |\n" for label, key in rows)
    libt = (f"\nInside the chat function, measured in-process on the same version and image "
            f"({lib['new_tokens']} new tokens):\n\n| library step | ms |\n|---|---|\n"
            f"| image decode (`load_image`) | {lib['image_decode_ms']:.2f} |\n"
            f"| version list + model-pool lookup (old hot path) | {lib['pool_lookup_ms']:.2f} |\n"
            f"| prompt + image processing (`processor`) | {lib['prepare_ms']:.2f} |\n"
            f"| bare `model.generate` | {lib['generate_ms']:.1f} |\n"
            f"| Chatbot postprocess of one update | {lib['chatbot_postprocess_ms']:.2f} |\n"
            f"| Chatbot payload: whole history / diff after the first update (bytes) | "
            f"{lib['payload_full_bytes']} / {lib['payload_diff_bytes']} |\n")
    return head + body + libt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=15)
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--before", default=BEFORE_REF, help="git ref of the old app ('' to profile this checkout only)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "load"))
    args = p.parse_args(argv)

    import random

    from llaca.bases.install import ensure_base
    from llaca.data import coin_mini
    from llaca.versions import Registry

    work = Path(tempfile.mkdtemp(prefix="llaca-overhead-"))
    home = work / "home"
    ensure_base(Registry(home), base="tiny")
    rng = random.Random(0)
    images = []
    for k in range(6):
        task = coin_mini.get_task(rng.choice(["colour_qa", "shape_qa", "textvqa", "gqa"]))
        image, question, _ = task.sample(rng)
        path = work / f"q{k}.png"
        image.save(path)
        images.append((str(path), question))
    load0 = os.getloadavg()[0]
    t0 = time.time()
    try:
        apps = [("now", ROOT)]
        if args.before:
            apps.insert(0, (f"before ({args.before})", export_ref(args.before, work / "before")))
        results = [_profile_app(mode, root, home, work, images, args.requests, args.max_tokens) for mode, root in apps]
        lib = _library_costs(home, *images[0], args.max_tokens, reps=20)
    finally:
        load1 = os.getloadavg()[0]
        shutil.rmtree(work, ignore_errors=True)
    note = (f"One `gradio_client` session, {args.requests} sequential questions with an image upload each, "
            f"{args.max_tokens} new tokens max; both paths in one run ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} "
            f"UTC, {time.time() - t0:.0f} s, {os.cpu_count()} CPUs shared with other users: load average "
            f"{load0:.1f} at start, {load1:.1f} at end).\n\n")
    md = note + _table(results, lib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"results": results, "library": lib, "load_avg": [load0, load1],
                                                   "args": vars(args)}, indent=1))
    (out / "overhead.md").write_text(md)
    print(md)
    return 0 if not any(r["errors"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

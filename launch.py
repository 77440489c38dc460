"""Start LLaCA Studio: `python launch.py` serves http://127.0.0.1:7860 with the embedded default model, offline.

On a fresh machine the base model does not exist yet: it is queued as the first job (built in the background
worker, a few minutes on 2 cores); the UI comes up at once and shows the build's progress, and so does this
terminal. Versions, jobs and uploads live in `$LLACA_HOME` (default ~/.llaca), or `--home`.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LLaCA Studio web UI")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="login required to use the app (required with a non-loopback --host or --share)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--home", default=None, help="data folder (default: $LLACA_HOME or ~/.llaca)")
    p.add_argument("--base", choices=("small", "tiny"), default=None,
                   help="the embedded base chat starts on: small (default; pretrained EfficientNet-Lite + "
                        "SmolLM2-135M-Instruct) or tiny (3M, trained from nothing). Same as $LLACA_BASE")
    args = p.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not all(args.auth.split(":", 1))):
        p.error("--auth must look like user:password")
    if (args.share or not is_loopback(args.host)) and not args.auth:
        p.error(f"--auth user:password is required when serving beyond this machine (--host {args.host}"
                f"{', --share' if args.share else ''})")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def follow_base_build(studio, job) -> None:
    """Mirror the base build's progress in the terminal (tqdm), from the job's progress file."""
    from tqdm.auto import tqdm

    bar, phase, seen = None, None, 0
    while True:
        events = studio.jobs.events(job.id)
        for event in events[seen:]:
            if event.get("type") != "step":
                continue
            if event.get("phase", "stage") != phase:
                if bar is not None:
                    bar.close()
                phase = event.get("phase", "stage")
                title = "base: vision pre-training" if phase == "vision" else "base: language model + projector"
                bar = tqdm(total=event["total_steps"], desc=title, unit="step", file=sys.stderr)
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.3f}")
        seen = len(events)
        status = studio.jobs.get(job.id).status
        if status not in ("queued", "running"):
            if bar is not None:
                bar.close()
            done = studio.jobs.get(job.id)
            print(f"base model: {status}" + (f" ({done.error})" if done.error else ""), file=sys.stderr)
            return
        time.sleep(1.0)


def _stop_on_sigterm(*_):
    raise KeyboardInterrupt  # run the same clean shutdown as Ctrl+C (the worker checkpoints its stage)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.home:
        os.environ["LLACA_HOME"] = os.path.abspath(args.home)
    if args.base:  # the worker process inherits it
        os.environ["LLACA_BASE"] = args.base
    from app import Studio
    from app.main import QUEUE, build_app, launch_options

    studio = Studio()
    job = studio.ensure_base_job()
    if job is not None:
        print(f"No base model in {studio.home} yet: building it in the background (job #{job.id}, a few minutes). "
              "The UI opens now and shows the progress.", file=sys.stderr)
        threading.Thread(target=follow_base_build, args=(studio, job), daemon=True).start()
    studio.preload_base()
    demo = build_app(studio)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        demo.queue(**QUEUE).launch(**launch_options(studio, server_name=args.host, server_port=args.port, auth=auth,
                                                    share=args.share))
    except KeyboardInterrupt:
        pass
    finally:
        studio.close()  # the running stage checkpoints and is re-queued on the next start
    return 0


if __name__ == "__main__":
    sys.exit(main())

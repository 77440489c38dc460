"""`python -m experiments.small_features --home DIR`: grouped learning and blind votes on the default base, `small`.

Issue 25 asks for one run of each product feature on `small`, with its figures (the corrections run is
`python -m llaca.bench corrections --base small`). `DIR` is a $LLACA_HOME holding `small`; results are cached per
section in `<out>/<section>.json`, so an interrupted run resumes.

- grouped: two CoIN-mini sets with different instructions (`imagenet`, `gqa`; the first 160 train and 50 test records
  of each) learned one after the other with `python -m llaca learn DATA --grouped` from `small` (the CLI path, the
  base's recipe). Figures: the decision per stage (similarity, new group or continue), each member's test accuracy
  and the base test after it, and the routing of the 100 test questions (share sent to the group of their own set).
- blind: the app on `DIR` (`launch.py`), and a `gradio_client` session that asks `--blind-n` blind questions (the
  grouped sets' test records) of `small` against the last grouped member. The voter is the gold answer: the right
  answer wins, two right answers tie, two wrong ones are "both bad". Figures: the outcomes, the leaderboard the app
  shows afterwards, and the seconds per blind ask (two versions answering).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from llaca.paths import atomic_write_json

SETS = ("imagenet", "gqa")
N_TRAIN, N_TEST = 160, 50


def write_sets(home: Path) -> dict[str, Path]:
    """The two sets as `<set>/train` + `<set>/test` (the tuner tests a `train` folder on its sibling `test`)."""
    from llaca.data import coin_mini, load_instruction_set, write_instruction_set

    source = home / "datasets" / "coin-mini-features-source"
    if not all((source / s / "test" / "data.json").is_file() for s in SETS):
        coin_mini.write_coin_mini(source, n_train=N_TRAIN, n_test=N_TEST, tasks=list(SETS))
    out = {}
    for name in SETS:
        root = home / "datasets" / "features" / name
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            if not (root / split / "data.json").is_file():
                records = load_instruction_set(source / name / split).records[:n]
                write_instruction_set(root / split, records)
        out[name] = root
    return out


def grouped(home: Path) -> dict:
    from llaca.cli import main as cli
    from llaca.train.grouping import route_question
    from llaca.versions import Registry

    os.environ["LLACA_HOME"] = str(home)
    sets = write_sets(home)
    stages = []
    for name, root in sets.items():
        t0 = time.time()
        if cli(["learn", str(root / "train"), "--grouped", "--from", "small" if not stages else stages[-1]["version"],
                "--name", f"grouped-{name}"]) != 0:
            raise RuntimeError(f"learn --grouped {name} failed")
        registry = Registry(home)
        version = registry.get(f"grouped-{name}")
        g = version.meta["grouped"]
        stages.append({"set": name, "version": version.id, "seconds": round(time.time() - t0, 1),
                       "decision": g["decision"], "group": g["group"], "groups": g["groups"],
                       "test": version.meta.get("metrics", {}).get("test", {}), "steps": version.meta["steps"],
                       "hparams": version.meta["hparams"]})
    registry, last = Registry(home), stages[-1]["version"]
    from llaca.data import load_instruction_set

    routed = {}
    for k, (name, root) in enumerate(sets.items()):
        questions = [r.question for r in load_instruction_set(root / "test").records]
        routes = [route_question(registry, last, q) for q in questions]
        routed[name] = round(100 * sum(r.group == k for r in routes) / len(routes), 1)
    return {"stages": stages, "routed_to_own_group": routed, "last": last}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blind(home: Path, versions: list[str], n: int) -> dict:
    from gradio_client import Client, handle_file

    from llaca.data import load_instruction_set
    from llaca.evaluation.metrics import is_correct

    records = [r for name in SETS for r in load_instruction_set(home / "datasets" / "features" / name / "test").records]
    records = records[::max(1, len(records) // n)][:n]
    port = _free_port()
    app = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), "--home", str(home)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        for _ in range(240):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(1)
        if client is None:
            raise RuntimeError("the app did not come up in 4 minutes")
        votes, seconds = [], []
        for r in records:
            t0 = time.time()
            a_text, b_text, _ = client.predict(versions, "pool", handle_file(str(r.image)), r.question,
                                               api_name="/blind_ask")
            seconds.append(time.time() - t0)
            right = (is_correct(a_text, r.answer), is_correct(b_text, r.answer))
            outcome = {(True, False): "a", (False, True): "b", (True, True): "tie"}.get(right, "bothbad")
            reveal = client.predict(outcome, api_name="/blind_vote")
            votes.append({"question": r.question.splitlines()[0], "gold": r.answer, "a": a_text.strip(),
                          "b": b_text.strip(), "outcome": outcome, "reveal": reveal})
        summary, board = client.predict(api_name="/leaderboard")
        return {"versions": versions, "n": len(votes), "votes": votes, "leaderboard_summary": summary,
                "leaderboard": board["data"], "headers": board["headers"],
                "seconds_per_ask": {"median": round(sorted(seconds)[len(seconds) // 2], 2),
                                    "max": round(max(seconds), 2)}}
    finally:
        app.terminate()
        app.wait(timeout=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.small_features", description=__doc__.split("\n")[0])
    p.add_argument("--home", required=True, help="a $LLACA_HOME holding `small`")
    p.add_argument("--out", default="bench_results/small_features")
    p.add_argument("--sections", nargs="*", default=["grouped", "blind"], choices=("grouped", "blind"))
    p.add_argument("--blind-n", type=int, default=12)
    a = p.parse_args(argv)
    home, out = Path(a.home).resolve(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for section in a.sections:
        cache = out / f"{section}.json"
        if cache.is_file():
            continue
        t0 = time.time()
        if section == "grouped":
            res = grouped(home)
        else:
            last = json.loads((out / "grouped.json").read_text())["last"]
            res = blind(home, ["small", last], a.blind_n)
        res.update(measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(time.time() - t0, 1),
                   load_avg_end=os.getloadavg()[0])
        atomic_write_json(cache, res)
        print(json.dumps({section: {k: v for k, v in res.items() if k not in ("votes", "leaderboard")}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

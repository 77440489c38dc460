"""The regime map's report: from the runs of `regimes.py` to results.json, table.md and the figures
(`regimes_plots.py`). Nothing here trains or evaluates; every number is read from a run.

Per regime and method: Avg.ACC / Forgetting (mean +- sample std over seeds, `quality.summarize`). Per regime:
llaca's gain over `seq` (Avg.ACC difference, Forgetting reduction = seq's Forgetting - llaca's), the same for
`llaca+replay` and the fixed EMA, how many of the issue's two targets llaca meets (Forgetting <= seq / 2,
Avg.ACC >= seq + 10), the connectivity probe (seq's old-task accuracy along the line between consecutive stages,
mean over stages; `joint` = max over lambda of min(old, new): the best the line offers on both tasks at once), and
llaca's alpha per tensor with its per-element EMA movement (first seed), extrapolated to the paper's tensor size.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from llaca.bench import quality as Q
from llaca.train.rules.llaca import PAPER_LORA_NUMEL

LABEL = {"ema0.99": "fixed EMA ema0.99 (what the released scripts likely ran)"}


def _mean(summary: dict, method: str, metric: str):
    s = (summary.get(method) or {}).get(metric)
    return None if s is None else s["mean"]


def _gain(summary: dict, method: str) -> dict | None:
    a, f = _mean(summary, method, "avg_acc"), _mean(summary, method, "forgetting")
    sa, sf = _mean(summary, "seq", "avg_acc"), _mean(summary, "seq", "forgetting")
    if None in (a, f, sa, sf):
        return None
    return {"avg_acc": round(a - sa, 2), "forgetting_reduction": round(sf - f, 2)}


def _targets(summary: dict) -> dict | None:
    a, f = _mean(summary, "llaca", "avg_acc"), _mean(summary, "llaca", "forgetting")
    sa, sf = _mean(summary, "seq", "avg_acc"), _mean(summary, "seq", "forgetting")
    if None in (a, f, sa, sf):
        return None
    return {"forgetting <= seq / 2": f <= sf / 2, "avg_acc >= seq + 10": a >= sa + 10}


def _probe(seq_runs: list[dict]) -> dict | None:
    """Mean over stages (and seeds) of seq's accuracy on the old / new task along the line; `joint` per transition."""
    trans = [t for r in seq_runs for t in r.get("probe") or []]
    if not trans:
        return None
    lambdas = trans[0]["lambdas"]
    mean_at = lambda key: [round(statistics.fmean(t[key][k] for t in trans), 2) for k in range(len(lambdas))]  # noqa: E731
    joint = [max(min(o, n) for o, n in zip(t["old"], t["new"])) for t in trans]
    interior = [max(min(o, n) for o, n in zip(t["old"][1:-1], t["new"][1:-1])) for t in trans]
    return {"lambdas": lambdas, "old": mean_at("old"), "new": mean_at("new"),
            "joint": round(statistics.fmean(joint), 2), "joint_interior": round(statistics.fmean(interior), 2),
            "transitions": [{k: t[k] for k in ("from_stage", "old", "new")} for t in trans[:len(trans) // len(seq_runs)]]}


def _alpha(llaca_runs: list[dict]) -> list[dict]:
    """llaca's per-tensor alpha and EMA movement (first seed), plus what a tensor of the paper's size would see with
    the same per-element statistics: a, b, c are L1 sums over N elements, so alpha and the per-element movement both
    scale as 1 / N (x N / PAPER_LORA_NUMEL). Extrapolated only for matrices (>= 1000 elements) on the fallback less
    than half of their steps."""
    if not llaca_runs:
        return []
    out = []
    for t in llaca_runs[0].get("tensors") or []:
        n = t.get("numel")
        row = {k: t.get(k) for k in ("name", "numel", "fallback_frac", "alpha_median", "alpha_all_median",
                                     "move_median", "kept")}
        # Only matrices whose alpha is mostly the equation's (the fallback is a constant: it does not scale with N).
        scalable = n and n >= 1000 and (t.get("fallback_frac") or 0) < 0.5
        f = n / PAPER_LORA_NUMEL if scalable else None
        row["alpha_paper"] = None if not f or t.get("alpha_median") is None else Q._sig(t["alpha_median"] * f)
        row["move_paper"] = None if not f or t.get("move_median") is None else Q._sig(t["move_median"] * f)
        out.append(row)
    return out


def build(planned: list[dict], runs: list[dict], size: dict, confirm: bool, wall_s: float,
          estimate_s: float | None) -> dict:
    regimes = []
    for p in planned:
        r = p["regime"]
        mine = [x for x in runs if x["regime"] == r["name"]]
        summary = Q.summarize(mine) if mine else {}
        targets = _targets(summary)
        regimes.append({
            "name": r["name"], "base": r["base_label"], "base_id": r["base_id"], "model": r["model"], "lr": r["lr"],
            "methods": {m: {k: summary[m][k] for k in ("avg_acc", "new_acc", "forgetting", "bwt", "wall_s")}
                        for m in summary},
            "llaca_gain": _gain(summary, "llaca"), "replay_gain": _gain(summary, "llaca+replay"),
            "ema_gain": _gain(summary, "ema0.99"),
            "targets": targets, "targets_met": sum(targets.values()) if targets else 0,
            "probe": _probe([x for x in mine if x["method"] == "seq"]),
            "alpha": _alpha([x for x in mine if x["method"] == "llaca"]),
            "runs_done": len(mine), "runs_planned": len(p["jobs"]),
        })
    cfg0 = planned[0]["cfg"]
    ranked = sorted([g for g in regimes if g["llaca_gain"]],
                    key=lambda g: (-g["targets_met"], -g["llaca_gain"]["avg_acc"]))
    return {
        "mode": "confirm" if confirm else "screening",
        "config": {"tasks": cfg0["tasks"], "steps": cfg0["steps"], "test_n": cfg0["test_n"], "seeds": cfg0["seeds"],
                   "batch_size": cfg0["batch_size"], "methods": cfg0["methods"],
                   "regimes": [p["regime"]["name"] for p in planned], "paper_lora_numel": PAPER_LORA_NUMEL},
        "machine": f"{os.cpu_count()} CPUs (shared), 1 job x 1 torch thread",
        "wall_s": round(wall_s, 1), "estimate_s": None if estimate_s is None else round(estimate_s, 1),
        "process_s": round(sum(x.get("wall_s", 0) for x in runs), 1),
        "best": [g["name"] for g in ranked[:2]],
        "regimes": regimes,
        "runs": [{k: x[k] for k in ("regime", "method", "seed", "A", "metrics", "base_final", "wall_s")} for x in runs],
    }


def _cell(reg: dict, method: str) -> str:
    m = reg["methods"].get(method)
    if not m:
        return "n/a"
    return f"{Q._fmt(m['avg_acc'])} / {Q._fmt(m['forgetting'])}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"Regime map ({results['mode']}): CoIN-mini, {len(cfg['tasks'])} tasks ({', '.join(cfg['tasks'])}), "
        f"{cfg['steps']} steps/stage, batch {cfg['batch_size']}, seeds {cfg['seeds']}, {cfg['test_n']} test "
        "records/task. Cells: Avg.ACC / Forgetting (%). Gain = llaca - seq (Avg.ACC), Forgetting reduction = seq - "
        "llaca. Probe: seq's accuracy on task i along the straight line from the stage-i to the stage-(i+1) weights "
        "(lambda 0, .25, .5, .75, 1; mean over i); joint = max over lambda of min(task i, task i+1).",
        "",
        f"| regime (base / model / lr) | seq | {LABEL['ema0.99']} | llaca | llaca+replay | llaca gain Avg.ACC | "
        "llaca Forgetting reduction | llaca+replay gain / reduction | targets met (F <= seq/2, Avg >= seq+10) | "
        "probe: task i at lambda | probe: task i+1 at lambda | probe joint | other methods |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    main = ("seq", "ema0.99", "llaca", "llaca+replay")
    for g in results["regimes"]:
        lg, rg, pr = g["llaca_gain"] or {}, g["replay_gain"] or {}, g["probe"]
        targets = "n/a" if g["targets"] is None else f"{g['targets_met']}/2"
        lines.append(
            f"| {g['name']} | {_cell(g, 'seq')} | {_cell(g, 'ema0.99')} | {_cell(g, 'llaca')} | "
            f"{_cell(g, 'llaca+replay')} | {_signed(lg.get('avg_acc'))} | {_signed(lg.get('forgetting_reduction'))} | "
            f"{_signed(rg.get('avg_acc'))} / {_signed(rg.get('forgetting_reduction'))} | {targets} | "
            f"{' '.join(f'{x:.0f}' for x in pr['old']) if pr else 'n/a'} | "
            f"{' '.join(f'{x:.0f}' for x in pr['new']) if pr else 'n/a'} | {pr['joint'] if pr else 'n/a'} | "
            f"{', '.join(f'{m}: {_cell(g, m)}' for m in cfg['methods'] if m not in main) or '-'} |")
    missing = [g["name"] for g in results["regimes"] if g["runs_done"] < g["runs_planned"]]
    if missing:
        lines += ["", f"Not (fully) run: {', '.join(missing)}."]
    if results["best"]:
        lines += ["", f"Where llaca measured best (targets met, then Avg.ACC gain): {', '.join(results['best'])}."]
    lines += ["", "llaca's alpha (first seed; median over steps off the fallback) and per-element EMA movement "
              "alpha * ||p - ema||_1 / N, median over the tensors of each size (matrices only), next to what a tensor of the paper's "
              f"size ({cfg['paper_lora_numel']:,} = 4096 x 128) would see with the same per-element statistics (x N / "
              f"{cfg['paper_lora_numel']:,}):", "",
              "| regime | tensor size N | tensors | fallback share | alpha | alpha at paper size | EMA move / element "
              "/ step | at paper size | kept = prod(1 - alpha) per stage |", "|---|---|---|---|---|---|---|---|---|"]
    for g in results["regimes"]:
        by_n: dict[int, list[dict]] = {}
        for t in g["alpha"]:
            by_n.setdefault(t["numel"], []).append(t)
        for n, ts in sorted(by_n.items(), key=lambda kv: -kv[0]):
            if n < 1000:                 # norms and biases: always on the fallback here
                continue
            med = lambda k: _med([t[k] for t in ts])  # noqa: E731
            lines.append(f"| {g['name']} | {n:,} | {len(ts)} | {_g(med('fallback_frac'))} | {_g(med('alpha_median'))} "
                         f"| {_g(med('alpha_paper'))} | {_g(med('move_median'))} | {_g(med('move_paper'))} | "
                         f"{_g(med('kept'))} |")
    est = "" if results["estimate_s"] is None else f"; estimate before starting {results['estimate_s'] / 60:.0f} min"
    lines += ["", f"Wall time {results['wall_s'] / 60:.1f} min for this invocation ({results['machine']}{est}); the "
              f"runs themselves took {results['process_s'] / 60:.0f} process-minutes (cached runs count their own time)."]
    return "\n".join(lines) + "\n"


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def write(results: dict, out: Path) -> None:
    from experiments import regimes_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    (out / "table.md").write_text(markdown(results))
    regimes_plots.plot_map(results, out / "regimes.png")
    regimes_plots.plot_alpha_scale(results, out / "alpha_scale.png")

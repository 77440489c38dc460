"""Figures for the quality benchmark (matplotlib, Agg backend: no display needed).

quality.png: one heatmap of the mean A[j][i] per method (row = after stage j, column = task i; the cells above the
diagonal are zero-shot accuracies on tasks not learned yet), then Avg.ACC and Forgetting bars (mean +- std).
alpha.png: per LLaCA variant (first seed), alpha per step (mean, min-max band, fallback share) over the whole
sequence, and per tensor: how often the fallback fired and how much of the stage the EMA kept, against tensor size.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_quality(results: dict, path: Path) -> None:
    summary, tasks = results["summary"], results["config"]["tasks"]
    names = list(summary)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    T = len(tasks)
    cell = 0.42 * max(T, 3)
    # each row as high as its tallest matrix (a multitask row is a single row of cells) + title and tick labels
    heights = [max(0.42 * len(summary[n]["A_mean"]) for n in names[r * ncols:(r + 1) * ncols]) + 1.3
               for r in range(nrows)] + [3.4]
    fig = plt.figure(figsize=(ncols * (cell + 1.2), sum(heights) + 0.6))
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=heights, hspace=0.25, wspace=0.3)
    short = [t[:5] for t in tasks]
    for k, name in enumerate(names):
        ax = fig.add_subplot(grid[k // ncols, k % ncols])
        A = np.array(summary[name]["A_mean"], dtype=float)
        ax.imshow(A, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_box_aspect(A.shape[0] / A.shape[1])   # square cells: the joint (multitask) row stays one row high
        ax.set_anchor("N")
        for j in range(A.shape[0]):
            for i in range(A.shape[1]):
                seen = name == "multitask" or i <= j
                ax.text(i, j, f"{A[j, i]:.0f}", ha="center", va="center", fontsize=7 if T > 5 else 9,
                        color=("white" if A[j, i] < 60 else "black") if seen else "#bbbbbb")
        avg = summary[name]["avg_acc"]["mean"]
        fg = summary[name]["forgetting"]
        ax.set_title(f"{name}\nAvg.ACC {avg:.1f}" + (f", Forg. {fg['mean']:.1f}" if fg else ""), fontsize=9)
        ax.set_xticks(range(T), short, rotation=60, fontsize=7)
        rows = ["joint"] if name == "multitask" else [f"after {s}" if k % ncols == 0 else s for s in short]
        ax.set_yticks(range(A.shape[0]), rows, fontsize=7)
    ax = fig.add_subplot(grid[nrows, :])
    x = np.arange(len(names))
    for off, metric, label, colour in ((-0.2, "avg_acc", "Avg.ACC (higher is better)", "#3b7dd8"),
                                       (0.2, "forgetting", "Forgetting (lower is better)", "#d8633b")):
        vals = [summary[n][metric] for n in names]
        means = [v["mean"] if v else 0 for v in vals]
        stds = [v["std"] if v else 0 for v in vals]
        bars = ax.bar(x + off, means, 0.38, yerr=stds, capsize=3, label=label, color=colour)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, "n/a" if v is None else f"{v['mean']:.1f}",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, fontsize=9)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left")
    cfg = results["config"]
    fig.suptitle(f"CoIN-mini: A[j][i] (%) = accuracy on task i after stage j, mean over seeds {cfg['seeds']} "
                 f"({cfg['steps']} steps/stage)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_alpha(results: dict, path: Path) -> None:
    runs = [r for r in results["runs"] if r.get("tensors") and any("alpha_trace" in s for s in r["stages"])]
    if not runs:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no LLaCA run in this benchmark", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    fig, axes = plt.subplots(len(runs), 3, figsize=(16, 3.6 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for row, run in zip(axes, runs):
        fallback = run["rule_hparams"].get("alpha_fallback", 0.01)
        ax = row[0]
        start = 0
        for k, st in enumerate(run["stages"]):
            tr = st.get("alpha_trace")
            if tr is None:   # a stage without the rule (instruction grouping opened a new group)
                ax.axvspan(start, start + run["steps"], color="#eeeeee", lw=0)
                ax.text(start + 2, 1.3, st["task"][:9] + " (seq)", fontsize=7, va="bottom")
                start += run["steps"]
                continue
            steps = np.arange(start, start + len(tr["mean"]))
            ax.fill_between(steps, tr["min"], tr["max"], color="#9ecae1", lw=0, label="min-max over tensors" if k == 0 else None)
            ax.plot(steps, tr["mean"], color="#08519c", lw=0.8, label="mean over tensors" if k == 0 else None)
            ax.axvline(start, color="grey", lw=0.5)
            ax.text(start + 2, 1.3, st["task"][:9], fontsize=7, va="bottom")
            start += len(tr["mean"])
        ax.axhline(fallback, color="#d8633b", ls="--", lw=0.8, label=f"fallback {fallback:g}")
        ax.set_yscale("log")
        ax.set_ylim(top=3)
        ax.set_xlabel("optimizer step (all stages)")
        ax.set_ylabel("alpha (weight on new weights)")
        ax.set_title(f"{run['method']} (scale {run['rule_hparams'].get('scale', 2.0):g}), seed {run['seed']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax2 = ax.twinx()
        frac = [f for st in run["stages"]
                for f in (st["alpha_trace"]["fallback_frac"] if "alpha_trace" in st else [np.nan] * run["steps"])]
        ax2.plot(np.arange(len(frac)), frac, color="#d8633b", lw=0.6, alpha=0.7)
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("share of tensors on fallback", color="#d8633b", fontsize=8)

        tensors = [t for t in run["tensors"] if t["numel"]]
        numel = np.array([t["numel"] for t in tensors])
        colour = ["#2ca02c" if "projector" in t["name"] else "#9467bd" if "embed" in t["name"] or "lm_head" in t["name"]
                  else "#1f77b4" if t["name"].endswith("weight") and t["numel"] > 4096 else "#7f7f7f" for t in tensors]
        row[1].scatter(numel, [t["fallback_frac"] for t in tensors], c=colour, s=14)
        row[1].set_xscale("log")
        row[1].set_ylim(-0.05, 1.05)
        row[1].set_xlabel("tensor size (elements)")
        row[1].set_ylabel("share of steps on the fallback")
        row[1].set_title("fallback per tensor (grey: norms/biases,\nblue: LM matrices, green: projector, purple: embed)",
                         fontsize=8)
        row[2].scatter(numel, [max(t["kept"], 1e-6) for t in tensors], c=colour, s=14)
        row[2].set_xscale("log")
        row[2].set_yscale("log")
        row[2].set_ylim(1e-6, 2)
        row[2].set_xlabel("tensor size (elements)")
        row[2].set_ylabel("prod(1 - alpha) over a stage")
        row[2].set_title("weight the final EMA keeps on the stage's start\n(1 = tensor did not learn; mean over stages)",
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_interpolation(res: dict, path: Path) -> None:
    """Accuracy along theta(lam) = (1 - lam) theta_start + lam theta_end for two consecutive seq stages."""
    t1, t2 = res["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, key, title in ((axes[0], "base_to_1", f"base -> after {t1}"), (axes[1], "1_to_2", f"after {t1} -> after {t2}")):
        for name, accs in res[key].items():
            ax.plot(res["lambdas"], accs, marker="o", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("lam (0 = stage start, 1 = stage end)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(f"Straight lines between consecutive seq versions ({res['steps']} steps/stage): "
                 "what an EMA of the weights can reach", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

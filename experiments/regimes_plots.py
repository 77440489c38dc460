"""Figures of the regime map (matplotlib, Agg backend).

regimes.png: per regime, llaca's (and llaca+replay's, and the fixed EMA's) Avg.ACC gain and Forgetting reduction
over `seq`, next to the connectivity probe: seq's accuracy on the old task along the line from one stage's weights
to the next (mean over stages), one line per regime.
alpha_scale.png: llaca's alpha (off the fallback) and per-element EMA movement per tensor against tensor size N,
per regime, with what a tensor of the paper's size would see (hollow markers at N = 4096 x 128: x N / 524,288).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SERIES = [("llaca_gain", "llaca", "tab:red"), ("replay_gain", "llaca+replay", "tab:purple"),
          ("ema_gain", "fixed EMA ema0.99 (released scripts)", "tab:gray")]


def plot_map(results: dict, path: Path) -> None:
    regs = results["regimes"]
    names = [g["name"] for g in regs]
    y = np.arange(len(regs))
    h = 0.8 / len(SERIES)
    fig, axes = plt.subplots(1, 3, figsize=(16, 1.2 + 0.45 * max(len(regs), 4)),
                             gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, key, title in ((axes[0], "avg_acc", "Avg.ACC gain over seq (points)"),
                           (axes[1], "forgetting_reduction", "Forgetting reduction vs seq (points)")):
        for k, (field, label, color) in enumerate(SERIES):
            vals = [(g[field] or {}).get(key, np.nan) for g in regs]
            ax.barh(y + (k - 1) * h, vals, height=h, color=color, label=label)
        ax.axvline(0, color="k", lw=0.8)
        for k, g in enumerate(regs):
            if not any(g[field] for field, _, _ in SERIES):
                ax.text(0, k, "  not run", fontsize=7, color="gray", va="center")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(1.05, -0.12), ncol=3)
    ax = axes[2]
    cmap = plt.get_cmap("tab20")
    for k, g in enumerate(regs):
        pr = g["probe"]
        if pr:
            ax.plot(pr["lambdas"], pr["old"], "-o", ms=3, color=cmap(k % 20), label=f"{g['name']} (joint {pr['joint']:.0f})")
            ax.plot(pr["lambdas"], pr["new"], ":", color=cmap(k % 20), lw=1)
    ax.set_xlabel("lambda: stage-i weights (0) -> stage-(i+1) weights (1)")
    ax.set_ylabel("accuracy % (solid: task i, dotted: task i+1)")
    ax.set_title("connectivity probe (seq, mean over i)", fontsize=10)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    cfg = results["config"]
    fig.suptitle(f"Regime map ({results['mode']}): {len(cfg['tasks'])} tasks, {cfg['steps']} steps/stage, "
                 f"seeds {cfg['seeds']}, {cfg['test_n']} test records/task", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_alpha_scale(results: dict, path: Path) -> None:
    paper = results["config"]["paper_lora_numel"]
    regs = [g for g in results["regimes"] if g["alpha"]]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    cmap = plt.get_cmap("tab20")
    for ax, key, paper_key, title in (
            (axes[0], "alpha_median", "alpha_paper", "llaca alpha per tensor (median over steps off the fallback)"),
            (axes[1], "move_median", "move_paper", "EMA movement per element per step: alpha * ||p - ema||_1 / N")):
        for k, g in enumerate(regs):
            pts = [(t["numel"], t[key], t[paper_key]) for t in g["alpha"] if t.get(key) is not None and t["numel"]]
            if not pts:
                continue
            n, v, vp = zip(*pts)
            jitter = np.exp(np.random.default_rng(k).uniform(-0.08, 0.08, len(n)))
            ax.scatter(np.array(n) * jitter, v, s=10, color=cmap(k % 20), label=g["name"], alpha=0.7)
            vp = [x for x in vp if x is not None]
            if vp:
                ax.scatter(paper * np.exp(np.random.default_rng(100 + k).uniform(-0.15, 0.15, len(vp))), vp, s=14,
                           facecolors="none", edgecolors=cmap(k % 20), alpha=0.7)
        ax.axvline(paper, color="k", ls="--", lw=0.8)
        ax.text(paper, 0.98, " paper: 4096x128 LoRA\n (hollow: x N/N_paper)",
                fontsize=7, va="top", transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tensor size N (elements)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("The rule is not scale-free: alpha ~ 2(1+b)/(a c) with L1 sums over N elements, so alpha and the "
                 "per-element step fall as 1/N", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

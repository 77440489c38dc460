"""The app's figures (matplotlib, object API only: no pyplot state, so Gradio's worker threads can draw at once).

    loss_figure(events)      training loss per step (one line per phase: a base build has two)
    alpha_figure(events)     the EMA weight alpha per step (LLaCA: mean with the min-max band over tensors)
    accuracy_heatmaps(rows)  A[j][i] = accuracy on stage i's test set after stage j, one panel per lineage
"""
from __future__ import annotations

import math

from matplotlib.figure import Figure

COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]


def _figure(width: float = 5.2, height: float = 3.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", color="#777", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _steps_by_phase(events: list[dict]) -> dict[str, list[dict]]:
    phases: dict[str, list[dict]] = {}
    for e in events:
        if e.get("type") == "step":
            phases.setdefault(e.get("phase", "stage"), []).append(e)
    return phases


def loss_figure(events: list[dict], title: str = "training loss") -> Figure:
    fig, ax = _figure()
    phases = _steps_by_phase(events)
    if not phases:
        _empty(ax, "no steps yet")
    for k, (phase, steps) in enumerate(phases.items()):
        ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], color=COLOURS[k % len(COLOURS)],
                lw=1.4, label=phase)
    if len(phases) > 1:
        ax.legend(frameon=False, fontsize=8)
    if phases:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def alpha_figure(events: list[dict], method: str | None = None,
                 title: str = "alpha: weight on the new weights per step") -> Figure:
    """LLaCA logs alpha_mean/min/max (per-tensor alphas); fixed EMA logs one `alpha` (= 1 - beta)."""
    fig, ax = _figure()
    steps = [e for e in events if e.get("type") == "step" and ("alpha_mean" in e or "alpha" in e)]
    if not steps:
        waiting = method in (None, "llaca", "ema")
        _empty(ax, "no steps yet" if waiting else f"method '{method}' has no EMA, so no alpha")
        ax.set_title(title, fontsize=10)
        return fig
    x = [e["step"] for e in steps]
    mean = [e.get("alpha_mean", e.get("alpha")) for e in steps]
    low = [e.get("alpha_min", m) for e, m in zip(steps, mean)]
    high = [e.get("alpha_max", m) for e, m in zip(steps, mean)]
    if low != high:
        ax.fill_between(x, low, high, color=COLOURS[0], alpha=0.18, lw=0, label="min-max over tensors")
    ax.plot(x, mean, color=COLOURS[0], lw=1.4, label="mean" if low != high else "alpha")
    if min(low) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def accuracy_heatmaps(panels: list[dict]) -> Figure:
    """One heatmap per lineage. Each panel: {"title", "stages" (row labels), "tests" (column labels),
    "matrix" (rows of percent or None), "metrics" (cl_metrics dict or None)}."""
    n = max(1, len(panels))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    size = max((max(len(p["tests"]), len(p["stages"])) for p in panels), default=2)
    fig = Figure(figsize=(max(4.6, 0.9 * size + 2.2) * cols, (0.6 * size + 2.0) * rows), dpi=100,
                 layout="constrained")
    if not panels:
        _empty(fig.add_subplot(), "no evaluated versions yet: learn a stage (or run the demo)")
        return fig
    image = None
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        matrix = [[math.nan if v is None else v for v in row] for row in panel["matrix"]]
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for j, row in enumerate(panel["matrix"]):
            for i, value in enumerate(row):
                if value is not None:
                    ax.text(i, j, f"{value:.0f}", ha="center", va="center", fontsize=9,
                            color="white" if value < 60 else "black")
        ax.set_xticks(range(len(panel["tests"])), panel["tests"], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(panel["stages"])), panel["stages"], fontsize=8)
        ax.set_xlabel("test set", fontsize=8)
        title = panel["title"]
        m = panel.get("metrics")
        if m:
            title += (f"\nAvg.ACC {_fmt(m['avg_acc'])}  Forgetting {_fmt(m['forgetting'])}  "
                      f"BWT {_fmt(m['bwt'])}")
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="accuracy %")
    return fig

"""Smoke test of the regime map: a tiny grid (2 regimes x 3 methods, 2 tasks, 2 steps) runs end to end, and the
report is consistent with its runs (not who wins: two steps teach nothing)."""
from __future__ import annotations

import json

import pytest

from experiments import regimes
from llaca.train.rules.llaca import PAPER_LORA_NUMEL


def test_regimes_smoke_report_matches_runs(llaca_home, coin_dir, tmp_path):
    bases = regimes.resolve_bases(str(llaca_home / "versions" / "base"))
    assert len(bases) == 1 and bases[0][0] == "base"
    grid = regimes.grid(bases, ["full", "lora8"], [1e-3])
    assert [g["name"] for g in grid] == ["base/full/lr0.001", "base/lora8/lr0.001"]
    size = {"tasks": ["vqav2", "gqa"], "steps": 2, "test_limit": 4, "seeds": [0]}
    methods = ["seq", "llaca", "llaca+replay"]
    out, work = tmp_path / "out", tmp_path / "work"
    kw = dict(data=str(coin_dir), work=str(work), log=lambda *a, **k: None)
    assert regimes.run_map(grid, size, methods, out, calibrate=False, **kw) == 0
    for name in ("results.json", "table.md", "regimes.png", "alpha_scale.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 6 and all(r["runs_done"] == r["runs_planned"] == 3 for r in res["regimes"])
    for reg in res["regimes"]:
        runs = {r["method"]: r for r in res["runs"] if r["regime"] == reg["name"]}
        for m in methods:   # the table's cells are the runs' metrics
            assert reg["methods"][m]["avg_acc"]["mean"] == pytest.approx(runs[m]["metrics"]["avg_acc"], abs=0.006)
        seq, llaca = runs["seq"]["metrics"], runs["llaca"]["metrics"]
        assert reg["llaca_gain"]["avg_acc"] == pytest.approx(llaca["avg_acc"] - seq["avg_acc"], abs=0.02)
        assert reg["llaca_gain"]["forgetting_reduction"] == pytest.approx(seq["forgetting"] - llaca["forgetting"],
                                                                          abs=0.02)
        assert reg["targets_met"] == sum(reg["targets"].values())
        # probe: 5 points on the line stage 0 -> stage 1, whose ends are cells of seq's A matrix
        A, probe = runs["seq"]["A"], reg["probe"]
        assert probe["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert (probe["old"][0], probe["old"][-1], probe["new"][0], probe["new"][-1]) == \
            (A[0][0], A[1][0], A[0][1], A[1][1])
        assert all(0 <= x <= 100 for x in probe["old"] + probe["new"])
        assert probe["joint"] == max(min(o, n) for o, n in zip(probe["old"], probe["new"]))
        # llaca's per-tensor alpha and EMA movement, and their paper-size extrapolation (x N / 4096*128)
        assert reg["alpha"] and all(t["numel"] > 0 for t in reg["alpha"])
        for t in reg["alpha"]:   # extrapolated only for matrices mostly off the (constant) fallback
            scalable = t["alpha_median"] is not None and t["numel"] >= 1000 and t["fallback_frac"] < 0.5
            assert (t["alpha_paper"] is not None) == scalable
            if scalable:
                assert t["alpha_paper"] == pytest.approx(t["alpha_median"] * t["numel"] / PAPER_LORA_NUMEL, rel=1e-3)
            if t["move_median"] is not None:
                assert t["move_median"] >= 0
        assert any(t["move_median"] is not None for t in reg["alpha"])
    lora_tensors = {t["name"] for t in res["regimes"][1]["alpha"]}
    assert lora_tensors and all("lora_" in n or "modules_to_save" in n for n in lora_tensors)   # LoRA really ran
    table = (out / "table.md").read_text()
    assert "fixed EMA ema0.99 (what the released scripts likely ran)" in table
    assert all(f"| {g['name']} |" in table for g in grid)
    # a second invocation reads the cache only: same report
    assert regimes.run_map(grid, size, methods, tmp_path / "again", report_only=True, **kw) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [r["methods"] for r in again["regimes"]] == [r["methods"] for r in res["regimes"]]

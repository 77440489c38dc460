"""Blind votes: the SQLite store and the Bradley-Terry fit, checked against cases solved by hand."""
from __future__ import annotations

import json
import math

import pytest

from llaca.serve.votes import ACROSS, VoteError, VoteStore, bradley_terry, elo_scale, leaderboard


def test_two_versions_three_to_one_is_a_strength_ratio_of_three():
    # MLE of P(x beats y) = 3/4 is p_x / (p_x + p_y) = 3/4, i.e. p_x = 3 p_y; geometric mean 1 -> sqrt(3), 1/sqrt(3).
    games = [("x", "y", 1.0)] * 3 + [("y", "x", 1.0)]
    p = bradley_terry(games, prior=0.0)
    assert p["x"] == pytest.approx(math.sqrt(3), rel=1e-6)
    assert p["y"] == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    r = elo_scale(p)
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(3), abs=1e-3)  # 190.8 points


def test_three_versions_with_counts_at_their_expectation_recover_the_true_strengths():
    # True strengths 1 : 2 : 4. Counts equal to the expected wins satisfy the likelihood equations
    # W_i = sum_j n_ij p_i / (p_i + p_j) exactly (a: 10 + 10 = 30/3 + 50/5), so the MLE is the truth.
    games = ([("b", "a", 1.0)] * 20 + [("a", "b", 1.0)] * 10 + [("c", "b", 1.0)] * 20 + [("b", "c", 1.0)] * 10
             + [("c", "a", 1.0)] * 40 + [("a", "c", 1.0)] * 10)
    p = bradley_terry(games, prior=0.0)
    assert p["b"] / p["a"] == pytest.approx(2.0, rel=1e-6)
    assert p["c"] / p["a"] == pytest.approx(4.0, rel=1e-6)


def test_ties_count_half_and_the_prior_keeps_an_unbeaten_version_finite():
    even = bradley_terry([("x", "y", 0.5)] * 4, prior=0.0)
    assert even["x"] == pytest.approx(even["y"])
    # 2 wins, no loss: with one virtual tie per pair, x has 2.5 of 3 games -> ratio 5.
    p = bradley_terry([("x", "y", 1.0)] * 2, prior=1.0)
    assert p["x"] / p["y"] == pytest.approx(5.0, rel=1e-6)


def _vote(a, b, outcome):
    return {"version_a": a, "version_b": b, "outcome": outcome}


def test_leaderboard_orders_counts_and_brackets_the_rating():
    votes = [_vote("v1", "base", "a")] * 6 + [_vote("base", "v1", "a")] * 2 + [_vote("v1", "base", "tie")] * 2
    board = leaderboard(votes, bootstrap=100, seed=1)
    assert [r["version"] for r in board] == ["v1", "base"]
    top = board[0]
    assert (top["votes"], top["wins"], top["losses"], top["ties"]) == (10, 6, 2, 2)
    assert top["ci_low"] <= top["rating"] <= top["ci_high"] and top["ci_low"] < top["ci_high"]
    assert board == leaderboard(votes, bootstrap=100, seed=1)  # seeded: the same intervals every time


def test_store_round_trip_lineages_and_export(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"not really a png, only hashed")
    store = VoteStore(tmp_path)
    store.add(version_a="v2", version_b="v1", outcome="a", question="q?", answer_a="2", answer_b="3", image=image,
              lineage="base")
    store.add(version_a="v1", version_b="other", outcome="bothbad", question="q?", answer_a="", answer_b="x")
    with pytest.raises(VoteError, match="outcome"):
        store.add(version_a="v1", version_b="v2", outcome="maybe", question="q", answer_a="", answer_b="")
    with pytest.raises(VoteError, match="two different"):
        store.add(version_a="v1", version_b="v1", outcome="a", question="q", answer_a="", answer_b="")
    assert store.count() == 2 and store.lineages() == ["base", ACROSS]
    assert VoteStore(tmp_path).list("base")[0]["image_sha256"] is not None  # persisted, image hashed
    lines = store.export_jsonl(tmp_path / "out" / "votes.jsonl").read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == ["a", "bothbad"]

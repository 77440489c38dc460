"""Blind votes between two versions, and the Bradley-Terry leaderboard they give.

    $LLACA_HOME/votes.db    one row per vote: when, image sha256, question, which version was shown as A and
                            which as B, both answers, the outcome (a / b / tie / bothbad), the lineage

FastChat's arena builds its leaderboard offline in a notebook; here `leaderboard()` refits after every vote
(a few hundred votes fit in milliseconds). The model (Bradley-Terry): P(i beats j) = p_i / (p_i + p_j). It is
fitted by Hunter's (2004) MM iteration, p_i <- W_i / sum_j n_ij / (p_i + p_j), where a tie or a "both bad"
counts as half a win for each side (as FastChat counts ties). `prior` adds that many virtual ties to every pair
that met, so a version that never lost still gets a finite rating. Ratings are on the Elo scale FastChat uses
(400 log10 p, centred at 1000); 95% intervals come from refitting on votes resampled with replacement.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

from ..paths import atomic_write_text, llaca_home, sqlite_connection

OUTCOMES = ("a", "b", "tie", "bothbad")
ACROSS = "(across lineages)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    session TEXT,
    image_sha256 TEXT,
    question TEXT NOT NULL,
    version_a TEXT NOT NULL,
    version_b TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('a', 'b', 'tie', 'bothbad')),
    lineage TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_lineage ON votes(lineage, id);
"""


class VoteError(ValueError):
    pass


def image_sha256(path: str | Path | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class VoteStore:
    """The votes table. Each call opens its own short connection, so threads and processes can share it."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else llaca_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "votes.db"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self):
        return sqlite_connection(self.db_path)

    def add(self, *, version_a: str, version_b: str, outcome: str, question: str, answer_a: str, answer_b: str,
            image: str | Path | None = None, lineage: str = ACROSS, session: str | None = None) -> dict:
        if outcome not in OUTCOMES:
            raise VoteError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        if version_a == version_b:
            raise VoteError(f"a vote needs two different versions (got {version_a!r} twice)")
        row = (time.time(), session, image_sha256(image), question, version_a, version_b, answer_a, answer_b,
               outcome, lineage)
        with self._connect() as db:
            cur = db.execute("INSERT INTO votes (created, session, image_sha256, question, version_a, version_b, "
                             "answer_a, answer_b, outcome, lineage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return dict(db.execute("SELECT * FROM votes WHERE id = ?", (cur.lastrowid,)).fetchone())

    def list(self, lineage: str | None = None) -> list[dict]:
        """Oldest first."""
        with self._connect() as db:
            if lineage is None:
                rows = db.execute("SELECT * FROM votes ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM votes WHERE lineage = ? ORDER BY id", (lineage,)).fetchall()
        return [dict(r) for r in rows]

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def lineages(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT lineage FROM votes GROUP BY lineage ORDER BY MIN(id)")]

    def export_jsonl(self, path: str | Path) -> Path:
        """Every vote as one JSON object per line (atomic write)."""
        path = Path(path)
        atomic_write_text(path, "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in self.list()))
        return path


def lineage_of(registry, version_a: str, version_b: str) -> str:
    """The root version both belong to (their lineage), or ACROSS when their roots differ."""
    roots = {registry.lineage(v)[0].id for v in (version_a, version_b)}
    return roots.pop() if len(roots) == 1 else ACROSS


# --------------------------------------------------------------------------------------------- Bradley-Terry

def _games(votes: list[dict]) -> list[tuple[str, str, float]]:
    """(i, j, score of i): 1 a win of i over j, 0.5 a tie or both bad."""
    score = {"a": 1.0, "b": 0.0, "tie": 0.5, "bothbad": 0.5}
    return [(v["version_a"], v["version_b"], score[v["outcome"]]) for v in votes]


def bradley_terry(games: list[tuple[str, str, float]], prior: float = 1.0, iters: int = 1000,
                  tol: float = 1e-10) -> dict[str, float]:
    """Strengths p (geometric mean 1) maximising the Bradley-Terry likelihood of `games` (MM iteration).

    `games`: (i, j, s) with s = 1 if i won, 0 if j won, 0.5 for a tie. `prior`: virtual ties per pair that met.
    """
    players = sorted({g[0] for g in games} | {g[1] for g in games})
    if not players:
        return {}
    wins = {p: 0.0 for p in players}
    pairs: dict[tuple[str, str], float] = {}  # unordered pair -> number of games
    for i, j, s in games:
        wins[i] += s
        wins[j] += 1.0 - s
        key = (i, j) if i < j else (j, i)
        pairs[key] = pairs.get(key, 0.0) + 1.0
    for key in pairs:
        pairs[key] += prior
        wins[key[0]] += prior / 2
        wins[key[1]] += prior / 2
    strength = {p: 1.0 for p in players}
    for _ in range(iters):
        new = {}
        for p in players:
            denom = sum(n / (strength[a] + strength[b]) for (a, b), n in pairs.items() if p in (a, b))
            new[p] = wins[p] / denom if denom > 0 else strength[p]
            new[p] = max(new[p], 1e-12)  # a player who never won (with prior 0) tends to 0
        log_mean = sum(math.log(v) for v in new.values()) / len(new)
        new = {p: v / math.exp(log_mean) for p, v in new.items()}
        delta = max(abs(math.log(new[p]) - math.log(strength[p])) for p in players)
        strength = new
        if delta < tol:
            break
    return strength


def elo_scale(strength: dict[str, float]) -> dict[str, float]:
    """FastChat's display scale: 1000 + 400 log10(p) (a 100-point gap = the better one wins 64%)."""
    return {p: 1000.0 + 400.0 * math.log10(s) for p, s in strength.items()}


def leaderboard(votes: list[dict], bootstrap: int = 200, seed: int = 0, prior: float = 1.0) -> list[dict]:
    """One row per version, best first: rating, 95% bootstrap interval, votes, wins, losses, ties/both bad."""
    games = _games(votes)
    if not games:
        return []
    rating = elo_scale(bradley_terry(games, prior=prior))
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {p: [] for p in rating}
    for _ in range(bootstrap):
        resampled = [games[rng.randrange(len(games))] for _ in games]
        fitted = elo_scale(bradley_terry(resampled, prior=prior, iters=200, tol=1e-6))
        for p in rating:
            if p in fitted:  # a version absent from a resample has no rating there
                samples[p].append(fitted[p])
    rows = []
    for p, r in rating.items():
        mine = [v for v in votes if p in (v["version_a"], v["version_b"])]
        won = sum(1 for v in mine if (v["outcome"] == "a") == (v["version_a"] == p) and v["outcome"] in ("a", "b"))
        even = sum(1 for v in mine if v["outcome"] in ("tie", "bothbad"))
        lo, hi = _percentiles(samples[p], 2.5, 97.5) if samples[p] else (r, r)
        rows.append({"version": p, "rating": round(r, 1), "ci_low": round(lo, 1), "ci_high": round(hi, 1),
                     "votes": len(mine), "wins": won, "losses": len(mine) - won - even, "ties": even})
    return sorted(rows, key=lambda row: -row["rating"])


def _percentiles(xs: list[float], lo: float, hi: float) -> tuple[float, float]:
    xs = sorted(xs)

    def at(q: float) -> float:  # linear interpolation, as numpy.percentile's default
        k = (len(xs) - 1) * q / 100
        f = math.floor(k)
        c = min(f + 1, len(xs) - 1)
        return xs[f] + (xs[c] - xs[f]) * (k - f)

    return at(lo), at(hi)


def leaderboards(store: VoteStore, **kwargs) -> dict[str, list[dict]]:
    """lineage -> its leaderboard."""
    return {lineage: leaderboard(store.list(lineage), **kwargs) for lineage in store.lineages()}

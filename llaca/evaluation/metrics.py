"""Answer scoring and the continual-learning metrics of docs/llaca.md ("Metrics").

Scoring: boxes (grounding, "[x1,y1,x2,y2]") count as correct at IoU > 0.5; every other answer is a
VQA-style normalised exact match. The CL metrics read an accuracy matrix A[j][i] = accuracy on task i
after stage j (0-based here; the formulas are the doc's 1-based ones shifted by one).
"""
from __future__ import annotations

import math
import re
import string
from typing import Sequence

# --- answers ------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX = r"\[\s*({0})\s*,\s*({0})\s*,\s*({0})\s*,\s*({0})\s*\]".format(_NUM)
_BOX_FULL = re.compile(rf"^\s*{_BOX}\s*$")
_BOX_ANY = re.compile(_BOX)
_IN_NUMBER = re.compile(r"(?<=\d)[.,](?=\d)")   # "2.5", "1,000": punctuation inside a number
_DOT = "\x00"                                    # stands in for a decimal point while punctuation goes
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")

Box = tuple[float, float, float, float]


def parse_box(s: str) -> Box | None:
    """"[x1, y1, x2, y2]" (ints or floats, any spaces) -> 4 floats; anything else -> None."""
    m = _BOX_FULL.match(s) if isinstance(s, str) else None
    return tuple(float(v) for v in m.groups()) if m else None


def _find_box(s: str) -> Box | None:
    """First box anywhere in a free-form prediction ("The box is [0.1, 0.2, 0.5, 0.6].")."""
    m = _BOX_ANY.search(s) if isinstance(s, str) else None
    return tuple(float(v) for v in m.groups()) if m else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])   # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _format_box(box: Box) -> str:
    return "[" + ",".join(str(int(v)) if v.is_integer() else repr(v) for v in box) + "]"


def normalize_answer(s: str) -> str:
    """VQA-style: lowercase, punctuation out, articles out, number words -> digits, single spaces.

    A box is returned in a canonical "[x1,y1,x2,y2]" form instead (punctuation stripping would destroy it).
    A lone article is kept, since "A" is also a multiple-choice option letter (ScienceQA).
    """
    s = "" if s is None else str(s)
    box = parse_box(s)
    if box is not None:
        return _format_box(box)
    s = s.lower().replace("'", "").replace("\u2019", "")          # "don't" -> "dont"
    s = _IN_NUMBER.sub(lambda m: _DOT if m.group() == "." else "", s)  # keep "2.5"; "1,000" -> "1000"
    s = _PUNCT.sub(" ", s).replace(_DOT, ".")
    words = [_NUMBER_WORDS.get(w, w) for w in s.split()]
    kept = [w for w in words if w not in _ARTICLES]
    return " ".join(kept if kept else words)


def is_correct(prediction: str, gold: str | Sequence[str]) -> bool:
    """Box gold: the prediction's box (first one found) must have IoU > 0.5. Else normalised exact match.

    `gold` may be a list of acceptable answers (VQA-style); any match counts.
    """
    if not isinstance(gold, str):
        return any(is_correct(prediction, g) for g in gold)
    gold_box = parse_box(gold)
    if gold_box is not None:
        pred_box = _find_box(prediction)
        return pred_box is not None and box_iou(pred_box, gold_box) > 0.5
    return normalize_answer(prediction) == normalize_answer(gold)


def accuracy(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> float:
    """Percent (0-100) of predictions judged correct by `is_correct`."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
    if not golds:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * sum(is_correct(p, g) for p, g in zip(predictions, golds)) / len(golds)


# --- continual-learning metrics -----------------------------------------------------------------------------

def _used_entry(A, j: int, i: int) -> float:
    try:
        v = A[j][i]
    except (IndexError, TypeError):
        raise ValueError(f"A[{j}][{i}] (task {i} after stage {j}) is missing") from None
    if v is None or isinstance(v, bool):
        raise ValueError(f"A[{j}][{i}] (task {i} after stage {j}) must be a number, got {v!r}")
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"A[{j}][{i}] must be a number, got {v!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"A[{j}][{i}] (task {i} after stage {j}) must be finite, got {v}")
    return v


def _metrics(A, T: int) -> dict:
    """The doc's formulas (1-based there; stage T is index T-1 here). Only entries A[j][i] with i <= j are read.

        Avg.ACC    = (1/T) sum_i A[T][i]
        New.ACC    = (1/T) sum_i A[i][i]
        Forgetting = (1/(T-1)) sum_{i<T} ( max_{j in [i, T-1]} A[j][i] - A[T][i] )
        BWT        = (1/(T-1)) sum_{i<T} ( A[T][i] - A[i][i] )
    """
    at = lambda j, i: _used_entry(A, j, i)   # noqa: E731
    last = T - 1
    out = {
        "avg_acc": sum(at(last, i) for i in range(T)) / T,
        "new_acc": sum(at(i, i) for i in range(T)) / T,
        "forgetting": None,
        "bwt": None,
    }
    if T > 1:
        # max over the stages from learning task i up to the one BEFORE the last (doc: j in [i, T-1], 1-based)
        out["forgetting"] = sum(max(at(j, i) for j in range(i, last)) - at(last, i) for i in range(last)) / last
        out["bwt"] = sum(at(last, i) - at(i, i) for i in range(last)) / last
    return out


def _rows(A) -> list:
    try:
        return [list(row) for row in A]
    except TypeError:
        raise ValueError("A must be a T x T matrix (list of lists or 2-D array)") from None


def cl_metrics(A) -> dict:
    """Avg.ACC, New.ACC, Forgetting, BWT of a square T x T accuracy matrix (A[j][i]: task i after stage j).

    Returns {"avg_acc", "new_acc", "forgetting", "bwt"}; forgetting and bwt are None when T == 1.
    Entries above the diagonal (tasks not yet seen) are not used by the formulas and may be None / NaN.
    """
    rows = _rows(A)
    T = len(rows)
    if T < 1:
        raise ValueError("A must have at least one stage (T >= 1)")
    bad = [j for j, r in enumerate(rows) if len(r) != T]
    if bad:
        raise ValueError(f"A must be square: {T} rows but row {bad[0]} has {len(rows[bad[0]])} entries")
    return _metrics(rows, T)


def cl_metrics_lower(A) -> dict:
    """Like `cl_metrics` for a lower-triangular matrix: row j needs only its first j+1 entries (ragged lists ok),
    entries for tasks not yet seen (i > j) may be None / NaN / absent. T = number of rows, so a run that is
    still going gives the metrics over the stages done so far."""
    rows = _rows(A)
    T = len(rows)
    if T < 1:
        raise ValueError("A must have at least one stage (T >= 1)")
    short = [j for j, r in enumerate(rows) if len(r) < j + 1]
    if short:
        raise ValueError(f"row {short[0]} must have at least {short[0] + 1} entries (tasks 0..{short[0]})")
    return _metrics(rows, T)

"""Answer normalisation, boxes, accuracy, and the CL metrics on a hand-made matrix."""
import math

import numpy as np
import pytest

from llaca.evaluation.metrics import (
    accuracy,
    box_iou,
    cl_metrics,
    cl_metrics_lower,
    is_correct,
    normalize_answer,
    parse_box,
)


@pytest.mark.parametrize("raw,norm", [
    ("The Dog.", "dog"),
    ("  a   red  CAR ", "red car"),
    ("an apple!", "apple"),
    ("Two", "2"),
    ("twenty", "20"),
    ("zero", "0"),
    ("It weighs 2.5 kg.", "it weighs 2.5 kg"),
    ("1,000", "1000"),
    ("don't", "dont"),
    ("yes,", "yes"),
    ("A", "a"),            # a lone article is an option letter (ScienceQA), not dropped
    ("B.", "b"),
    ("Unanswerable", "unanswerable"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_keeps_boxes():
    assert normalize_answer(" [0.1, 0.2,0.3 ,0.4] ") == "[0.1,0.2,0.3,0.4]"
    assert normalize_answer("[1, 2, 3, 4]") == "[1,2,3,4]"


def test_exact_match():
    assert is_correct("The cat", "cat")
    assert is_correct("two", "2")
    assert is_correct("A", "A") and not is_correct("", "A") and not is_correct("B", "A")
    assert not is_correct("cats", "cat")
    assert is_correct("2", ["two", "3"])                 # several acceptable answers


@pytest.mark.parametrize("s,box", [
    ("[1,2,3,4]", (1.0, 2.0, 3.0, 4.0)),
    (" [0.12, 0.3 ,0.5,  0.91] ", (0.12, 0.3, 0.5, 0.91)),
    ("[.5, 1., 2e-1, 3]", (0.5, 1.0, 0.2, 3.0)),
    ("[1,2,3]", None),
    ("1,2,3,4", None),
    ("[a,b,c,d]", None),
    ("cat", None),
])
def test_parse_box(s, box):
    assert parse_box(s) == box


def test_box_iou():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # inter = 1 (the unit square), union = 2 + 1 - 1 = 2 -> 0.5
    assert box_iou((0, 0, 2, 1), (0, 0, 1, 1)) == 0.5
    # inter = 1 * 1 = 1, union = 4 + 4 - 1 = 7
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0     # empty union


def test_box_correctness():
    assert not is_correct("[0,0,1,1]", "[0,0,2,1]")       # IoU exactly 0.5 is NOT correct
    # inter = 1.9 * 1 = 1.9, union = 2 + 1.9 - 1.9 = 2 -> 0.95
    assert is_correct("[0, 0, 1.9, 1]", "[0,0,2,1]")
    assert is_correct("The box is [0, 0, 1.9, 1].", "[0,0,2,1]")   # box inside free text
    assert not is_correct("left side", "[0,0,2,1]")
    assert not is_correct("[0,0,2,1]", "0 0 2 1")         # non-box gold: plain text match, no IoU


def test_accuracy():
    assert accuracy(["cat", "two", "[0,0,1,1]", "no"], ["Cat", "2", "[0,0,1,1]", "yes"]) == 75.0
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        accuracy([], [])


# A[j][i] = accuracy on task i after stage j.  Hand-made, T = 3:
#            task0 task1 task2
#   stage0 [  80,   10,   5 ]    (entries above the diagonal are never read)
#   stage1 [  60,   70,  12 ]
#   stage2 [  50,   65,  90 ]
A = [[80, 10, 5], [60, 70, 12], [50, 65, 90]]


def test_cl_metrics_by_hand():
    m = cl_metrics(A)
    # Avg.ACC = (50 + 65 + 90) / 3 = 205 / 3 = 68.333...
    assert m["avg_acc"] == pytest.approx(205 / 3)
    # New.ACC = (80 + 70 + 90) / 3 = 80
    assert m["new_acc"] == pytest.approx(80.0)
    # Forgetting: task0 max(80, 60) - 50 = 30; task1 max(70) - 65 = 5  -> (30 + 5) / 2 = 17.5
    assert m["forgetting"] == pytest.approx(17.5)
    # BWT: task0 50 - 80 = -30; task1 65 - 70 = -5 -> -35 / 2 = -17.5
    assert m["bwt"] == pytest.approx(-17.5)


def test_forgetting_uses_max_not_diagonal():
    # task0 improves after stage 0 (80 -> 85) then drops to 50: forgetting counts from the best, 85 - 50 = 35;
    # task1: 70 - 65 = 5 -> (35 + 5) / 2 = 20.  BWT still uses the diagonal: (-30 - 5) / 2 = -17.5
    m = cl_metrics([[80, 0, 0], [85, 70, 0], [50, 65, 90]])
    assert m["forgetting"] == pytest.approx(20.0) and m["bwt"] == pytest.approx(-17.5)


def test_cl_metrics_single_stage_and_numpy():
    assert cl_metrics([[42.0]]) == {"avg_acc": 42.0, "new_acc": 42.0, "forgetting": None, "bwt": None}
    m = cl_metrics(np.array(A, dtype=float))
    assert m["forgetting"] == pytest.approx(17.5) and isinstance(m["avg_acc"], float)


def test_cl_metrics_lower_triangular():
    nan = float("nan")
    expected = cl_metrics(A)
    assert cl_metrics([[80, None, nan], [60, 70, None], [50, 65, 90]]) == pytest.approx(expected)
    assert cl_metrics_lower([[80], [60, 70], [50, 65, 90]]) == pytest.approx(expected)
    assert cl_metrics_lower(np.array([[80, nan, nan], [60, 70, nan], [50, 65, 90]])) == pytest.approx(expected)
    # a run still in progress: two stages done
    m = cl_metrics_lower([[80], [60, 70]])
    # Avg = (60 + 70) / 2 = 65, New = (80 + 70) / 2 = 75, Forgetting = 80 - 60 = 20, BWT = 60 - 80 = -20
    assert m == pytest.approx({"avg_acc": 65.0, "new_acc": 75.0, "forgetting": 20.0, "bwt": -20.0})


@pytest.mark.parametrize("bad", [
    [],                                  # T = 0
    [[1, 2], [3]],                       # not square
    [[1, 2, 3], [4, 5, 6]],              # 2 x 3
    [[None, 1], [2, 3]],                 # a used entry missing
    [[math.nan, 1], [2, 3]],             # a used entry NaN
    [[1, 0], [2, "x"]],
    5,
])
def test_cl_metrics_validation(bad):
    with pytest.raises(ValueError):
        cl_metrics(bad)


def test_cl_metrics_lower_validation():
    with pytest.raises(ValueError):
        cl_metrics_lower([[1], [2]])     # row 1 lacks the diagonal entry
    with pytest.raises(ValueError):
        cl_metrics_lower([])

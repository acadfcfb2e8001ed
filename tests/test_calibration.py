"""Pair metrics on tiny hand-made cases with answers computed by hand."""

import numpy as np
import pytest

from mgdedup.evaluation.metrics import pair_metrics


def _vectors(angles_deg):
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_perfect_separation():
    # two families far apart: pairs (0,1) and (2,3) positive, cos 10deg; others negative
    x = _vectors([0, 10, 90, 100])
    result = pair_metrics(x, np.array([0, 0, 1, 1]), target_precision=0.99)
    assert result.micro_ap == pytest.approx(1.0)
    assert result.threshold == pytest.approx(np.cos(np.radians(10)), abs=1e-6)
    assert result.recall_at_threshold == pytest.approx(1.0)


def test_hand_computed_average_precision_and_threshold():
    # angles 0, 20, 25, 90: family [0, 1, 0, 1]
    # pair cosines: (1,2) 5deg neg, (0,1) 20 neg, (0,2) 25 POS, (1,3) 70 POS, (2,3) 65 neg,
    # (0,3) 90 neg. Ranked: (1,2)-, (0,1)-, (0,2)+, (2,3)-, (1,3)+, (0,3)-
    # precision at hits: 1/3, 2/5 -> AP = (1/3 + 2/5) / 2
    x = _vectors([0, 20, 25, 90])
    result = pair_metrics(x, np.array([0, 1, 0, 1]), target_precision=0.3)
    assert result.micro_ap == pytest.approx((1 / 3 + 2 / 5) / 2, abs=1e-6)
    # precision >= 0.3 holds at both hits; the lower one is the (1,3) pair at 70deg
    assert result.threshold == pytest.approx(np.cos(np.radians(70)), abs=1e-6)
    assert result.recall_at_threshold == pytest.approx(1.0)
    strict = pair_metrics(x, np.array([0, 1, 0, 1]), target_precision=0.9)
    assert strict.threshold is None and strict.recall_at_threshold == 0.0

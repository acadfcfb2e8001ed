"""Evaluation metrics on hand-made rankings; expected values are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from mgdedup.evaluation import metrics
from mgdedup.evaluation.metrics import (
    average_precision,
    copydays_map,
    holidays_map,
    micro_ap,
    pair_metrics,
    precision_recall_at,
    topk_accuracy,
    ukb_score,
)


def test_average_precision_by_hand():
    # relevant at ranks 1 and 3, 2 relevant: (1/1 + 2/3) / 2 = 5/6
    assert average_precision(np.array([True, False, True, False]), 2) == pytest.approx(5 / 6)
    # all relevant first: 1.0
    assert average_precision(np.array([True, True, False]), 2) == pytest.approx(1.0)
    # one of 2 relevant never retrieved: (1/1 + 0) / 2 = 0.5
    assert average_precision(np.array([True, False, False]), 2) == pytest.approx(0.5)
    # only relevant at rank 4: 1/4
    assert average_precision(np.array([False, False, False, True]), 1) == pytest.approx(0.25)


def test_average_precision_trapezoid_by_hand():
    # hit 1 at rank 1: (1 + 1/1) / 2 = 1; hit 2 at rank 3: (1/2 + 2/3) / 2 = 7/12
    # AP = (1 + 7/12) / 2 = 19/24
    ranked = np.array([True, False, True])
    assert average_precision(ranked, 2, trapezoid=True) == pytest.approx(19 / 24)


def test_average_precision_rejects_impossible_counts():
    with pytest.raises(ValueError):
        average_precision(np.array([False, False]), 0)
    with pytest.raises(ValueError):
        average_precision(np.array([True, True]), 1)


# Holidays: 5 images, ids 100000 100001 100002 | 100100 100101 -> groups 1000 (x3), 1001 (x2)
GROUPS = np.array([1000, 1000, 1000, 1001, 1001])
QUERIES = np.array([0, 3])
SIM = np.array([
    # query row 0, itself ranked last on purpose (excluded anyway). Without itself:
    # col2 .9 rel, col3 .5, col1 .2 rel, col4 .1 -> T F T F, 2 relevant -> AP 5/6
    [-5.0, 0.2, 0.9, 0.5, 0.1],
    # query row 3. Without itself: col0 .8, col4 .3 rel, col1 .1, col2 .1 -> F T F F,
    # 1 relevant -> AP 1/2
    [0.8, 0.1, 0.1, 1.0, 0.3],
])


def test_holidays_map_by_hand():
    # mAP = (5/6 + 1/2) / 2 = 2/3
    assert holidays_map(SIM, QUERIES, GROUPS) == pytest.approx(2 / 3)


def test_holidays_excludes_the_query_itself():
    # the query's own similarity, wherever it ranks, changes nothing
    for own in (-10.0, 0.15, 10.0):
        sim = SIM.copy()
        sim[0, 0] = own
        assert holidays_map(sim, QUERIES, GROUPS) == pytest.approx(2 / 3)
    # counting the query would be: col0 first -> T T F T F with 3 relevant -> (1+1+3/4)/3
    assert holidays_map(SIM, QUERIES, GROUPS) != pytest.approx((11 / 12 + 0.5) / 2)


def test_holidays_ties_are_broken_by_row_order():
    groups = np.array([0, 0, 1, 1, 0])
    sim = np.array([[1.0, 0.5, 0.5, 0.5, 0.5]])
    # all tie: order col1 (rel) col2 col3 col4 (rel) -> (1 + 2/4) / 2 = 3/4
    assert holidays_map(sim, np.array([0]), groups) == pytest.approx(0.75)


def test_holidays_chunked_matches_a_plain_loop(monkeypatch):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(7), rng.integers(2, 5, 7))
    queries = np.unique(groups, return_index=True)[1]
    sim = rng.random((len(queries), len(groups)))
    expected = []
    for q, row in zip(queries, sim):
        order = [j for j in np.argsort(-row, kind="stable") if j != q]
        hits = groups[order] == groups[q]
        expected.append(average_precision(hits, int((groups == groups[q]).sum()) - 1))
    monkeypatch.setattr(metrics, "CHUNK", 2)
    assert holidays_map(sim, queries, groups) == pytest.approx(np.mean(expected))


def test_holidays_query_alone_in_its_group_is_an_error():
    with pytest.raises(ValueError):
        holidays_map(np.array([[1.0, 0.5]]), np.array([0]), np.array([0, 1]))


UKB_GROUPS = np.repeat([0, 1], 4)
SAME = (UKB_GROUPS[:, None] == UKB_GROUPS[None, :]).astype(float)


def test_ukb_perfect_is_4():
    sim = SAME + 2 * np.eye(8)  # self 3, same group 1, others 0
    assert ukb_score(sim, UKB_GROUPS) == pytest.approx(4.0)


def test_ukb_by_hand_3_and_2_5():
    sim = SAME + np.eye(8)  # self 2, same group 1, others 0
    for i in range(8):
        sim[i, (i + 4) % 8] = 1.5  # one foreign image beats the group
    # top 4 of each row: self, the foreign one, 2 of the 3 others of the group -> 3 each
    assert ukb_score(sim, UKB_GROUPS) == pytest.approx(3.0)
    for i in range(4):
        sim[i, 4 + (i + 1) % 4] = 1.5  # rows 0-3: a 2nd foreign image -> 2; rows 4-7 still 3
    # (4 * 2 + 4 * 3) / 8 = 2.5
    assert ukb_score(sim, UKB_GROUPS) == pytest.approx(2.5)


def test_ukb_counts_the_query_itself_and_breaks_ties_by_column():
    # everything ties: every row's top 4 is columns 0-3 (group 0), stable by column index:
    # rows 0-3 score 4 (self included), rows 4-7 score 0 -> 2.0
    assert ukb_score(np.ones((8, 8)), UKB_GROUPS) == pytest.approx(2.0)


def test_copydays_map_by_hand():
    sim = np.array([
        [0.9, 0.1, 0.95, 0.2],  # positive col0: only .95 above -> rank 2 -> 1/2
        [0.3, 0.7, 0.3, 0.3],  # positive col2: .7 above, col0 ties but comes first -> 1/3
    ])
    assert copydays_map(sim, np.array([0, 2])) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert copydays_map(sim, np.array([2, 1])) == pytest.approx(1.0)


def test_topk_accuracy_by_hand():
    logits = np.array([
        [0.1, 0.9, 0.3, 0.2, 0.0, 0.5],  # label 1 is the best -> top-1 and top-5
        [0.6, 0.1, 0.5, 0.4, 0.3, 0.2],  # label 5 is 5th -> top-5 only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0 is 6th -> neither
    ])
    labels = np.array([1, 5, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 4) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 6) == pytest.approx(1.0)


def test_topk_ties_favour_the_lower_class():
    logits = np.zeros((2, 6))
    assert topk_accuracy(logits, np.array([0, 1]), 1) == pytest.approx(0.5)
    assert topk_accuracy(logits, np.array([0, 1]), 2) == pytest.approx(1.0)


def test_micro_ap_by_hand_with_a_missing_positive():
    scores = np.array([0.6, 0.9, 0.7, 0.8])  # ranked: .9 T, .8 F, .7 T, .6 F
    positive = np.array([False, True, True, False])
    # positives in the list only: (1/1 + 2/3) / 2 = 5/6
    assert micro_ap(scores, positive) == pytest.approx(5 / 6)
    # a third ground-truth positive never returned: (1 + 2/3) / 3 = 5/9
    assert micro_ap(scores, positive, n_positives=3) == pytest.approx(5 / 9)
    # ties: list order -> F then T -> 1/2
    assert micro_ap(np.array([0.5, 0.5]), np.array([False, True])) == pytest.approx(0.5)


def test_micro_ap_agrees_with_calibration_pair_metrics():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    family = rng.integers(0, 10, 30)
    upper = np.triu_indices(30, k=1)
    scores = (x @ x.T)[upper]
    positive = family[upper[0]] == family[upper[1]]
    assert micro_ap(scores, positive) == pytest.approx(pair_metrics(x, family).micro_ap)


def test_precision_recall_at_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    positive = np.array([True, False, True, False])
    # >= .75 flags .9 (T) .8 (F): precision 1/2, recall 1/3 of 3 ground-truth positives
    assert precision_recall_at(scores, positive, 0.75, 3) == pytest.approx((1 / 2, 1 / 3))
    # threshold inclusive: >= .7 flags 3, 2 true -> 2/3, 2/3
    assert precision_recall_at(scores, positive, 0.7, 3) == pytest.approx((2 / 3, 2 / 3))
    # nothing flagged: precision 1 (no false alarm), recall 0
    assert precision_recall_at(scores, positive, 1.0, 3) == (1.0, 0.0)
    # default n_positives = positives in the list
    assert precision_recall_at(scores, positive, 0.0) == pytest.approx((1 / 2, 1.0))

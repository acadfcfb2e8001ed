"""Calibration without labels: the estimator on hand-made numbers, then the precision the
calibrated thresholds actually reach on a HELD-OUT generated collection with known copies.

Slack of the held-out check: the held-out set has 20 planted copy pairs, so one false pair
moves the measured precision by about 0.05; demanding >= 0.99 exactly would demand zero false
pairs from an estimate made on 34 other images (F(t) resolves 1/34 false pairs per image).
The assertion allows ONE false pair more than the target permits
(false <= floor((1 - target) * flagged) + 1): the measurement's resolution.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import family_of
from typer.testing import CliRunner

from mgdedup.cli import app
from mgdedup.duplicates.calibration_defaults import DEFAULT_TARGETS
from mgdedup.duplicates.find import find_duplicates
from mgdedup.duplicates.precision import (
    calibrate_index,
    ensure_calibration,
    load_calibration,
    mode_key,
    precision_curve,
    save_calibration,
)
from mgdedup.duplicates.score_norm import ScoreNorm
from mgdedup.imaging.synthetic import make_collection
from mgdedup.index.build import update_index
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexStore
from mgdedup.model.registry import load_model

RESOLUTION = 128
SIZE = (640, 480)
runner = CliRunner()


def _indexed(folder, originals: int, copies_per_edit: int, seed: int):
    collection = make_collection(folder, originals=originals, copies_per_edit=copies_per_edit,
                                 seed=seed, size=SIZE)
    update_index([folder], folder / ".mgdedup", load_model(), "efficientnet-lite0", RESOLUTION,
                 workers=0)
    return collection, folder / ".mgdedup"


@pytest.fixture(scope="module")
def calibration_set(tmp_path_factory):
    """34 images (24 scenes, 10 planted copies): what calibration is run on."""
    return _indexed(tmp_path_factory.mktemp("cal") / "photos", 24, 2, seed=21)


@pytest.fixture
def own_index(calibration_set, tmp_path):
    """A private copy of the calibration set's index folder (its rows still name the
    module's images): tests that store calibrations never see each other's files."""
    _, index_dir = calibration_set
    return Path(shutil.copytree(index_dir, tmp_path / "index"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """60 images (40 scenes, 20 planted copies), another seed: never seen by calibration."""
    return _indexed(tmp_path_factory.mktemp("held") / "photos", 40, 4, seed=22)


# --- the estimator ---------------------------------------------------------------------------
def test_precision_curve_by_hand():
    # 4 synthetic copies score 0.9, 0.8, 0.7, 0.6; two sampled images with neighbours:
    # row 0: 0.85 (a real copy) and 0.3; row 1: 0.5 and 0.2
    positive = np.array([0.9, 0.8, 0.7, 0.6])
    neighbours = np.array([[0.85, 0.3], [0.5, 0.2]])
    curve = precision_curve(positive, neighbours, prior_copy_rate=0.1)
    # F/TPR where TPR >= 0.25: t=.9: (0/2)/.25 = 0 -> the copy rate bound is 0 there
    assert curve.estimated_copy_rate == 0.0
    assert curve.copy_rate == 0.1
    at = {round(float(t), 3): (p, r) for t, p, r in zip(curve.thresholds, curve.precision,
                                                       curve.recall)}
    # t = 0.85: TPR 0.25, F = 1/2 -> 0.1*0.25 / (0.1*0.25 + 0.5)
    assert at[0.85][0] == pytest.approx(0.025 / 0.525)
    assert at[0.9] == (pytest.approx(1.0), pytest.approx(0.25))
    # with the real copy above every synthetic one the bound is tight at t = 0.6
    curve = precision_curve(np.array([0.84, 0.8, 0.7, 0.6]), neighbours, prior_copy_rate=0.0)
    # t=.84: F=.5/TPR .25 = 2; t=.8: .5/.5 = 1; .7: .5/.75; .6: .5/1 = 0.5 -> min 0.5
    assert curve.estimated_copy_rate == pytest.approx(0.5)
    at = {round(float(t), 3): p for t, p in zip(curve.thresholds, curve.precision)}
    assert at[0.6] == pytest.approx(1.0)  # F(.6) = .5 = 0.5 * TPR: no false alarm left
    # t = 0.5: F = 1.0, copies 0.5 * 1 -> precision 0.5
    assert at[0.5] == pytest.approx(0.5)
    assert curve.threshold_for(0.9)[0] == pytest.approx(0.6)


def test_thresholds_below_the_exact_range_are_not_offered():
    curve = precision_curve(np.array([0.9, 0.5]), np.array([[0.4, 0.3]]), exact_from=0.45)
    assert float(curve.thresholds.min()) >= 0.45


# --- held-out precision ----------------------------------------------------------------------
def _pairs(index_dir, collection, norm: ScoreNorm | None):
    """All pair scores of an index (normalised like dedup would) and their ground truth."""
    with IndexStore.open(IndexDir(index_dir).embeddings) as store:
        x = store.embeddings().astype(np.float64)
        paths = store.absolute_paths()
    family = family_of(collection)
    labels = np.array([family[p] for p in paths])
    sim = x @ x.T
    i, j = np.triu_indices(len(x), k=1)
    scores = sim[i, j]
    if norm is not None:  # brute force, independent of mgdedup.duplicates.score_norm
        ranked = sim.copy()
        np.fill_diagonal(ranked, -np.inf)
        ranked = -np.sort(-ranked, axis=1)
        bg = ranked[:, norm.skip:norm.skip + norm.k].mean(axis=1)
        scores = scores - norm.beta * (bg[i] + bg[j]) / 2
    return scores, labels[i] == labels[j]


@pytest.mark.parametrize("norm", [None, ScoreNorm()], ids=["cosine", "normalised"])
def test_calibrated_thresholds_reach_the_target_on_held_out_images(calibration_set, held_out,
                                                                   norm):
    _, index_dir = calibration_set
    calibration = calibrate_index(index_dir, score_norm=norm, workers=0)
    assert calibration.sampled == calibration.probed == 34
    assert calibration.positives == 34 * 7
    assert calibration.mode == mode_key(norm)
    scores, positive = _pairs(held_out[1], held_out[0], norm)
    assert positive.sum() == 20
    print(f"\n[{calibration.mode}] calibrated on 34 images (copy rate estimated "
          f"{calibration.estimated_copy_rate:.3f}); held-out: 60 images, 20 copy pairs")
    for target in DEFAULT_TARGETS:
        found = calibration.threshold_for(target)
        assert found is not None, target
        threshold, estimated, _ = found
        flagged = scores >= threshold
        true = int((flagged & positive).sum())
        false = int((flagged & ~positive).sum())
        reached = true / max(true + false, 1)
        print(f"  target {target:.2f}: threshold {threshold:.4f} (estimated precision "
              f"{estimated:.3f}) -> held-out precision {reached:.3f} ({true} true, {false} "
              f"false pairs), recall {true / positive.sum():.3f}")
        assert estimated >= target
        assert false <= math.floor((1 - target) * (true + false)) + 1, (target, true, false)
        assert true >= 10, "a threshold this high finds too few copies to be useful"


# --- storage and dedup --precision -----------------------------------------------------------
def _fake(index_dir, threshold: float, norm: ScoreNorm | None = None, rows: int | None = None):
    """A stored calibration whose curve reaches precision 0.95 exactly at `threshold`."""
    with IndexStore.open(IndexDir(index_dir).embeddings) as store:
        meta, count = store.meta, len(store)
    from mgdedup.duplicates.precision import Calibration

    calibration = Calibration(
        mode=mode_key(norm), model_id=meta.model_id, whitening_id=meta.whitening_id,
        resolution=meta.resolution, rows=count if rows is None else rows, date="2026-11-23",
        seed=0, sampled=1, positives=1, neighbours=1, estimated_copy_rate=0.1,
        prior_copy_rate=0.1, copy_rate=0.1, exact_from=-1e9,
        curve=[(0.99, 0.97, 0.1), (threshold, 0.95, 0.8), (threshold - 0.1, 0.5, 0.9)],
        score_norm=norm.as_dict() if norm else None)
    save_calibration(index_dir, calibration)
    return calibration


def test_dedup_precision_uses_the_stored_calibration(own_index, monkeypatch):
    index_dir = own_index
    _fake(index_dir, 0.7777, ScoreNorm())  # --precision scores normalised by default
    _fake(index_dir, 0.8888)  # ... and --no-score-norm reads the cosine entry
    import mgdedup.duplicates.precision as module

    def refuse(*args, **kwargs):
        raise AssertionError("a fresh stored calibration must not be recomputed")

    monkeypatch.setattr(module, "calibrate_index", refuse)
    result = runner.invoke(app, ["dedup", "--index", str(index_dir), "--precision", "0.95",
                                 "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["threshold"] == pytest.approx(0.7777)
    assert document["threshold_source"] == "precision"
    assert document["target_precision"] == 0.95
    assert all(m["score"] >= 0.7777 - 1e-6 for g in document["groups"] for m in g["members"])
    assert document["score"] == "sscd-normalised"
    assert "precision 0.95 on this collection" in result.stderr
    cosine = runner.invoke(app, ["dedup", "--index", str(index_dir), "--precision", "0.95",
                                 "--no-score-norm", "--format", "json"], catch_exceptions=False)
    assert cosine.exit_code == 0, cosine.output
    document = json.loads(cosine.stdout)
    assert document["threshold"] == pytest.approx(0.8888) and document["score"] == "cosine"
    # a target above the curve's best is a one-line error
    result = runner.invoke(app, ["dedup", "--index", str(index_dir), "--precision", "0.999"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "not reached" in result.stderr


def test_stale_or_missing_calibration_is_recomputed(own_index, monkeypatch):
    index_dir = own_index
    assert not IndexDir(index_dir).calibration.exists()  # nothing left by other tests
    _fake(index_dir, 0.7, rows=1000)  # calibrated when the index had 1000 rows: stale
    with IndexStore.open(IndexDir(index_dir).embeddings) as store:
        assert load_calibration(index_dir, "cosine").stale_reason(store.meta, len(store))
    calls = []
    import mgdedup.duplicates.precision as module

    def fake_calibrate(where, **options):
        calls.append(options)
        return _fake(where, 0.6)

    monkeypatch.setattr(module, "calibrate_index", fake_calibrate)
    reasons = []
    result = find_duplicates(index_dir, precision=0.95, on_calibrate=reasons.append)
    assert len(calls) == 1 and "1000" in reasons[0]
    assert result.threshold == pytest.approx(0.6) and result.threshold_source == "precision"
    # the normalised mode has its own entry, missing so far
    assert load_calibration(index_dir, mode_key(ScoreNorm())) is None
    ensure_calibration(index_dir, ScoreNorm())
    assert len(calls) == 2 and calls[1]["score_norm"] == ScoreNorm()
    stored = json.loads(IndexDir(index_dir).calibration.read_text())
    assert set(stored["modes"]) == {"cosine"}  # the fake above saved the cosine mode again


def test_precision_with_threshold_is_a_one_line_usage_error(calibration_set):
    _, index_dir = calibration_set
    result = runner.invoke(app, ["dedup", "--index", str(index_dir), "--precision", "0.95",
                                 "--threshold", "0.5"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not both" in lines[0]


def test_calibrate_command_prints_and_stores_thresholds(own_index):
    index_dir = own_index
    result = runner.invoke(app, ["calibrate", "--index", str(index_dir), "--sample", "6",
                                 "--aug-copies", "1", "--workers", "0", "--json",
                                 "-p", "0.9", "-p", "0.5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [row["target_precision"] for row in document["targets"]] == [0.5, 0.9]
    assert document["sampled"] == 6 and document["positives"] == 6 * 6
    stored = load_calibration(index_dir, mode_key(ScoreNorm()))  # the default mode
    assert stored is not None and stored.rows == 34 and stored.sampled == 6
    for row in document["targets"]:
        found = stored.threshold_for(row["target_precision"])
        assert (found[0] if found else None) == row["threshold"]
    table = runner.invoke(app, ["calibrate", "--index", str(index_dir), "--sample", "3",
                                "--aug-copies", "0", "--workers", "0"])
    assert table.exit_code == 0, table.output
    assert "0.95" in table.stdout and "threshold" in table.stdout

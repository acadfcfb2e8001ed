"""tune-p: one trunk pass for the whole grid, p* into the model file, whitening policy, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import photo
from typer.testing import CliRunner

from mgdedup.cli import app
from mgdedup.errors import MgdedupError
from mgdedup.evaluation.inaug import build_inaug, inaug_metrics
from mgdedup.imaging.transforms import resize_for_resolution, to_tensor
from mgdedup.model.model_file import load_model_file
from mgdedup.model.registry import load_model
from mgdedup.tuning import p_star as tuning

runner = CliRunner()
RESOLUTION = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    for n in range(4):
        photo(140, 100, seed=40 + n).save(root / f"p{n}.jpg")
    return root


def test_grid_equals_embedding_at_each_p(folder, monkeypatch):
    """GeM of the shared feature maps = the model's own forward at that p, and the
    metrics are those of l2n(g)."""
    model = load_model()
    inaug = build_inaug(folder, 3, seed=2)
    grid = (1.0, 3.0, 6.0)
    vectors, ok = tuning.gem_grid(model, inaug, RESOLUTION, grid, workers=0)
    assert ok.all() and vectors.shape == (3, 15, model.feature_dim)
    tensors = [to_tensor(resize_for_resolution(c, RESOLUTION))
               for i in range(3) for c in inaug.make_copies(i, RESOLUTION)]
    with torch.inference_mode():
        expected = model.gem(torch.stack(tensors), 6.0).numpy()
    np.testing.assert_allclose(vectors[2], expected, rtol=1e-3, atol=1e-4)
    monkeypatch.setattr(tuning, "gem_grid", lambda *args, **kwargs: (vectors, ok))
    metrics, rows = tuning.score_grid(model, inaug, RESOLUTION, grid, workers=0)
    assert rows == 15
    x = F.normalize(torch.from_numpy(expected), dim=1).numpy()
    for name, value in inaug_metrics(x, inaug.groups).items():
        assert metrics[6.0][name] == pytest.approx(value, abs=1e-4)


def test_best_p_breaks_ties_towards_the_current_p():
    metrics = {p: {"score": s} for p, s in ((1.0, 4.5), (2.0, 4.8), (4.0, 4.8), (5.0, 4.1))}
    assert tuning.best_p(metrics, current=3.0) == 2.0  # equally close: the smaller
    assert tuning.best_p(metrics, current=4.0) == 4.0
    metrics[5.0]["score"] = 4.9
    assert tuning.best_p(metrics, current=1.0) == 5.0


def test_changing_p_drops_the_whitening_of_that_resolution():
    model = load_model()
    assert {224, 500} <= set(model.whitenings) and model.whitenings[224].p == 3.0
    tuned, messages = tuning.with_p_star(model, {224: 2.0, 500: 3.0})
    assert 224 not in tuned.whitenings and 500 in tuned.whitenings
    assert any("dropped its whitening" in m and "s*=224" in m for m in messages)
    assert tuned.p_for(224) == 2.0 and tuned.p_for(500) == 3.0
    assert model.info.p_star == load_model().info.p_star  # the cached model is untouched
    assert 224 in model.whitenings


def test_cli_writes_p_star_read_back_by_load_model_file(folder, tmp_path, monkeypatch):
    def fake_scores(model, inaug, resolution, grid, **kwargs):
        best = {RESOLUTION: 2.0, 128: 5.0}[resolution]
        return {p: {"score": 5.0 - abs(p - best), "map": 0.5, "micro_ap": 0.5}
                for p in grid}, len(inaug)

    monkeypatch.setattr(tuning, "score_grid", fake_scores)
    out = tmp_path / "tuned.pt"
    result = runner.invoke(app, ["tune-p", str(folder), "--resolutions", f"{RESOLUTION},128",
                                 "--grid", "1,2,3,5", "-k", "3", "--out", str(out), "--json",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["p_star"] == {str(RESOLUTION): 2.0, "128": 5.0}
    assert set(report["resolutions"]["128"]["metrics"]) == {"1", "2", "3", "5"}
    loaded = load_model_file(out)
    # merged into the model's own table (the default's measured 224 and 500 entries)
    assert loaded.info.p_star == {**load_model().info.p_star, RESOLUTION: 2.0, 128: 5.0}
    assert loaded.p_for(RESOLUTION) == 2.0 and loaded.p_for(96) == pytest.approx(3.5)
    assert f"wrote {out}" in result.stderr.replace("\n", "")

    again = runner.invoke(app, ["tune-p", str(folder), "--resolutions", "64", "--grid", "1,2",
                                "--out", str(out)])
    assert again.exit_code == 1
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "already exists" in lines[0]


def test_cli_real_grid_on_tiny_images(folder, tmp_path):
    out = tmp_path / "real.pt"
    result = runner.invoke(app, ["tune-p", str(folder), "--resolutions", str(RESOLUTION),
                                 "--grid", "1,4", "-k", "2", "--out", str(out), "--json",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    # the IN-aug score computed here: the copies embedded by the model's own forward at each
    # p, then per query the number of its own copies among its 5 nearest (itself included)
    model = load_model()
    inaug = build_inaug(folder, 2, seed=0)
    tensors = [to_tensor(resize_for_resolution(c, RESOLUTION))
               for i in range(2) for c in inaug.make_copies(i, RESOLUTION)]
    scores = {}
    for p in (1.0, 4.0):
        with torch.inference_mode():
            x = F.normalize(model.gem(torch.stack(tensors), p), dim=1).double().numpy()
        scores[p] = _top5_own_copies(x, np.repeat(np.arange(2), inaug.copies))
        assert report["resolutions"][str(RESOLUTION)]["metrics"][f"{p:g}"]["score"] == \
            pytest.approx(scores[p], abs=1e-6)
    # the best p (a tie goes to the one nearer the model's p* of 3)
    best = 4.0 if scores[4.0] >= scores[1.0] else 1.0
    assert report["p_star"][str(RESOLUTION)] == best
    assert load_model_file(out).p_for(RESOLUTION) == best


def _top5_own_copies(x: np.ndarray, groups: np.ndarray) -> float:
    """Mean count of a row's own group among its 5 most similar rows (itself included;
    ties broken by row order), by an explicit loop."""
    counts = []
    for row in range(len(x)):
        similarity = x @ x[row]
        order = sorted(range(len(x)), key=lambda j: (-round(similarity[j], 12), j))[:5]
        counts.append(sum(groups[j] == groups[row] for j in order))
    return float(np.mean(counts))


def test_bad_grid_is_a_user_error(folder, tmp_path):
    result = runner.invoke(app, ["tune-p", str(folder), "--grid", "1,x",
                                 "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 1 and "--grid" in result.stderr
    with pytest.raises(MgdedupError):
        tuning.tune(load_model(), build_inaug(folder, 2), [RESOLUTION], grid=())

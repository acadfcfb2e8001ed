"""`mgdedup eval ...` on small generated layouts: JSON values equal metrics computed here
from the model's own embeddings; wrong layouts are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image
from typer.testing import CliRunner

from mgdedup.cli import app
from mgdedup.embedding.embedder import Embedder
from mgdedup.evaluation import metrics
from mgdedup.evaluation.inaug import build_inaug, inaug_metrics
from mgdedup.imaging.transforms import resize_for_resolution, to_tensor
from mgdedup.model.registry import load_model

runner = CliRunner()
RESOLUTION = 64
CONTEXT = {"model", "fingerprint", "resolution", "p", "whitening", "images", "embedded",
           "cache", "benchmark"}


def _descriptors(paths) -> np.ndarray:
    model = load_model()
    out = {}
    for batch in Embedder(model, RESOLUTION, workers=0).embed_files(paths, digest=False):
        for k, position in enumerate(batch.positions):
            out[position] = batch.descriptors.descriptors[k]
    return np.stack([out[i] for i in range(len(paths))])


def _scene(seed: int, variant: int):
    """A variant (crop / shift) of one generated scene: copies look alike, scenes do not."""
    return photo(180, 130, seed=seed).crop((variant * 6, variant * 3,
                                            150 + variant * 6, 110 + variant * 3))


def _run(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "-r", str(RESOLUTION), "--json",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _one_line_error(*args: str) -> str:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 1, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def ukb(tmp_path_factory):
    root = tmp_path_factory.mktemp("ukb")
    (root / "full").mkdir()
    for n in range(8):
        _scene(100 + n // 4, n % 4).save(root / "full" / f"ukbench{n:05d}.jpg")
    return root


def test_eval_ukb_json(ukb, tmp_path):
    result = _run("ukb", str(ukb), "--cache", str(tmp_path))
    assert set(result) == {"score"} | CONTEXT
    paths = sorted((ukb / "full").iterdir())
    x = _descriptors(paths)
    expected = metrics.ukb_score(x @ x.T, np.arange(8) // 4)
    assert result["score"] == pytest.approx(expected, abs=1e-6)
    assert result["images"] == 8 and result["embedded"] == 8
    assert result["resolution"] == RESOLUTION and result["p"] == load_model().p_for(RESOLUTION)


def test_eval_holidays_json(tmp_path):
    root = tmp_path / "holidays"
    (root / "jpg").mkdir(parents=True)
    ids = [100000, 100001, 100002, 100100, 100101, 100200, 100201]
    for n, number in enumerate(ids):
        _scene(200 + number // 100 % 10, n % 3).save(root / "jpg" / f"{number}.jpg")
    result = _run("holidays", str(root), "--cache", str(tmp_path / "cache"))
    assert set(result) == {"map", "map_trapezoid", "queries", "rotated"} | CONTEXT
    x = _descriptors([root / "jpg" / f"{n}.jpg" for n in ids])
    groups = np.array(ids) // 100
    queries = np.array([0, 3, 5])
    assert result["queries"] == 3
    assert result["map"] == pytest.approx(
        metrics.holidays_map(x[queries] @ x.T, queries, groups), abs=1e-6)
    assert result["map_trapezoid"] == pytest.approx(
        metrics.holidays_map(x[queries] @ x.T, queries, groups, trapezoid=True), abs=1e-6)


def test_eval_pairs_json(tmp_path):
    root = tmp_path / "pairs"
    (root / "edits").mkdir(parents=True)
    for n in range(4):
        _scene(300 + n, 0).save(root / f"o{n}.jpg")
    _scene(300, 2).save(root / "edits" / "o0_crop.jpg")
    _scene(301, 1).save(root / "edits" / "o1_crop.jpg")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"groups": [["o0.jpg", "edits/o0_crop.jpg"],
                                         ["o1.jpg", "edits/o1_crop.jpg"]]}))
    result = runner.invoke(app, ["eval", "pairs", str(gt), str(root), "-r", str(RESOLUTION),
                                 "--json", "--workers", "0", "--cache", str(tmp_path / "c"),
                                 "--threshold", "0.5"])
    assert result.exit_code == 0, result.stderr
    result = json.loads(result.stdout)
    assert set(result) == {"micro_ap", "map", "threshold", "precision", "recall",
                           "positive_pairs", "pairs"} | CONTEXT
    names = ["edits/o0_crop.jpg", "edits/o1_crop.jpg", "o0.jpg", "o1.jpg", "o2.jpg", "o3.jpg"]
    x = _descriptors([root / n for n in names])
    groups = np.array([0, 1, 0, 1, 2, 3])
    upper = np.triu_indices(6, k=1)
    scores = (x @ x.T)[upper]
    positive = groups[upper[0]] == groups[upper[1]]
    assert result["pairs"] == 15 and result["positive_pairs"] == 2
    assert result["micro_ap"] == pytest.approx(metrics.micro_ap(scores, positive), abs=1e-6)
    queries = np.array([0, 1, 2, 3])
    assert result["map"] == pytest.approx(
        metrics.holidays_map((x @ x.T)[queries], queries, groups), abs=1e-6)
    precision, recall = metrics.precision_recall_at(scores, positive, 0.5)
    assert (result["precision"], result["recall"]) == pytest.approx((precision, recall))


def test_eval_inaug_json(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for n in range(4):
        _scene(400 + n, 0).save(root / f"s{n}.jpg")
    result = _run("inaug", str(root), "-k", "3", "--seed", "5", "--cache", str(tmp_path / "c"))
    assert {"score", "map", "micro_ap", "raw_score", "raw_map", "raw_micro_ap", "sources",
            "copies", "seed", "copy_size"} | CONTEXT == set(result)
    model = load_model()
    inaug = build_inaug(root, 3, seed=5)
    tensors = [to_tensor(resize_for_resolution(c, RESOLUTION))
               for i in range(3) for c in inaug.make_copies(i, RESOLUTION)]
    with torch.inference_mode():
        g = model.gem(torch.stack(tensors), model.p_for(RESOLUTION))
    expected = inaug_metrics(model.describe(g, RESOLUTION).descriptors, inaug.groups)
    assert result["images"] == 15 and result["sources"] == 3 and result["seed"] == 5
    for name in ("score", "map", "micro_ap"):
        assert result[name] == pytest.approx(expected[name], abs=1e-4)
    assert 1.0 <= result["score"] <= 5.0


def test_wrong_layouts_are_one_line_errors(ukb, tmp_path):
    assert "no jpg/ folder" in _one_line_error("holidays", str(ukb))
    (tmp_path / "empty").mkdir()
    assert "ukbench" in _one_line_error("ukb", str(tmp_path / "empty"))
    assert "not a folder" in _one_line_error("copydays", str(tmp_path / "missing"))
    assert "class folder" in _one_line_error("imagenet", str(ukb / "full"))
    gt = tmp_path / "gt.json"
    gt.write_text('{"groups": [["nope.jpg", "ukbench00000.jpg"]]}')
    assert "nope.jpg" in _one_line_error("pairs", str(gt), str(ukb / "full"))
    assert "at least 2" in _one_line_error("inaug", str(tmp_path / "empty"))


def test_eval_holidays_rotates_listed_images(tmp_path):
    root = tmp_path / "holidays"
    (root / "jpg").mkdir(parents=True)
    ids = [100000, 100001, 100100, 100101]
    for n, number in enumerate(ids):
        _scene(500 + number // 100 % 10, n % 2).save(root / "jpg" / f"{number}.jpg")
    rotate = tmp_path / "rotate.txt"
    rotate.write_text("# name angle\n100001.jpg 90\n")
    result = _run("holidays", str(root), "--rotate-file", str(rotate),
                  "--cache", str(tmp_path / "c"))
    assert result["rotated"] == 1
    turned = tmp_path / "turned.png"  # lossless: the same pixels the runner rotates in memory
    Image.open(root / "jpg" / "100001.jpg").convert("RGB").rotate(90, expand=True).save(turned)
    x = _descriptors([root / "jpg" / "100000.jpg", turned, root / "jpg" / "100100.jpg",
                      root / "jpg" / "100101.jpg"])
    queries = np.array([0, 2])
    expected = metrics.holidays_map(x[queries] @ x.T, queries, np.array(ids) // 100)
    assert result["map"] == pytest.approx(expected, abs=1e-6)


def test_eval_copydays_json(tmp_path):
    root = tmp_path / "copydays"
    for name in ("original", "strong"):
        (root / name).mkdir(parents=True)
    (tmp_path / "distractors" / "a").mkdir(parents=True)
    for n, number in enumerate((200000, 200100)):
        _scene(600 + n, 0).save(root / "original" / f"{number}.jpg")
        _scene(600 + n, 3).save(root / "strong" / f"{number + 1}_strong.jpg")
    for n in range(2):
        _scene(700 + n, 0).save(tmp_path / "distractors" / "a" / f"d{n}.jpg")
    result = _run("copydays", str(root), "--distractors", str(tmp_path / "distractors"),
                  "--cache", str(tmp_path / "c"))
    assert set(result) == {"map", "queries", "distractors"} | CONTEXT
    database = [root / "original" / "200000.jpg", root / "original" / "200100.jpg",
                tmp_path / "distractors" / "a" / "d0.jpg",
                tmp_path / "distractors" / "a" / "d1.jpg"]
    queries = [root / "strong" / "200001_strong.jpg", root / "strong" / "200101_strong.jpg"]
    x = _descriptors(database + queries)
    expected = metrics.copydays_map(x[4:] @ x[:4].T, np.array([0, 1]))
    assert result["queries"] == 2 and result["distractors"] == 2
    assert result["map"] == pytest.approx(expected, abs=1e-6)


def test_eval_imagenet_json(tmp_path):
    root = tmp_path / "imagenet" / "val"
    model = load_model()
    names = [f"n{i:08d}" for i in range(len(model.class_names))]
    for name in names:
        (root / name).mkdir(parents=True)
    paths = [root / names[3] / "a.jpg", root / names[3] / "b.jpg", root / names[900] / "c.jpg"]
    for n, path in enumerate(paths):
        _scene(800 + n, 0).save(path)
    result = _run("imagenet", str(tmp_path / "imagenet"), "--cache", str(tmp_path / "c"))
    assert set(result) == {"top1", "top5"} | CONTEXT
    gem = np.concatenate([b.gem.numpy() for b in Embedder(model, RESOLUTION, workers=0)
                          .embed_files(paths, digest=False, keep_gem=True)])
    with torch.inference_mode():
        logits = model.logits(torch.from_numpy(gem)).numpy()
    labels = np.array([3, 3, 900])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert result["top1"] == pytest.approx(float((top5[:, 0] == labels).mean()))
    assert result["top5"] == pytest.approx(float((top5 == labels[:, None]).any(axis=1).mean()))

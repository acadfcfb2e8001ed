"""Held-out copy retrieval for `train --images`: the split, the score against a reference
computation, and the trainer keeping the best model (also across a resume)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from training_helpers import make_unlabelled, state_digest

from mgdedup.imaging.edits import EDITS
from mgdedup.model.model_file import load_model_file
from mgdedup.training.config import TrainConfig
from mgdedup.training.copy_validation import (
    MAX_HELD_OUT,
    MIN_AGREEMENT,
    MIN_IMAGES_FOR_HOLD_OUT,
    CopyScore,
    CopyValidation,
    held_out_count,
    reciprocal_ranks,
    split_held_out,
)
from mgdedup.training.loop import BEST_NAME, Trainer


# --- the split ------------------------------------------------------------------------------
def test_held_out_count_is_a_tenth_within_bounds():
    assert held_out_count(MIN_IMAGES_FOR_HOLD_OUT - 1) == 0
    assert held_out_count(MIN_IMAGES_FOR_HOLD_OUT) == 8  # a tenth would be 4: at least 8
    assert held_out_count(400) == 40
    assert held_out_count(50_000) == MAX_HELD_OUT


def test_split_depends_on_relative_paths_only(tmp_path):
    """The same files listed in another order, or the folder moved, hold out the same images;
    the two parts partition the list."""
    names = [f"sub{i % 3}/img{i:03d}.jpg" for i in range(60)]
    paths = [tmp_path / "a" / n for n in names]
    train, held = split_held_out(paths, tmp_path / "a")
    assert sorted(train + held) == list(range(60)) and len(held) == 8
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    moved = [tmp_path / "b" / n for n in shuffled]
    _, held_moved = split_held_out(moved, tmp_path / "b")
    assert {shuffled[i] for i in held_moved} == {names[i] for i in held}


# --- the score ------------------------------------------------------------------------------
def test_reciprocal_ranks_match_a_loop():
    rng = np.random.default_rng(0)
    database = rng.integers(-2, 3, (30, 4)).astype(np.float64)  # small integers: many ties
    queries = rng.integers(-2, 3, (50, 4)).astype(np.float64)
    owners = rng.integers(0, 30, 50)
    expected = []
    for q, owner in zip(queries, owners, strict=True):
        own = q @ database[owner]
        rank = 1 + sum(1 for row in database if q @ row > own)
        expected.append(1.0 / rank)
    np.testing.assert_allclose(reciprocal_ranks(queries, owners, database), expected)


def _projection_embed(seed: int):
    """A fixed random linear map of 4x4-pooled pixels (GeM stand-in) and of the result
    (classifier stand-in): deterministic, and different images get different vectors."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(48, 24, generator=generator)
    classes = torch.randn(24, 5, generator=generator)

    def embed(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        g = pooled @ features
        return g, g @ classes

    return embed


def _reference_map(queries, owners, database, whiten: bool) -> float:
    """Floored whitening fitted on the database by hand (eigenvalues below the smallest
    nonzero one raised to it, as at rank < 512), then 1/rank by a loop."""
    def l2n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    queries, database = l2n(queries.astype(np.float64)), l2n(database.astype(np.float64))
    if whiten:
        mean = database.mean(axis=0)
        centred = database - mean
        values, vectors = np.linalg.eigh(centred.T @ centred / (len(database) - 1))
        values, vectors = values[::-1], vectors[:, ::-1]
        rank = int((values > values[0] * 1e-10 + 1e-12).sum())
        scales = 1.0 / np.sqrt(np.maximum(values, values[rank - 1]))
        matrix = (vectors * scales) @ vectors.T
        queries = l2n((queries - mean) @ matrix.T)
        database = l2n((database - mean) @ matrix.T)
    total = 0.0
    for q, owner in zip(queries, owners, strict=True):
        own = q @ database[owner]
        total += 1.0 / (1 + sum(1 for row in database if q @ row > own + 1e-9))
    return total / len(queries)


def test_score_matches_a_reference_computation(tmp_path):
    originals = make_unlabelled(tmp_path / "held", 6, seed=1)
    distractors = make_unlabelled(tmp_path / "train", 10, seed=2)
    validation = CopyValidation(originals, distractors, resolution=32, augmented_copies=2)
    copies_per_image = 2 + len(EDITS)
    assert len(validation) == 6 and len(validation.queries) == 6 * copies_per_image
    assert list(validation.owners) == [i for i in range(6) for _ in range(copies_per_image)]

    embed = _projection_embed(0)
    score = validation.score(embed)

    def vectors(images):
        return embed(torch.stack(images).float() / 255.0)[0].numpy()

    q = vectors(validation.queries)
    db = np.concatenate([vectors(validation.originals), vectors(validation.distractors)])
    assert score.database == 16 and score.queries == len(q)
    assert score.map_l2n == pytest.approx(_reference_map(q, validation.owners, db, False),
                                          abs=1e-6)
    assert score.map_whitened == pytest.approx(_reference_map(q, validation.owners, db, True),
                                               abs=1e-4)
    assert score.agreement == 1.0  # no reference classes given

    other = _projection_embed(5)
    expected_top1 = embed(torch.stack(validation.originals).float() / 255.0)[1].argmax(1)
    other_top1 = other(torch.stack(validation.originals).float() / 255.0)[1].argmax(1)
    expected = float((expected_top1 == other_top1).double().mean())
    assert score.top1 == expected_top1.tolist()
    assert validation.score(other, reference_top1=score.top1).agreement == pytest.approx(expected)


def test_unreadable_held_out_image_is_skipped(tmp_path, caplog):
    originals = make_unlabelled(tmp_path / "held", 3, seed=1)
    broken = tmp_path / "held" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with caplog.at_level("WARNING"):
        validation = CopyValidation([originals[0], broken, originals[1]], [], resolution=32,
                                    augmented_copies=1)
    assert len(validation) == 2 and "broken.jpg" in caplog.text
    assert set(validation.owners.tolist()) == {0, 1}


# --- the trainer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    make_unlabelled(folder, MIN_IMAGES_FOR_HOLD_OUT, seed=7, size=(48, 40))
    return folder


def finetune_config(photos: Path, run_dir: Path, **changes) -> TrainConfig:
    base = {"images": str(photos), "init": "default", "run_dir": str(run_dir), "epochs": 3,
            "iters_per_epoch": 1, "batch_size": 6, "milestones": [], "workers": 0,
            "resolution": 32, "whiten": False, "log_every": 1, "device": "cpu"}
    return TrainConfig(**{**base, **changes})


class ScriptedScores:
    """Stands in for CopyValidation.score: the score of the trainer's current iteration from
    a table, so the test decides which checkpoint is best; records the weights scored."""

    def __init__(self, table: dict[int, tuple[float, float]]) -> None:
        self.table = table
        self.trainer: Trainer | None = None
        self.digests: dict[int, str] = {}

    def install(self, monkeypatch) -> ScriptedScores:
        monkeypatch.setattr(CopyValidation, "score",
                            lambda validation, embed, device="cpu", reference_top1=None:
                            self(validation))
        return self

    def __call__(self, validation: CopyValidation) -> CopyScore:
        iteration = self.trainer.iteration
        self.digests[iteration] = state_digest(self.trainer.model.trunk)
        map_whitened, agreement = self.table[iteration]
        return CopyScore(map_whitened=map_whitened, map_l2n=0.0, agreement=agreement,
                         queries=len(validation.queries), database=1)


def events(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


def test_finetuning_writes_the_checkpoint_that_retrieved_held_out_copies_best(
        photos, tmp_path, monkeypatch):
    """Validation at the start and after each epoch; iteration 2 scores highest but no longer
    classifies like the initial model, so iteration 1 is written; held-out images never
    enter training."""
    scores = ScriptedScores({0: (0.5, 1.0), 1: (0.6, 0.95), 2: (0.9, MIN_AGREEMENT - 0.1),
                             3: (0.55, 1.0)}).install(monkeypatch)
    trainer = Trainer(finetune_config(photos, tmp_path / "run"))
    scores.trainer = trainer
    assert len(trainer.held_out) == 8 and len(trainer.dataset) == MIN_IMAGES_FOR_HOLD_OUT - 8
    assert not set(trainer.held_out) & set(trainer.train_files.paths)
    out = trainer.fit()

    validations = events(tmp_path / "run", "copy_validation")
    assert [(v["iteration"], v["best"]) for v in validations] == \
        [(0, True), (1, True), (2, False), (3, False)]
    assert len(set(scores.digests.values())) == 4  # the model did change between them
    assert state_digest(load_model_file(out).trunk) == scores.digests[1]
    selected = events(tmp_path / "run", "selected")[0]
    assert (selected["iteration"], selected["last_iteration"]) == (1, 3)
    assert selected["initial_map_whitened"] == 0.5 and selected["map_whitened"] == 0.6
    assert (tmp_path / "run" / BEST_NAME).exists()


def test_initial_model_is_written_when_fine_tuning_does_not_help(photos, tmp_path, monkeypatch,
                                                                caplog):
    scores = ScriptedScores({0: (0.7, 1.0), 1: (0.6, 1.0), 2: (0.7, 1.0), 3: (0.65, 1.0)})
    scores.install(monkeypatch)
    trainer = Trainer(finetune_config(photos, tmp_path / "run"))
    scores.trainer = trainer
    with caplog.at_level("WARNING"):
        out = trainer.fit()
    assert state_digest(load_model_file(out).trunk) == scores.digests[0]  # a tie is no gain
    assert "did not improve copy retrieval" in caplog.text


def test_resume_keeps_the_best_found_before_the_interruption(photos, tmp_path, monkeypatch):
    """Stopped after iteration 2 (best so far: 1) and resumed: the written model is the one
    of iteration 1 from before the stop, the same as an uninterrupted run writes."""
    table = {0: (0.5, 1.0), 1: (0.8, 1.0), 2: (0.6, 1.0), 3: (0.7, 1.0)}
    straight_scores = ScriptedScores(table).install(monkeypatch)
    straight = Trainer(finetune_config(photos, tmp_path / "a"))
    straight_scores.trainer = straight
    straight_out = straight.fit()

    scores = ScriptedScores(table).install(monkeypatch)
    first = Trainer(finetune_config(photos, tmp_path / "b", stop_after=2))
    scores.trainer = first
    first.fit()
    resumed = Trainer(finetune_config(photos, tmp_path / "b",
                                      resume=str(tmp_path / "b" / "last.ckpt")))
    scores.trainer = resumed
    out = resumed.fit()
    assert sorted(scores.digests) == [0, 1, 2, 3]  # the initial model was not scored again
    assert resumed.best["iteration"] == 1
    assert state_digest(load_model_file(out).trunk) == \
        state_digest(load_model_file(straight_out).trunk) == straight_scores.digests[1]


def test_keep_last_trains_on_every_image_and_scores_nothing(photos, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise AssertionError("no validation with --keep-last")

    monkeypatch.setattr(CopyValidation, "score", fails)
    trainer = Trainer(finetune_config(photos, tmp_path / "run", select_best=False, epochs=1))
    assert trainer.held_out == [] and len(trainer.dataset) == MIN_IMAGES_FOR_HOLD_OUT
    trainer.fit()
    assert events(tmp_path / "run", "copy_validation") == []
    assert not (tmp_path / "run" / BEST_NAME).exists()


def test_cli_reports_held_out_retrieval_and_the_model_kept(photos, tmp_path):
    """The real score through `mgdedup train`: a line per validation and one for the choice."""
    result = run("train", "--images", photos, "--init", "default", "--out", tmp_path / "t.pt",
                 "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "6",
                 "--resolution", "32", "--no-whiten", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"training on {MIN_IMAGES_FOR_HOLD_OUT - 8} images" in result.output
    assert "held-out copies at iteration 0: mAP" in result.output
    assert "held-out copies at iteration 1: mAP" in result.output
    selected = events(tmp_path / "t.run", "selected")[0]
    if selected["iteration"] == 1:
        assert "writing the model of iteration 1: held-out copy mAP" in result.output
    else:
        assert "did not improve copy retrieval" in result.output
    validations = events(tmp_path / "t.run", "copy_validation")
    assert [v["iteration"] for v in validations] == [0, 1]
    assert all(0.0 < v["map_whitened"] <= 1.0 and v["queries"] == 8 * 9 for v in validations)
    assert validations[0]["agreement"] == 1.0


def test_cli_names_the_checkpoint_it_writes(photos, tmp_path, monkeypatch):
    """When a checkpoint beats the initial model, the CLI says which one and by how much."""
    calls: list[int] = []

    def rising(validation, embed, device="cpu", reference_top1=None) -> CopyScore:
        calls.append(len(calls))
        return CopyScore(map_whitened=0.5 + 0.1 * len(calls), map_l2n=0.0, agreement=1.0,
                         queries=len(validation.queries), database=1)

    monkeypatch.setattr(CopyValidation, "score", rising)
    result = run("train", "--images", photos, "--init", "default", "--out", tmp_path / "t.pt",
                 "--epochs", "2", "--iters-per-epoch", "1", "--batch-size", "6",
                 "--resolution", "32", "--no-whiten", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(calls) == 3
    assert "writing the model of iteration 2: held-out copy mAP 0.6000 -> 0.8000" \
        in result.output
    assert "did not improve" not in result.output

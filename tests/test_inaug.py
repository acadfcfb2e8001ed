"""IN-aug surrogate: seeded picks in both layouts, deterministic copies, hand-computed scores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import photo

from mgdedup.errors import MgdedupError
from mgdedup.evaluation.inaug import (
    COPIES,
    InaugTensors,
    build_inaug,
    copy_size_for,
    group_topk_score,
    inaug_metrics,
    select_sources,
)


@pytest.fixture
def flat(tmp_path):
    for n in range(12):
        folder = tmp_path / "flat" / ("sub" if n % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        photo(90 + n, 70, seed=n).save(folder / f"img{n:02d}.jpg")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    return tmp_path / "flat"


@pytest.fixture
def classes(tmp_path):
    for c in range(5):
        folder = tmp_path / "imagenet" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for n in range(4):
            photo(80, 60, seed=10 * c + n).save(folder / f"x{n}.jpg")
    return tmp_path / "imagenet"


def test_flat_pick_is_seeded_and_sized(flat):
    root, first = select_sources(flat, 5, seed=3)
    _, again = select_sources(flat, 5, seed=3)
    _, other = select_sources(flat, 5, seed=4)
    assert root == flat and first == again and len(first) == 5
    assert first != other
    assert all(p.suffix == ".jpg" for p in first)
    assert any(p.parent.name == "sub" for p in select_sources(flat, 12, seed=0)[1])
    _, everything = select_sources(flat, None, seed=0)
    assert len(everything) == 12
    _, kept = select_sources(flat, None, seed=0, exclude=("sub",))
    assert len(kept) == 8 and all(p.parent.name != "sub" for p in kept)


def test_classes_layout_picks_per_class(classes):
    root, sources = select_sources(classes, 6, seed=1, per_class=2)
    assert root == classes / "train"
    by_class: dict[str, int] = {}
    for path in sources:
        by_class[path.parent.name] = by_class.get(path.parent.name, 0) + 1
    assert len(sources) == 6 and sorted(by_class.values()) == [2, 2, 2]
    assert select_sources(classes, 6, seed=1, per_class=2)[1] == sources
    _, all_classes = select_sources(classes, None, seed=0, per_class=1)
    assert len({p.parent.name for p in all_classes}) == 5 and len(all_classes) == 5
    _, flat_pick = select_sources(classes, 7, seed=0, layout="flat")
    assert len(flat_pick) == 7


def test_layout_errors_are_one_line(flat, tmp_path):
    with pytest.raises(MgdedupError, match="not in ImageFolder layout"):
        select_sources(flat, 4, layout="classes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MgdedupError, match="at least 2"):
        select_sources(tmp_path / "empty", 4)
    with pytest.raises(MgdedupError, match="not a folder"):
        select_sources(tmp_path / "missing", 4)


def test_copies_are_deterministic_k_by_5(flat):
    inaug = build_inaug(flat, 3, seed=7)
    assert len(inaug) == 3 * COPIES
    assert inaug.groups.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    a = inaug.make_copies(1, 96)
    b = build_inaug(flat, 3, seed=7).make_copies(1, 96)
    c = build_inaug(flat, 3, seed=8)
    assert len(a) == COPIES and all(im.size == (copy_size_for(96),) * 2 for im in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # copies differ
    same_source = c.sources.index(inaug.sources[1]) if inaug.sources[1] in c.sources else None
    if same_source is not None:  # another seed: other copies of the same image
        assert not np.array_equal(np.asarray(a[0]),
                                  np.asarray(c.make_copies(same_source, 96)[0]))
    keys = inaug.row_keys(96)
    assert len(set(keys)) == 15 and keys[5].endswith("#inaug-110-7-0")


def test_copy_size_follows_the_pipeline():
    assert copy_size_for(224) == 256 and copy_size_for(500) == 500
    assert copy_size_for(128) == 146


def test_tensors_have_the_test_resolution_shape(flat):
    inaug = build_inaug(flat, 2, seed=0)
    _, small = InaugTensors(inaug, 96)[0]
    _, large = InaugTensors(inaug, 300)[1]
    assert [tuple(t.shape) for t in small] == [(3, 96, 96)] * 5
    assert [tuple(t.shape) for t in large] == [(3, 300, 300)] * 5


def test_score_is_5_for_a_perfect_embedding():
    groups = np.repeat(np.arange(4), 5)
    x = np.eye(4, dtype=np.float32)[groups]  # one direction per group
    result = inaug_metrics(x, groups)
    assert result == {"score": 5.0, "map": 1.0, "micro_ap": 1.0}


def test_score_by_hand_with_ties():
    groups = np.repeat([0, 1], 5)
    similarity = np.eye(10) * 2.0
    similarity[0, 5] = 1.5  # row 0: itself, then a wrong image, then columns 1, 2, 3
    # rows 1-4: itself + the lowest other columns (0..4): 5 right; rows 5-9: itself + 0..3: 1
    assert group_topk_score(similarity, groups) == pytest.approx((4 + 4 * 5 + 5 * 1) / 10)


def test_metrics_by_hand_on_a_toy_embedding():
    # 2 groups of 5; copy 4 of group 0 points to group 1, everything else is perfect
    groups = np.repeat([0, 1], 5)
    x = np.array([[1, 0]] * 4 + [[0, 1]] + [[0, 1]] * 5, dtype=np.float32)
    result = inaug_metrics(x, groups)
    # score: rows 0-3 rank rows 0-3 first (ties by index), then row 4 vs 5.. tie: 4 first
    # -> 5 each; row 4 ranks 4..9 (sim 1): itself + 5,6,7,8 -> 1; rows 5-9 rank 4..9:
    # top 5 = 4,5,6,7,8 -> 4 same group
    assert result["score"] == pytest.approx((4 * 5 + 1 + 5 * 4) / 10)
    # micro-AP: 45 pairs, 20 positive; at cosine 1: 6 + 10 positives and the 5 negatives of
    # row 4 with group 1; at cosine 0 the 4 positives of row 4 with rows 0-3. Ties keep the
    # pair order (0,1), (0,2), ..., (8,9): ranked and averaged here by an explicit loop.
    pairs = [(i, j) for i in range(10) for j in range(i + 1, 10)]
    sims = [float(x[i] @ x[j]) for i, j in pairs]
    order = sorted(range(45), key=lambda n: -sims[n])
    hits = [groups[pairs[n][0]] == groups[pairs[n][1]] for n in order]
    tp, total = 0, 0.0
    for rank, hit in enumerate(hits, 1):
        if hit:
            tp += 1
            total += tp / rank
    assert result["micro_ap"] == pytest.approx(total / 20)

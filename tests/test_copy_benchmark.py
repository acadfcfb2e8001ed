"""The copy decision benchmark's metrics on a case small enough to work out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from copy_decisions import evaluate, ranking_of  # noqa: E402
from copy_sets import CopySet, part_of  # noqa: E402

from mgdedup.duplicates.find import DedupResult  # noqa: E402
from mgdedup.duplicates.grouping import Group  # noqa: E402
from mgdedup.duplicates.report_text import FileFacts  # noqa: E402

NAMES = ["A", "B", "C", "a1", "a2", "b1"]  # photos A, B, C; a1, a2 copies of A; b1 of B


@pytest.fixture
def case(tmp_path):
    paths = {name: tmp_path / f"{name}.jpg" for name in NAMES}
    copies = CopySet(tmp_path, [paths["A"], paths["B"], paths["C"]],
                     [(paths["a1"], paths["A"], "screenshot"), (paths["a2"], paths["A"], "rot90"),
                      (paths["b1"], paths["B"], "screenshot")])
    facts = [FileFacts(str(paths[name].resolve()), 10, 10, 100) for name in NAMES]
    return copies, facts


def test_decisions_are_scored_per_pair_and_per_kind(case):
    copies, facts = case
    row = {name: k for k, name in enumerate(NAMES)}
    # A keeps a1 (right) and C (a look-alike: wrong); b1 keeps B (right); a2 is missed
    groups = [Group(row["A"], [(row["a1"], 0.95), (row["C"], 0.9)]),
              Group(row["b1"], [(row["B"], 0.8)])]
    scores = evaluate(DedupResult(0.7, groups, facts), copies)
    assert scores["pairs"] == 3 and scores["false_pairs"] == 1
    assert scores["look_alike_false_pairs"] == 1
    assert scores["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["recall_per_kind"] == {"rot90": 0.0, "screenshot": 1.0}
    assert scores["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["min_kind_recall"] == 0.0
    (false,) = scores["false_pair_list"]
    assert (Path(false["keeper"]).name, Path(false["member"]).name, false["score"]) == \
        ("A.jpg", "C.jpg", 0.9)


def test_a_copy_grouped_without_its_original_is_not_found(case):
    copies, facts = case
    row = {name: k for k, name in enumerate(NAMES)}
    groups = [Group(row["a1"], [(row["a2"], 0.99)])]  # two copies of A, A itself elsewhere
    scores = evaluate(DedupResult(0.7, groups, facts), copies)
    assert scores["precision"] == 1.0  # a right pair...
    assert scores["recall"] == 0.0  # ...that finds no copy with its original


def test_ranking_by_hand(case):
    copies, facts = case
    # unit vectors at these angles: the cosine of two is that of the angle between them, and
    # no two pairs are equally far (no ties)
    degrees = np.radians([0, 90, 33, 11, 52, 73])
    x = np.column_stack([np.cos(degrees), np.sin(degrees)]).astype(np.float32)
    # a1 (11): A is 11 away, then C 22: rank 1. a2 (52): C 19, b1 21, B 38, a1 41, then A 52:
    # rank 5. b1 (73): B 17 first: rank 1.
    scores = ranking_of(x, [f.path for f in facts], copies)
    assert scores["map"] == pytest.approx((1 + 1 / 5 + 1) / 3, abs=1e-4)
    # micro-AP: all 15 pairs by cosine, same-family pairs (A-a1, A-a2, a1-a2, B-b1) positive
    family = [0, 1, 2, 0, 0, 1]
    pairs = sorted(((float(x[i] @ x[j]), family[i] == family[j])
                    for i in range(6) for j in range(i + 1, 6)), key=lambda p: -p[0])
    hits, precisions = 0, []
    for rank, (_, positive) in enumerate(pairs, start=1):
        if positive:
            hits += 1
            precisions.append(hits / rank)
    assert scores["micro_ap"] == pytest.approx(np.mean(precisions), abs=1e-3)


def test_the_parts_of_the_photos_are_disjoint_and_stable():
    names = [f"folder/{n}.jpg" for n in range(2000)]
    parts = [part_of(name) for name in names]
    share = {p: parts.count(p) / len(parts) for p in ("fit", "eval", "backgrounds")}
    assert set(parts) == set(share)
    assert share["fit"] == pytest.approx(0.60, abs=0.04)
    assert share["eval"] == pytest.approx(0.32, abs=0.04)
    assert [part_of(name) for name in names] == parts  # by name, not by chance


def test_photos_of_one_image_share_a_family(tmp_path):
    """Byte-identical photos (a symlinked wallpaper) and photos a --same pattern matches
    identically (one design at two sizes) are one image; other photos are not."""
    from copy_sets import build_copy_set
    from PIL import Image

    source = tmp_path / "source"
    (source / "sway").mkdir(parents=True)
    colours = {"sway/Blue_1920x1080.png": (0, 0, 200), "sway/Blue_1366x768.png": (0, 0, 190),
               "red.png": (200, 0, 0), "green.png": (0, 200, 0)}
    for name, colour in colours.items():
        Image.new("RGB", (64, 48), colour).save(source / name)
    (source / "link.png").symlink_to(source / "red.png")
    copies = build_copy_set(source, tmp_path / "set", part="all", originals=1, per_kind=1,
                            kinds=("mirror",), same=(r"sway/Blue",))
    family = copies.family()
    by_name = {p.name: family[str(p.resolve())] for p in copies.photos}
    assert by_name["sway__Blue_1920x1080.png"] == by_name["sway__Blue_1366x768.png"]
    assert by_name["link.png"] == by_name["red.png"]
    assert len({by_name["red.png"], by_name["green.png"], by_name["sway__Blue_1366x768.png"]}) == 3

"""The parts of `dedup`'s copy decisions, each against an independent reference: the
perceptual hash (scipy's DCT), candidates (brute-force neighbours and hash pairs), groups
(maximin paths by union-find), the boosted trees (an exhaustive split search), the copy score
file (round trip, hostile values), local matching (the geometry of generated copies) and the
frame agreement (hand-made cell states)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy.fft import dctn

from mgdedup.duplicates.candidates import NOT_A_NEIGHBOUR, find_candidates
from mgdedup.duplicates.copy_score import FEATURES, CopyScorer, Tree
from mgdedup.duplicates.copy_search import component_groups
from mgdedup.duplicates.frames import NOT_MEASURED, frame_agreement
from mgdedup.duplicates.local_match import (
    CELL_AGREE,
    CELL_DISAGREE,
    CELL_UNKNOWN,
    GRID,
    Evidence,
    extract,
    verify,
)
from mgdedup.errors import MgdedupError
from mgdedup.imaging.perceptual_hash import UNKNOWN, hamming, phash
from mgdedup.imaging.synthetic import random_scene, shape_composition
from mgdedup.index.faiss_index import build_index
from mgdedup.tuning.copy_score_fit import fit_copy_scorer, fit_trees


# --- the perceptual hash -----------------------------------------------------------------
def reference_phash(image: Image.Image) -> int:
    """pHash as its authors describe it: grey 32 x 32 area average, orthonormal 2-D DCT-II,
    the 8 x 8 lowest frequencies, one bit per coefficient above the median of the 63 AC
    ones, row-major from the DC coefficient (the most significant bit)."""
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), np.float64)
    low = dctn(pixels, type=2, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


@pytest.mark.parametrize("seed", range(4))
def test_phash_is_the_reference_dct_hash(seed):
    rng = np.random.default_rng(seed)
    image = random_scene(rng, (int(rng.integers(40, 128)), int(rng.integers(40, 128))))
    assert int(phash(image)) == reference_phash(image)
    assert int(phash(image)) >> 63 == 1  # the DC coefficient of a non-black image


def test_phash_of_a_large_image_is_the_area_average_hash():
    big = random_scene(np.random.default_rng(9), (1280, 960))
    # a two-step area average (reduce, then BOX) against one BOX resize: equal up to rounding
    assert int(hamming(phash(big), np.uint64(reference_phash(big)))) <= 2


def test_hamming_counts_the_differing_bits():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2 ** 63, 200, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2 ** 63, 200, dtype=np.uint64)
    expected = [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b)]
    assert hamming(a, b).tolist() == expected
    assert hamming(np.array([UNKNOWN, a[0]]), np.array([a[0], UNKNOWN])).tolist() == [64, 64]


def test_phash_keeps_tiny_recompressed_copies_close_and_other_images_far(tmp_path):
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng) for _ in range(12)]
    copies = []
    for number, scene in enumerate(scenes):
        small = scene.resize((80, 60), Image.Resampling.BILINEAR)
        small.save(tmp_path / f"{number}.jpg", quality=10)
        with Image.open(tmp_path / f"{number}.jpg") as copy:
            copies.append(int(hamming(phash(scene), phash(copy))))
    others = [int(hamming(phash(a), phash(b))) for a, b in itertools.combinations(scenes, 2)]
    # bits near the median flip: most copies, not all, stay within the candidate radius
    assert sum(d <= 10 for d in copies) >= 10 and np.median(copies) <= 4
    assert min(others) > 16 and np.median(others) > 24


# --- candidates --------------------------------------------------------------------------
def test_candidates_are_the_brute_force_neighbours_and_hash_pairs():
    rng = np.random.default_rng(3)
    n, dim, k, radius = 90, 16, 12, 6
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = rng.integers(0, 2 ** 62, n, dtype=np.uint64)
    hashes[10:20] = hashes[0] ^ np.uint64(0b111)  # 3 bits from row 0 (and 0 from each other)
    hashes[40] = UNKNOWN
    hashes[41] = hashes[40] ^ np.uint64(1)  # "close" to an unknown hash: never a pair by hash
    index = build_index(x, dim)
    blocks = [(0, x[:50]), (50, x[50:])]
    found = find_candidates(index, blocks, hashes, lambda rows: x[rows], neighbours=k,
                            hash_radius=radius)

    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1)[:, :k]
    expected_rank: dict[tuple[int, int], int] = {}
    for row in range(n):
        for rank, other in enumerate(order[row].tolist()):
            key = (min(row, other), max(row, other))
            expected_rank[key] = min(rank, expected_rank.get(key, rank))
    for a, b in itertools.combinations(range(n), 2):
        known = hashes[a] != UNKNOWN and hashes[b] != UNKNOWN
        if known and bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= radius:
            expected_rank.setdefault((a, b), NOT_A_NEIGHBOUR)
    got = {(int(a), int(b)): int(r) for a, b, r in zip(found.i, found.j, found.rank)}
    assert got == expected_rank
    assert (found.i < found.j).all()
    np.testing.assert_allclose(found.cosine, similarity[found.i, found.j], atol=1e-5)
    assert found.hash_distance.tolist() == [
        64 if UNKNOWN in (hashes[a], hashes[b]) else bin(int(hashes[a]) ^ int(hashes[b])).count("1")
        for a, b in zip(found.i, found.j)]
    # background: the mean similarity to the neighbours of ranks 3 to 10
    top = -np.sort(-similarity, axis=1)[:, 2:10].mean(axis=1)
    np.testing.assert_allclose(found.background, top, atol=1e-5)


# --- groups ------------------------------------------------------------------------------
def reference_groups(n, i, j, scores, order):
    """Components by union-find; a member's score: the highest t at which it is still
    connected to its keeper using only pairs scoring >= t."""
    def components(edges):
        parent = list(range(n))

        def root(v):
            while parent[v] != v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v
        for a, b in edges:
            parent[root(a)] = root(b)
        return root

    every = components(zip(i.tolist(), j.tolist()))
    rank = {row: r for r, row in enumerate(order.tolist())}
    touched = set(i.tolist()) | set(j.tolist())
    groups = {}
    for row in sorted(touched, key=rank.get):
        groups.setdefault(every(row), []).append(row)
    out = {}
    for rows in groups.values():
        keeper = rows[0]
        best = {}
        for t in sorted(set(scores.tolist()), reverse=True):
            root = components((a, b) for a, b, s in zip(i.tolist(), j.tolist(), scores.tolist())
                              if s >= t)
            for row in rows[1:]:
                if row not in best and root(row) == root(keeper):
                    best[row] = t
        out[keeper] = best
    return out


@pytest.mark.parametrize("seed", range(6))
def test_component_groups_are_components_scored_by_their_weakest_link(seed):
    rng = np.random.default_rng(seed)
    n = 30
    pairs = {tuple(sorted(rng.choice(n, 2, replace=False).tolist())) for _ in range(35)}
    i = np.array([a for a, _ in pairs])
    j = np.array([b for _, b in pairs])
    scores = rng.uniform(0.5, 1.0, len(i)).round(3)
    order = rng.permutation(n)
    groups = component_groups(n, i, j, scores, order)
    expected = reference_groups(n, i, j, scores, order)
    assert {g.keeper: {row: s for row, s in g.members} for g in groups} == \
        {k: pytest.approx(v) for k, v in expected.items()}
    rows = [row for g in groups for row in (g.keeper, *(m for m, _ in g.members))]
    assert len(rows) == len(set(rows))  # each image in one group


# --- the boosted trees -------------------------------------------------------------------
def test_a_single_split_is_the_exhaustive_best_with_newton_leaves():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 9, size=(400, 3)).astype(np.float64)  # few values: every cut is a bin
    y = ((x[:, 1] >= 5) ^ (rng.random(400) < 0.15)).astype(float)
    (tree,), base = fit_trees(x, y, trees=1, depth=1, min_leaf=20, l2=1.0, bins=32)

    prior = y.mean()
    p = np.full(len(y), prior)
    g, h = p - y, p * (1 - p)

    def gain(mask):
        def leaf(m):
            return g[m].sum() ** 2 / (h[m].sum() + 1.0)
        return leaf(mask) + leaf(~mask) - leaf(np.ones(len(y), bool))

    best = max(((f, c) for f in range(3) for c in np.unique(x[:, f])[1:]
                if 20 <= (x[:, f] < c).sum() <= len(y) - 20),
               key=lambda fc: gain(x[:, fc[0]] < fc[1]))
    assert base == pytest.approx(np.log(prior / (1 - prior)))
    assert tree.feature[0] == best[0]
    below = x[:, tree.feature[0]] < tree.threshold[0]
    np.testing.assert_array_equal(below, x[:, best[0]] < best[1])  # the same partition
    expected_left = -g[below].sum() / (h[below].sum() + 1.0)
    expected_right = -g[~below].sum() / (h[~below].sum() + 1.0)
    np.testing.assert_allclose(tree.predict(x), np.where(below, expected_left, expected_right))


def test_boosting_learns_an_interaction_and_its_curve_is_out_of_fold():
    rng = np.random.default_rng(2)
    n = 3000
    x = rng.uniform(0, 1, size=(n, len(FEATURES)))
    y = ((x[:, 0] > 0.5) & (x[:, 4] > 0.3)).astype(float)  # an AND: needs depth 2
    families = np.arange(n) // 3
    scorer = fit_copy_scorer(x, y, families)
    fresh = rng.uniform(0, 1, size=(2000, len(FEATURES)))
    truth = (fresh[:, 0] > 0.5) & (fresh[:, 4] > 0.3)
    assert ((scorer.probability(fresh) >= 0.5) == truth).mean() > 0.97
    # a feature that only carries noise gets no say
    assert (scorer.probability(fresh) - scorer.probability(
        np.column_stack([fresh[:, :7], rng.uniform(0, 1, 2000), fresh[:, 8:]]))).std() < 0.05
    threshold, precision, recall = scorer.threshold_for(0.99)
    assert precision >= 0.99 and recall > 0.9 and scorer.default_threshold >= 0.5


# --- the copy score file -----------------------------------------------------------------
def small_scorer() -> CopyScorer:
    x = np.random.default_rng(4).uniform(0, 1, size=(600, len(FEATURES)))
    trees, base = fit_trees(x, (x[:, 0] > 0.4).astype(float), trees=5, depth=2)
    return CopyScorer(trees, base, 0.1, 0.8, [(0.5, 0.9, 0.8), (0.8, 0.99, 0.5)], FEATURES,
                      "six hundred random pairs")


def test_a_copy_score_file_reads_back_the_same_scores(tmp_path):
    scorer = small_scorer()
    scorer.save(tmp_path / "score.json")
    again = CopyScorer.load(tmp_path / "score.json")
    x = np.random.default_rng(5).uniform(0, 1, size=(100, len(FEATURES)))
    np.testing.assert_array_equal(again.probability(x), scorer.probability(x))
    assert (again.default_threshold, again.fitted_on) == (0.8, "six hundred random pairs")
    assert again.threshold_for(0.95) == (0.8, 0.99, 0.5)
    assert again.threshold_for(0.999) is None


def _hostile(change):
    data = json.loads(json.dumps(small_scorer().to_dict()))
    change(data)
    return data


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(format="pickle"), "not a copy score"),
    (lambda d: d.update(version=7), "version 7"),
    (lambda d: d.update(features=["cosine"]), "features"),
    (lambda d: d["trees"][0].update(left=[0] * len(d["trees"][0]["left"])), "do not form a tree"),
    (lambda d: d["trees"][0]["feature"].__setitem__(0, 99), "do not form a tree"),
    (lambda d: d["trees"][0]["value"].__setitem__(-1, float("nan")), "not finite"),
    (lambda d: d["trees"][0].update(value=[0.0]), "different lengths"),
    (lambda d: d.update(default_threshold=3.0), "out of range"),
    (lambda d: d.update(curve=[[0.5, 0.9]]), "curve point"),
    (lambda d: d.pop("trees"), "trees"),
])
def test_a_hostile_copy_score_file_is_a_one_line_error(tmp_path, change, words):
    path = tmp_path / "score.json"
    path.write_text(json.dumps(_hostile(change)))
    with pytest.raises(MgdedupError) as caught:
        CopyScorer.load(path)
    message = str(caught.value)
    assert "\n" not in message and words in message and str(path) in message


def test_a_tree_never_loops_on_any_input():
    tree = Tree(np.array([0, -1, -1]), np.array([0.5, 0, 0]), np.array([1, -1, -1]),
                np.array([2, -1, -1]), np.array([0.0, -1.0, 1.0]))
    x = np.array([[0.1] + [0] * 12, [0.9] + [0] * 12, [np.nan] + [0] * 12])
    assert tree.predict(x).tolist() == [-1.0, 1.0, 1.0]  # NaN is not below: goes right


def _random_tree(rng, depth_left: int, features: int, nodes: dict) -> int:
    """A random tree into `nodes` (lists by field), children after parents; its root."""
    me = len(nodes["feature"])
    for name in nodes:
        nodes[name].append(0)
    if depth_left == 0 or rng.random() < 0.3:  # leaves at every depth
        nodes["feature"][me], nodes["value"][me] = -1, float(rng.normal())
        nodes["left"][me] = nodes["right"][me] = -1
        return me
    nodes["feature"][me] = int(rng.integers(0, features))
    nodes["threshold"][me] = float(rng.choice([0.0, 0.5, rng.normal()]))
    nodes["left"][me] = _random_tree(rng, depth_left - 1, features, nodes)
    nodes["right"][me] = _random_tree(rng, depth_left - 1, features, nodes)
    return me


def test_the_fast_forest_sums_what_walking_each_tree_gives():
    rng = np.random.default_rng(8)
    trees = []
    for _ in range(40):
        nodes = {name: [] for name in ("feature", "threshold", "left", "right", "value")}
        _random_tree(rng, int(rng.integers(0, 5)), len(FEATURES), nodes)
        trees.append(Tree(*(np.array(nodes[name]) for name in
                            ("feature", "threshold", "left", "right", "value"))))
    x = rng.normal(size=(3000, len(FEATURES)))
    x[::7, 2] = 0.5  # exactly at a threshold: not below, so right
    x[::11, 4] = np.nan  # NaN is not below: right
    x[::13, 1] = np.inf
    scorer = CopyScorer(trees, base=0.1, rate=0.3)
    walked = sum((t.predict(x) for t in trees), np.zeros(len(x)))
    expected = (1 / (1 + np.exp(-(0.1 + 0.3 * walked)))).astype(np.float32)
    assert scorer._forest is not None and scorer._forest.depth >= 3
    np.testing.assert_array_equal(scorer.probability(x), expected)
    # a lone leaf is a tree too
    stump = CopyScorer([Tree(np.array([-1]), np.zeros(1), np.array([-1]), np.array([-1]),
                             np.array([0.7]))], base=0.0, rate=1.0)
    np.testing.assert_allclose(stump.probability(x[:5]), 1 / (1 + np.exp(-0.7)), rtol=1e-6)


def test_evidence_rows_and_their_cache_give_back_each_pair(tmp_path, monkeypatch):
    from mgdedup.duplicates import evidence_cache
    from mgdedup.duplicates.local_match import EvidenceRows

    monkeypatch.setattr(evidence_cache, "settings", lambda: "test-settings")
    cells = bytes(range(evidence_cache.CELLS))
    pairs = [Evidence(), Evidence(inliers=40, cover_a=0.9, cover_b=0.4, angle=90.0,
                                  log_scale=0.7, mirrored=True, agree=12, disagree=3,
                                  ratio=0.25, cells=cells),
             Evidence(inliers=7, cover_a=0.1, cover_b=0.2, angle=10.0, ratio=0.01)]
    rows = EvidenceRows.of(pairs)
    assert list(rows) == pairs and rows[-1] == pairs[-1] and rows[1:] == pairs[1:]
    with pytest.raises(IndexError):
        rows[3]
    digests = np.array(["c" * 32, "a" * 32, "b" * 32, "", "a" * 31 + "f"])
    i, j = np.array([0, 1, 0, 3, 2]), np.array([1, 2, 2, 4, 4])

    def reference_key(a: int, b: int) -> bytes:  # the two digests, in order
        if len(digests[a]) != 32 or len(digests[b]) != 32:
            return b""
        return "".join(sorted((digests[a], digests[b]))).encode()

    keys = evidence_cache.pair_keys(digests, i, j)
    assert keys.tolist() == [reference_key(a, b) for a, b in zip(i, j)]
    path = tmp_path / "verified.npz"
    evidence = [*pairs, Evidence(inliers=99), Evidence(inliers=5)]
    evidence_cache.save(path, keys, evidence)
    known = evidence_cache.load(path)
    assert len(known) == 4  # the pair with a missing digest has no key
    at = known.positions(keys)
    assert (at >= 0).tolist() == [True, True, True, False, True]
    for k in (0, 1, 2, 4):
        assert known.get(keys[k]) == evidence[k] == known.rows(at[[k]])[0]
    assert known.get(b"") is None and known.get(b"x" * 64) is None
    assert known.positions(np.array([b"z" * 64])).tolist() == [-1]


# --- local matching ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene():
    # many corners for SIFT; at most LOCAL_SIDE pixels, so features are taken at full size
    return shape_composition(np.random.default_rng(21), (512, 384))


@pytest.mark.parametrize("edit, angle, scale, mirrored", [
    (lambda im: im.transpose(Image.Transpose.ROTATE_90), 90, 1.0, False),
    (lambda im: im.resize((256, 192), Image.Resampling.BILINEAR), 0, 0.5, False),
    (lambda im: ImageOps.mirror(im), 0, 1.0, True),
    (lambda im: im.crop((80, 60, 400, 320)), 0, 1.0, False),
])
def test_verification_finds_the_transform_of_a_copy(scene, edit, angle, scale, mirrored):
    copy = edit(scene)
    evidence = verify(extract(scene), extract(copy))
    assert evidence.inliers >= 40
    assert evidence.mirrored == mirrored
    assert min(abs(evidence.angle - angle), 360 - abs(evidence.angle - angle)) < 3
    assert evidence.log_scale == pytest.approx(abs(np.log(scale)), abs=0.05)
    assert evidence.agree > 3 * evidence.disagree
    assert evidence.cover_b > 0.5  # the copy is all of it


def test_verification_of_unrelated_images_finds_next_to_nothing(scene):
    for seed in (12, 13, 14):
        other = shape_composition(np.random.default_rng(seed), (512, 384))
        evidence = verify(extract(scene), extract(other))
        # chance matches (some fit a degenerate homography that folds one image onto a
        # line or point): they span next to nothing of one image, and no pixels agree
        assert evidence.agree <= 2 and min(evidence.cover_a, evidence.cover_b) < 0.1


def test_a_pasted_copy_covers_its_original_but_little_of_itself(scene):
    canvas = random_scene(np.random.default_rng(13), (1024, 768))  # smooth: few keypoints
    canvas.paste(scene.resize((384, 288)), (500, 400))
    evidence = verify(extract(scene), extract(canvas))
    assert evidence.inliers >= 30
    assert evidence.cover_a > 0.5 and evidence.cover_b < 0.3


# --- images in one frame -----------------------------------------------------------------
def _framed(states: np.ndarray) -> Evidence:
    return Evidence(inliers=300, agree=int((states == CELL_AGREE).sum()),
                    disagree=int((states == CELL_DISAGREE).sum()), cells=states.tobytes())


def test_frame_agreement_tells_shared_templates_from_shared_content():
    """Four screenshots in one app template: rows 0 and 1 hold photo P, rows 2 and 3 photos
    Q and R. The template (cells 0-99) agrees everywhere; the photo slot (cells 100-143)
    agrees only between the two screenshots of P."""
    grid = GRID * GRID
    slot = np.arange(grid) >= 100
    photo = {0: "P", 1: "P", 2: "Q", 3: "R"}
    pairs = list(itertools.combinations(range(4), 2))
    evidence = []
    for a, b in pairs:
        states = np.full(grid, CELL_AGREE, np.uint8)
        states[slot] = CELL_AGREE if photo[a] == photo[b] else CELL_DISAGREE
        states[:10] = CELL_UNKNOWN  # flat cells: no say
        evidence.append(_framed(states))
    i, j = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    got = dict(zip(pairs, frame_agreement(i, j, evidence).tolist()))
    assert got[(0, 1)] == 1.0  # a copy: agrees where Q and R differ from both
    assert got[(0, 2)] == got[(1, 3)] == got[(2, 3)] == 0.0  # only the frame is shared


def test_frame_agreement_ignores_a_copys_own_edits_and_needs_a_third_image():
    """An original (0), a copy with text in cells 0-9 (1) and one with an emoji in cells
    20-29 (2): each pair differs only where one of them was edited. Where the third differs
    from both (its own edit) the pair agrees; the two copies have no such cell (the original
    differs from each where that one was edited only)."""
    grid = GRID * GRID
    edits = {0: set(), 1: set(range(10)), 2: set(range(20, 30))}
    pairs = list(itertools.combinations(range(3), 2))
    evidence = []
    for a, b in pairs:
        states = np.full(grid, CELL_AGREE, np.uint8)
        states[sorted(edits[a] | edits[b])] = CELL_DISAGREE
        evidence.append(_framed(states))
    i, j = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    got = dict(zip(pairs, frame_agreement(i, j, evidence).tolist()))
    assert got == {(0, 1): 1.0, (0, 2): 1.0, (1, 2): NOT_MEASURED}
    # two images alone in their frame: nothing to tell by
    assert frame_agreement(i[:1], j[:1], evidence[:1]).tolist() == [NOT_MEASURED]
    # a pair not in one frame is never measured
    loose = [Evidence(inliers=50)] + evidence[1:]
    assert frame_agreement(i, j, loose)[0] == NOT_MEASURED


def test_two_screenshots_of_one_template_are_in_the_same_frame(scene):
    first, second = _app_template(), _app_template()
    first.paste(scene.resize((256, 192)), (128, 160))
    second.paste(shape_composition(np.random.default_rng(5), (256, 192)), (128, 160))
    evidence = verify(extract(first), extract(second))
    assert evidence.cells is not None  # same size, matched by the identity
    states = np.frombuffer(evidence.cells, np.uint8).reshape(GRID, GRID)
    assert (states[6:, 4:8] != CELL_AGREE).all()  # the photo slot: different photos
    assert (states[:3] == CELL_AGREE).sum() > 5  # the frame
    # a copy turned or scaled is not in the same frame
    assert verify(extract(scene), extract(scene.resize((256, 192)))).cells is None


def _app_template() -> Image.Image:
    from PIL import ImageDraw

    template = Image.new("RGB", (512, 384), (250, 250, 250))
    draw = ImageDraw.Draw(template)
    rng = np.random.default_rng(0)
    for _ in range(60):  # the app's text and icons
        x, y = int(rng.integers(0, 480)), int(rng.integers(0, 120))
        draw.rectangle((x, y, x + int(rng.integers(4, 30)), y + 6), fill=(40, 40, 40))
    return template


def test_smooth_photo_slots_of_different_brightness_disagree():
    """Two screenshots whose photos are smooth (no texture to correlate): a dark blue and a
    light blue wallpaper. Their slot cells differ by ~110 grey levels: disagree. A copy of
    one, brighter by a global gain, does not disagree there: the gain is taken out."""
    dark, light = _app_template(), _app_template()
    dark.paste((20, 40, 120), (128, 160, 384, 352))  # grey ~43
    light.paste((120, 180, 230), (128, 160, 384, 352))  # grey ~ 167
    evidence = verify(extract(dark), extract(light))
    assert evidence.cells is not None
    states = np.frombuffer(evidence.cells, np.uint8).reshape(GRID, GRID)
    slot = states[6:11, 4:8]  # rows 192-352 / 32, columns 128-384 / 42.7, inside the slot
    assert (slot == CELL_DISAGREE).all()
    assert evidence.disagree >= slot.size

    brighter = Image.eval(dark, lambda v: min(255, int(v * 1.15)))
    same = verify(extract(dark), extract(brighter))
    same_states = np.frombuffer(same.cells, np.uint8).reshape(GRID, GRID)
    assert (same_states[6:11, 4:8] != CELL_DISAGREE).all()
    assert same.disagree == 0


def test_a_feature_most_pairs_lack_can_still_be_split():
    """95 % of the pairs have the feature unmeasured (-1); among the others it decides."""
    rng = np.random.default_rng(6)
    n = 4000
    x = rng.uniform(0, 1, size=(n, 3))
    measured = rng.random(n) < 0.05
    x[:, 2] = np.where(measured, rng.uniform(0, 1, n), -1.0)
    y = (measured & (x[:, 2] < 0.3)).astype(float)  # a copy only where it was measured low
    trees, base = fit_trees(x, y)
    assert any(2 in tree.feature.tolist() for tree in trees)
    scorer = CopyScorer(trees, base, 0.1, features=("a", "b", "c"))
    probability = scorer.probability(x)
    clear = ~measured | (np.abs(x[:, 2] - 0.3) > 0.05)  # bins are ~1/32 of the range wide
    assert probability[clear & (y == 1)].min() > 0.5 > probability[clear & (y == 0)].max()


def test_the_decision_curve_counts_what_groups_do():
    """Families 0,0 | 1,1 | 2,2; one wrong pair (1, 2) at 0.6 joins the first two families."""
    from mgdedup.tuning.copy_score_fit import decision_curve

    i, j = np.array([0, 2, 1, 4]), np.array([1, 3, 2, 5])
    scores = np.array([0.9, 0.8, 0.6, 0.3])
    curve = {t: (p, r) for t, p, r in decision_curve(scores, i, j, np.array([0, 0, 1, 1, 2, 2]))}
    assert curve[0.7] == (1.0, pytest.approx(4 / 6, abs=1e-6))  # two right groups
    # one group 0-1-2-3 kept by row 0: member 1 right, members 2 and 3 wrong
    assert curve[0.5] == (pytest.approx(1 / 3, abs=1e-6), pytest.approx(4 / 6, abs=1e-6))
    assert curve[0.2] == (0.5, 1.0)  # and the pair 4-5
    assert curve[0.95] == (1.0, 0.0)  # nothing grouped: nothing wrong, nothing found

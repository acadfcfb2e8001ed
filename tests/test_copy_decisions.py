"""`dedup`'s copy decisions through the CLI: the score is P(copy), so `--threshold 0.9` keeps
confident copies, and look-alikes stay apart.

The folder is the one imagededup's own integration test uses, with generated images: a
scene, its mirror image, a 300 x 300 resize, a copy turned by 90 degrees, an unrelated scene
and a truncated file. At 0.9 it must give one group of four.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from PIL import Image, ImageOps

from mgdedup.imaging.synthetic import shape_composition
from mgdedup.model import registry
from mgdedup.model.registry import DEFAULT_COPY_SCORE_FILE, copy_scorer_for


@pytest.fixture(scope="module")
def imagededup_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imagededup") / "images"
    folder.mkdir()
    scene = shape_composition(np.random.default_rng(21), (640, 480))
    scene.save(folder / "scene.jpg", quality=92)
    ImageOps.mirror(scene).save(folder / "scene_hflip.jpg", quality=92)
    scene.resize((300, 300), Image.Resampling.BICUBIC).save(folder / "scene_resize.jpg",
                                                           quality=92)
    scene.transpose(Image.Transpose.ROTATE_90).save(folder / "scene_rotation.jpg", quality=92)
    shape_composition(np.random.default_rng(7), (640, 480)).save(folder / "other.jpg",
                                                                 quality=92)
    (folder / "corrupt.jpg").write_bytes((folder / "other.jpg").read_bytes()[:300])
    result = run("index", folder, "--workers", "0")  # the default resolution, 500
    assert result.exit_code == 0, result.output
    assert "5 indexed, 1 skipped" in result.stderr
    return folder


def test_the_imagededup_folder_is_one_group_of_four_at_0_9(imagededup_folder):
    result = run("dedup", "--index", imagededup_folder / ".mgdedup", "--threshold", "0.9",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["score"] == "copy" and document["threshold"] == 0.9
    (group,) = document["groups"]
    names = sorted(Path(entry["path"]).name for entry in group["files"])
    assert names == ["scene.jpg", "scene_hflip.jpg", "scene_resize.jpg", "scene_rotation.jpg"]

    # the keeper rule, worked out from the files: the most pixels, then the largest file,
    # then the shortest path (scene.jpg and its mirror have the same pixels)
    def rank(path: Path) -> tuple:
        with Image.open(path) as image:
            return (-image.width * image.height, -path.stat().st_size, len(str(path)))

    keeper = min((Path(entry["path"]) for entry in group["files"]), key=rank)
    assert Path(group["keeper"]) == keeper
    assert all(0.9 <= member["score"] <= 1.0 for member in group["members"])
    # the raw cosine is kept beside the score, as the stored descriptors say
    import h5py

    with h5py.File(imagededup_folder / ".mgdedup" / "embeddings.h5", "r") as f:
        rows = {Path(p).name: v for p, v in zip(f["paths"].asstr()[:], f["embeddings"][:])}
    for member in group["members"]:
        expected = float(rows[Path(member["path"]).name] @ rows[keeper.name])
        assert member["cosine"] == pytest.approx(expected, abs=1e-5)
    errors = (imagededup_folder / ".mgdedup" / "errors.jsonl").read_text().splitlines()
    assert [Path(json.loads(line)["path"]).name for line in errors] == ["corrupt.jpg"]


def test_cosine_scores_are_still_there_and_say_so(imagededup_folder):
    index = imagededup_folder / ".mgdedup"
    copy = json.loads(run("dedup", "--index", index, "--format", "json").stdout)
    cosine = run("dedup", "--index", index, "--score", "cosine", "--threshold", "0.9",
                 "--format", "json")
    document = json.loads(cosine.stdout)
    assert document["score"] == "cosine" and document["threshold_source"] == "threshold"
    assert "given, cosine" in cosine.stderr
    # at the default threshold the copy score groups the four as well
    assert copy["threshold_source"] == "measured" and len(copy["groups"]) == 1
    assert len(copy["groups"][0]["files"]) == 4
    # a cosine of 0.9 is another scale: it keeps fewer of the copies
    assert sum(len(g["members"]) for g in document["groups"]) < 3


def test_a_copy_threshold_outside_0_1_is_a_one_line_error(imagededup_folder):
    from cli_helpers import one_line_error

    one_line_error(run("dedup", "--index", imagededup_folder / ".mgdedup", "--threshold",
                       "-0.2"), "probability in [0, 1]", "--score cosine")
    one_line_error(run("dedup", "--index", imagededup_folder / ".mgdedup", "--score", "copy",
                       "--score-norm"), "disagree")


def test_search_ranks_by_the_same_copy_score(imagededup_folder, tmp_path):
    query = tmp_path / "query.jpg"
    with Image.open(imagededup_folder / "scene.jpg") as scene:
        scene.crop((40, 30, 600, 450)).save(query, quality=80)
    result = run("search", query, "--index", imagededup_folder / ".mgdedup", "-k", "5",
                 "--json")
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.stdout)
    assert answer["score"] == "copy"
    ranked = [(Path(r["path"]).name, r["score"]) for r in answer["results"]]
    assert {name for name, score in ranked if score >= 0.9} == {
        "scene.jpg", "scene_hflip.jpg", "scene_resize.jpg", "scene_rotation.jpg"}
    assert ranked[-1] == ("other.jpg", pytest.approx(ranked[-1][1])) and ranked[-1][1] < 0.5
    assert [score for _, score in ranked] == sorted((s for _, s in ranked), reverse=True)


def test_the_shipped_copy_score_belongs_to_the_shipped_whitenings():
    model = registry.build_default_model()
    for resolution in (224, 500):
        whitening_id = model.whitening_for(resolution).identifier
        scorer = copy_scorer_for(registry.DEFAULT_MODEL, resolution, whitening_id)
        assert scorer is not None and 0.5 <= scorer.default_threshold < 1
        # another whitening (a user's `whiten`): no copy score, cosine scores instead
        assert copy_scorer_for(registry.DEFAULT_MODEL, resolution, whitening_id + "x") is None
    # a resolution it was not fitted at (its whitening borrowed from 224): none either
    assert copy_scorer_for(registry.DEFAULT_MODEL, 128, model.whitening_for(128).identifier) \
        is None
    # plain JSON: the file is data, never code
    assert json.loads(DEFAULT_COPY_SCORE_FILE.read_text())["500"]["scorer"]["format"] == \
        "mgdedup-copy-score"


def test_the_shipped_whitening_loads_without_trusting_it(tmp_path):
    table = torch.load(registry.DEFAULT_WHITENING_FILE, weights_only=True)
    assert sorted(table) == [224, 500]
    assert all(isinstance(v, torch.Tensor) for entry in table.values() for v in entry.values()
               if not isinstance(v, (int, float, str, type(None))))


def test_an_index_without_a_copy_score_is_scored_by_cosine(imagededup_folder, tmp_path):
    out = tmp_path / "idx-128"
    assert run("index", imagededup_folder, "-r", "128", "--out", out, "--workers", "0"
               ).exit_code == 0
    result = run("dedup", "--index", out, "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["score"] == "cosine"
    assert "measured for the model, cosine" in result.stderr
    from cli_helpers import one_line_error

    one_line_error(run("dedup", "--index", out, "--score", "copy"), "no copy score",
                   "--score cosine")


def test_a_rerun_takes_candidates_and_scores_from_the_cache_until_a_file_changes(
        imagededup_folder, tmp_path, monkeypatch):
    from conftest import copy_tree

    from mgdedup.duplicates import copy_search, pair_cache
    from mgdedup.duplicates.copy_score import CopyScorer
    from mgdedup.duplicates.find import find_duplicates

    folder = copy_tree(imagededup_folder, tmp_path / "images")
    index = folder / ".mgdedup"
    assert run("index", folder, "--workers", "0").exit_code == 0
    searched = []
    real_find, real_probability = copy_search.find_candidates, CopyScorer.probability
    monkeypatch.setattr(copy_search, "find_candidates",
                        lambda *a, **k: searched.append(1) or real_find(*a, **k))
    scored = []
    monkeypatch.setattr(CopyScorer, "probability",
                        lambda self, x: scored.append(len(x)) or real_probability(self, x))

    def groups() -> list:
        result = find_duplicates(index, 0.5)
        return [(g.keeper, sorted(g.members)) for g in result.groups]

    first = groups()
    assert len(searched) == 1 and len(scored) == 1 and (index / "candidates.npz").is_file()
    assert first  # the folder holds copies
    assert groups() == first and len(searched) == 1 and len(scored) == 1  # all cached
    # another threshold: the same pairs and scores, other groups' cut
    assert len(find_duplicates(index, 0.99).groups) <= len(first) and len(searched) == 1
    # a damaged cache is ignored (checksum), and so is a well-formed one naming a pair
    # outside the index
    data = bytearray((index / "candidates.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (index / "candidates.npz").write_bytes(bytes(data))
    assert groups() == first and len(searched) == 2
    with np.load(index / "candidates.npz") as stored:
        arrays = {name: stored[name] for name in stored.files if name != "checksum"}
    arrays["j"] = arrays["j"] + 1000
    arrays["checksum"] = np.array(pair_cache._checksum(arrays))
    np.savez(index / "candidates.npz", **arrays)
    assert groups() == first and len(searched) == 3
    # a changed file: candidates searched and scored again
    with Image.open(folder / "scene_resize.jpg") as image:
        ImageOps.grayscale(image).convert("RGB").save(folder / "scene_resize.jpg", quality=70)
    assert run("index", folder, "--workers", "0").exit_code == 0
    groups()
    assert len(searched) == 4 and len(scored) == 4
    # a file overwritten since indexing (not indexed again): its pairs are verified from its
    # new bytes, and that evidence is never kept under the digest of the indexed bytes
    from mgdedup.duplicates import evidence_cache
    from mgdedup.index.store import IndexStore

    with IndexStore.open(index / "embeddings.h5") as store:
        digest_of = dict(zip(map(str, store.absolute_paths()), store.read("digest")))
    indexed = digest_of[str(folder / "scene_hflip.jpg")]
    shutil.copy(folder / "other.jpg", folder / "scene_hflip.jpg")
    (index / "verified.npz").unlink()  # everything verified again, from the files as they are
    assert groups() == groups()
    kept = evidence_cache.load(index / "verified.npz").keys.tolist()
    assert kept and not [k for k in kept if indexed.encode() in k]


def test_a_second_dedup_verifies_nothing_again_and_a_damaged_cache_is_ignored(
        imagededup_folder, tmp_path):
    from conftest import copy_tree

    from mgdedup.duplicates.find import find_duplicates

    folder = copy_tree(imagededup_folder, tmp_path / "images")
    index = folder / ".mgdedup"
    assert run("index", folder, "--workers", "0").exit_code == 0  # paths of this copy

    def verified(**options) -> tuple[int, list]:
        counts = []
        result = find_duplicates(index, 0.9, on_verify=counts.append, **options)
        groups = [(g.keeper, sorted(g.members)) for g in result.groups]
        return counts[0], groups

    first, groups = verified()
    assert first >= 6 and (index / "verified.npz").is_file()
    again, same = verified()
    assert again == 0 and same == groups  # every pair came from the cache
    # damage: one byte of the cache changed is a checksum failure, the cache ignored
    data = bytearray((index / "verified.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (index / "verified.npz").write_bytes(bytes(data))
    recomputed, same = verified()
    assert recomputed == first and same == groups
    # a changed file is verified again: only the pairs it is in
    with Image.open(folder / "scene_resize.jpg") as image:
        ImageOps.grayscale(image).convert("RGB").save(folder / "scene_resize.jpg", quality=70)
    assert run("index", folder, "--workers", "0").exit_code == 0
    changed, _ = verified()
    assert 0 < changed < first

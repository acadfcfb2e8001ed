"""The main job end to end through the CLI, on generated images with planted copies."""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run
from conftest import copy_tree, family_of
from PIL import Image

from mgdedup.embedding.embedder import Embedder
from mgdedup.imaging.synthetic import random_scene
from mgdedup.index.layout import remember_index


@pytest.fixture(scope="module")
def first_run(planted, tmp_path_factory):
    """The planted collection indexed once at the default resolution: (folder, CLI result)."""
    folder = copy_tree(planted.folder, tmp_path_factory.mktemp("indexed") / "collection")
    result = run("index", folder, "--workers", "0")
    assert result.exit_code == 0, result.output
    return folder, result


@pytest.fixture(scope="module")
def indexed(first_run):
    return first_run[0]


def _family(planted, folder: Path) -> dict[str, int]:
    """family ids keyed by the path in the copied folder"""
    base = family_of(planted)
    root = str(planted.folder.resolve())
    return {str(folder.resolve()) + path[len(root):]: fam for path, fam in base.items()}


def test_index_summary_line_and_files(first_run, planted):
    folder, result = first_run
    images = len(planted.originals) + len(planted.copies)
    last = result.stderr.strip().splitlines()[-1]
    head = (f"{images} indexed, 0 skipped; 0 unchanged, 0 removed; {images} images in "
            f"{(folder / '.mgdedup').resolve()}; in ")
    assert last.startswith(head)
    seconds, rate = re.fullmatch(r"(\d+\.\d) s, (\d+\.\d) images/s", last[len(head):]).groups()
    assert float(rate) == pytest.approx(images / float(seconds), rel=0.1, abs=0.2)
    assert (folder / ".mgdedup" / "embeddings.h5").is_file()
    assert (folder / ".mgdedup" / "faiss.index").is_file()
    assert (folder / ".mgdedup" / "errors.jsonl").read_text() == ""


def test_dedup_finds_planted_copies_without_mixing(indexed, planted):
    result = run("dedup", "--index", indexed / ".mgdedup", "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    from mgdedup.model.registry import DEFAULT_MODEL, copy_scorer_for, load_model

    # the default: the copy score, at the threshold measured for the model at this resolution
    whitening_id = load_model().whitening_for(500).identifier
    threshold = copy_scorer_for(DEFAULT_MODEL, 500, whitening_id).default_threshold
    assert document["score"] == "copy" and document["threshold_source"] == "measured"
    assert document["threshold"] == pytest.approx(threshold)
    family = _family(planted, indexed)
    found = set()
    for group in document["groups"]:
        keeper = group["keeper"]
        assert Path(keeper).is_absolute()
        for member in group["members"]:
            assert member["score"] >= threshold - 1e-6
            # no group mixes unrelated generated images
            assert family[member["path"]] == family[keeper], (keeper, member)
            found.add(frozenset((keeper, member["path"])))
    root = str(indexed.resolve())
    offset = len(str(planted.folder.resolve()))
    planted_pairs = {frozenset((root + str(o.resolve())[offset:], root + str(c.resolve())[offset:]))
                     for o, c, _ in planted.copies}
    recall = len(planted_pairs & found) / len(planted_pairs)
    assert recall >= 0.9, sorted(map(sorted, planted_pairs - found))


def test_keeper_is_the_largest_version(indexed):
    document = json.loads(run("dedup", "--index", indexed / ".mgdedup", "--format", "json").stdout)
    for group in document["groups"]:
        keeper_pixels = np.prod(Image.open(group["keeper"]).size)
        for member in group["members"]:
            assert np.prod(Image.open(member["path"]).size) <= keeper_pixels


def _stored_rows(index_dir: Path) -> dict[str, np.ndarray]:
    """Absolute path -> stored descriptor, read with h5py directly (not through mgdedup)."""
    import h5py

    with h5py.File(index_dir / "embeddings.h5", "r") as f:
        roots = json.loads(f.attrs["roots"])
        paths = [str(Path(roots[r]) / rel) for r, rel in
                 zip(f["root"][:], f["paths"].asstr()[:])]
        return dict(zip(paths, f["embeddings"][:]))


def test_reports_state_the_files_and_scores_as_they_are(indexed):
    """JSON, CSV and the table against the files themselves and the stored descriptors."""
    index = indexed / ".mgdedup"
    document = json.loads(run("dedup", "--index", index, "--format", "json").stdout)
    rows = list(csv.DictReader(io.StringIO(run("dedup", "--index", index,
                                               "--format", "csv").stdout)))
    table = run("dedup", "--index", index).stdout
    descriptors = _stored_rows(index)
    assert document["groups"] and len(rows) == sum(1 + len(g["members"])
                                                   for g in document["groups"])
    by_path = {row["path"]: row for row in rows}
    for number, group in enumerate(document["groups"], start=1):
        keeper = group["keeper"]
        for entry in group["files"]:
            path = entry["path"]
            with Image.open(path) as image:
                assert (entry["width"], entry["height"]) == image.size
            assert entry["bytes"] == Path(path).stat().st_size
            row = by_path[path]
            assert int(row["group"]) == number and int(row["bytes"]) == entry["bytes"]
            assert (int(row["width"]), int(row["height"])) == (entry["width"], entry["height"])
            assert path in table
            if entry["role"] == "member":
                cosine = float(descriptors[path] @ descriptors[keeper])
                assert entry["cosine"] == pytest.approx(cosine, abs=1e-5)
                assert float(row["cosine"]) == pytest.approx(cosine, abs=1e-5)
                assert f"{cosine:.3f}" in table  # beside the copy score
                assert document["threshold"] <= entry["score"] <= 1.0
                assert float(row["score"]) == pytest.approx(entry["score"], abs=1e-6)
                assert f"{entry['score']:.3f}" in table
            else:
                assert path == keeper and row["role"] == "keeper"


def test_dedup_finds_index_from_current_directory_and_last_used(indexed, monkeypatch, tmp_path):
    monkeypatch.chdir(indexed)
    here = run("dedup", "--format", "json")
    assert here.exit_code == 0 and str(indexed.resolve()) in here.stderr
    monkeypatch.chdir(tmp_path)  # no index here: the last written one is used
    assert "no index found" in run("dedup", "--format", "json").stderr  # none remembered yet
    remember_index(indexed / ".mgdedup")  # what `index` does after writing it
    remembered = run("dedup", "--format", "json")
    assert remembered.exit_code == 0, remembered.output
    assert f"index: {(indexed / '.mgdedup').resolve()}" in remembered.stderr
    assert json.loads(remembered.stdout) == json.loads(here.stdout)


def test_search_returns_the_original_first(indexed, planted):
    original, copy, _ = planted.copies[0]
    result = run("search", copy, "--index", indexed / ".mgdedup", "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document[0]["query"] == str(copy)
    top = document[0]["results"]
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    names = [Path(r["path"]).name for r in top[:2]]
    assert original.name in names  # the copy itself (indexed elsewhere) and its original


def test_classify_images_and_index_agree(planted, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    images = planted.originals[:4]
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    assert run("index", folder, "--resolution", "224", "--workers", "0").exit_code == 0
    direct = run("classify", *[folder / i.name for i in images], "--json", "-k", "3")
    assert direct.exit_code == 0, direct.output
    from_index = run("classify", "--index", folder / ".mgdedup", "--json", "-k", "3")
    assert from_index.exit_code == 0, from_index.output
    by_path = {d["path"]: d["top"] for d in json.loads(from_index.stdout)}
    for prediction in json.loads(direct.stdout):
        stored = by_path[str(Path(prediction["path"]).resolve())]
        assert [t["index"] for t in stored] == [t["index"] for t in prediction["top"]]
        for a, b in zip(stored, prediction["top"]):
            assert abs(a["prob"] - b["prob"]) < 1e-4
            assert a["label"] == b["label"] and isinstance(a["label"], str)


def _count_trunk_images(monkeypatch) -> list[int]:
    """Images sent through the trunk, whichever backend (torch or ONNX) runs it."""
    calls: list[int] = []
    original = Embedder._gem_batch

    def counting(self, batch):
        calls.append(batch.shape[0])
        return original(self, batch)

    monkeypatch.setattr(Embedder, "_gem_batch", counting)
    return calls


def test_reindex_is_incremental(planted, tmp_path, monkeypatch):
    folder = copy_tree(planted.folder, tmp_path / "c")
    calls = _count_trunk_images(monkeypatch)
    assert run("index", folder, "-r", "224", "--workers", "0").exit_code == 0
    assert sum(calls) == 40
    calls.clear()
    again = run("index", folder, "-r", "224", "--workers", "0")
    assert again.exit_code == 0 and sum(calls) == 0, again.stderr
    assert "0 indexed" in again.stderr and "40 unchanged" in again.stderr
    # one changed, one deleted, one added
    changed = folder / "photos" / "IMG_0003.png"
    random_scene(np.random.default_rng(99)).save(changed)
    (folder / "photos" / "IMG_0004.png").unlink()
    random_scene(np.random.default_rng(98)).save(folder / "photos" / "new.png")
    calls.clear()
    third = run("index", folder, "-r", "224", "--workers", "0")
    assert third.exit_code == 0
    assert sum(calls) == 2, third.stderr
    assert "2 indexed" in third.stderr and "2 removed" in third.stderr
    from mgdedup.index.store import IndexStore

    with IndexStore.open(folder / ".mgdedup" / "embeddings.h5") as store:
        paths = sorted(store.read("paths"))
    assert len(paths) == 40 and "photos/IMG_0004.png" not in paths and "photos/new.png" in paths
    assert len(set(paths)) == len(paths)


def test_unreadable_files_are_reported_and_skipped(planted, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in planted.originals[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(planted.originals[0].read_bytes()[:200])
    (folder / "notes.jpg").write_text("not an image")
    result = run("index", folder, "-r", "224", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "3 indexed, 2 skipped" in result.stderr
    errors = [json.loads(line) for line in
              (folder / ".mgdedup" / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == ["broken.jpg", "notes.jpg"]
    assert all(e["reason"] for e in errors)


def test_user_errors_are_one_line(tmp_path, planted, indexed):
    one_line_error(run("index", tmp_path / "missing"), "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("index", empty), "no images")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    one_line_error(run("index", texts), "no images")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    one_line_error(run("index", indexed, "--model", corrupt), "corrupt.pt")
    one_line_error(run("dedup", "--index", tmp_path / "nowhere"), "no mgdedup index")
    one_line_error(run("index", indexed, "--resolution", "224"), "--rebuild",
                   "resolution differs (500 vs 224)")
    if not torch.cuda.is_available():
        one_line_error(run("index", indexed, "--device", "cuda"), "no CUDA GPU")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_malicious_model_file_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.target = str(marker)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload()}, protocol=2))
    folder = tmp_path / "one"
    folder.mkdir()
    random_scene(np.random.default_rng(0)).save(folder / "a.png")
    result = run("index", folder, "--model", evil)
    one_line_error(result, "evil.pt")
    assert not marker.exists()


def test_whiten_writes_a_model_that_indexes_and_classifies_exactly(planted, tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    for image in planted.originals[:12]:
        (folder / image.name).write_bytes(image.read_bytes())
    model_file = tmp_path / "mine.pt"
    result = run("whiten", folder, "--resolution", "224", "--out", model_file, "--workers", "0",
                 "--calibration-images", "6")
    assert result.exit_code == 0, result.output
    assert "fitted on 12 images" in result.stderr
    again = run("whiten", folder, "--resolution", "224", "--out", model_file)
    one_line_error(again, "exists")  # never overwritten

    from mgdedup.model.model_file import load_model_file

    whitened = load_model_file(model_file)
    assert 224 in whitened.whitenings and whitened.whitenings[224].dim == 1280
    # its default threshold was measured on edited copies and reaches the index
    threshold = whitened.whitenings[224].threshold
    assert threshold is not None and -1.0 < threshold < 1.0
    assert f"default threshold {threshold:g}" in result.stderr
    # an index of the default model refuses descriptors of the whitened one
    assert run("index", folder, "-r", "224", "--workers", "0").exit_code == 0
    one_line_error(run("index", folder, "-r", "224", "--model", model_file), "--rebuild",
                   "differs")
    rebuilt = run("index", folder, "-r", "224", "--model", model_file, "--rebuild",
                  "--workers", "0")
    assert rebuilt.exit_code == 0, rebuilt.output
    query = planted.originals[0]
    one_line_error(run("search", query, "--index", folder / ".mgdedup", "--model",
                               "default"), "another model")
    found = json.loads(run("search", query, "--index", folder / ".mgdedup", "--json").stdout)
    assert Path(found[0]["results"][0]["path"]).name == query.name  # uses the index's model
    # classification from the stored whitened rows equals classification of the images
    direct = json.loads(run("classify", *sorted(folder.glob("*.png")), "--model", model_file,
                            "--json").stdout)
    stored = {d["path"]: d["top"] for d in
              json.loads(run("classify", "--index", folder / ".mgdedup", "--json").stdout)}
    for prediction in direct:
        top = stored[str(Path(prediction["path"]).resolve())]
        assert [t["index"] for t in top] == [t["index"] for t in prediction["top"]]
        assert all(abs(a["prob"] - b["prob"]) < 1e-4 for a, b in zip(top, prediction["top"]))


def test_marked_decisions_are_honoured_by_dedup(planted, tmp_path):
    folder = copy_tree(planted.folder, tmp_path / "m")
    assert run("index", folder, "-r", "224", "--workers", "0").exit_code == 0
    index = folder / ".mgdedup"

    def pairs():
        document = json.loads(run("dedup", "--index", index, "--format", "json").stdout)
        return {frozenset((g["keeper"], m["path"])) for g in document["groups"]
                for m in g["members"]}

    before = pairs()
    keeper, member = sorted(next(iter(before)))
    marked = run("mark", "not-duplicate", keeper, member, "--index", index)
    assert marked.exit_code == 0, marked.output
    after = pairs()
    assert frozenset((keeper, member)) not in after
    # two unrelated originals forced together
    a, b = (str((folder / "photos" / f"IMG_{n:04d}.png").resolve()) for n in (20, 21))
    assert frozenset((a, b)) not in after
    assert run("mark", "duplicate", a, b, "--index", index).exit_code == 0
    assert frozenset((a, b)) in pairs()
    # the verdicts survive a re-index
    assert run("index", folder, "-r", "224", "--workers", "0").exit_code == 0
    final = pairs()
    assert frozenset((a, b)) in final and frozenset((keeper, member)) not in final
    one_line_error(run("mark", "duplicate", a, tmp_path / "elsewhere.png", "--index",
                               index), "not in the index")


def _tree_digests(folder: Path) -> dict[str, tuple[str, int]]:
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.blake2b(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and ".mgdedup" not in p.parts}


def test_move_is_dry_run_first_then_undone_byte_identical(planted, tmp_path):
    folder = copy_tree(planted.folder, tmp_path / "act")
    assert run("index", folder, "-r", "224", "--workers", "0").exit_code == 0
    before = _tree_digests(folder)
    index = folder / ".mgdedup"
    dry = run("dedup", "--index", index, "--action", "move", "--to", tmp_path / "dups")
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.stderr and dry.stdout.count("move ") >= 9
    assert _tree_digests(folder) == before and not (tmp_path / "dups").exists()
    applied = run("dedup", "--index", index, "--action", "move", "--to", tmp_path / "dups",
                  "--apply")
    assert applied.exit_code == 0, applied.output
    moved = _tree_digests(tmp_path / "dups")
    assert len(moved) >= 9 and all(key not in _tree_digests(folder) for key in moved)
    keepers = {Path(g["keeper"]).name for g in json.loads(
        run("dedup", "--index", index, "--format", "json").stdout)["groups"]}
    assert all(Path(key).name not in keepers for key in moved)  # keepers never move
    undone = run("undo", "--index", index)
    assert undone.exit_code == 0, undone.output
    assert _tree_digests(folder) == before
    one_line_error(run("dedup", "--index", index, "--action", "move"), "--to")


def test_html_report_has_one_card_per_group(indexed, tmp_path):
    index = indexed / ".mgdedup"
    groups = json.loads(run("dedup", "--index", index, "--format", "json").stdout)["groups"]
    page = tmp_path / "report.html"
    result = run("dedup", "--index", index, "--format", "html", "--out", page)
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    assert text.count('<section class="group"') == len(groups) > 0
    assert text.count('data-role="member"') == sum(len(g["members"]) for g in groups)
    one_line_error(run("dedup", "--index", index, "--format", "html"), "--out")

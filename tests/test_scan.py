"""Folder scanning: images by content, deterministic order, symlinks, problems reported."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from mgdedup.errors import MgdedupError
from mgdedup.files.digest import file_digest
from mgdedup.imaging import scan as scan_module
from mgdedup.imaging.scan import ScannedFile, scan_images


def tiny(path: Path, fmt: str | None = None, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "photos"
    tiny(root / "b.jpg")
    tiny(root / "a" / "photo.png")
    tiny(root / "a" / "photo.dat", fmt="PNG")  # an image whatever its name
    tiny(root / "sub" / "deep" / "z.gif")
    tiny(root / "a.jpg")  # sorts before a/photo.png as a string
    tiny(root / ".mgdedup" / "thumb.png")  # the index folder is not part of the collection
    tiny(root / "shot.dng", fmt="TIFF")  # camera raw: TIFF inside, left alone
    (root / "notes.txt").write_text("shopping list\n")
    (root / "fake.jpg").write_text("this is not a JPEG\n")
    (root / "empty.png").write_bytes(b"")
    (root / "movie.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2")
    os.symlink(root, root / "sub" / "loop")  # a directory symlink back to the root
    os.symlink(root / "a" / "photo.png", root / "link.png")  # a symlink to a file
    os.symlink(root / "nowhere.jpg", root / "broken.jpg")
    os.symlink("self.jpg", root / "self.jpg")  # a symlink to itself
    os.mkfifo(root / "pipe.jpg")  # would block a reader forever
    return root


def test_scan_finds_images_by_content(tree):
    files, problems = scan_images([tree])
    assert [f.rel for f in files] == [
        "a.jpg", "a/photo.dat", "a/photo.png", "b.jpg", "link.png", "sub/deep/z.gif"]
    reasons = {path.name: reason for path, reason in problems}
    assert reasons == {
        "fake.jpg": "not an image (text file with .jpg extension)",
        "empty.png": "not an image (empty file)",
        "broken.jpg": "broken symlink",
        "self.jpg": "symlink loop",
    }


def test_scanned_file_fields(tree):
    files, _ = scan_images([tree])
    by_rel = {f.rel: f for f in files}
    item = by_rel["a/photo.dat"]
    assert isinstance(item, ScannedFile)
    assert item.root == tree.resolve() and item.root.is_absolute()
    assert item.path == tree.resolve() / "a" / "photo.dat"
    stat = item.path.stat()
    assert (item.size, item.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    link = by_rel["link.png"]  # keeps its own name, size of its target
    assert link.path.name == "link.png" and link.size == by_rel["a/photo.png"].size
    with pytest.raises(AttributeError):
        item.size = 0  # frozen


def test_scan_is_deterministic_and_sorted(tree):
    first, _ = scan_images([tree])
    second, _ = scan_images([str(tree)])  # str roots are accepted as well
    assert first == second
    assert [f.rel for f in first] == sorted(f.rel for f in first)


def test_skip_dirs_and_index_folder(tree):
    files, _ = scan_images([tree], skip_dirs=(".mgdedup", "sub"))
    assert "sub/deep/z.gif" not in {f.rel for f in files}
    files, _ = scan_images([tree], skip_dirs=())
    assert ".mgdedup/thumb.png" in {f.rel for f in files}


def test_single_file_root(tree):
    files, problems = scan_images([tree / "a" / "photo.dat"])
    assert problems == []
    assert [(f.root, f.rel) for f in files] == [((tree / "a").resolve(), "photo.dat")]
    _, problems = scan_images([tree / "notes.txt"])  # named explicitly: always reported
    assert problems == [(tree / "notes.txt", "not an image (text file with .txt extension)")]


def test_missing_root_raises(tmp_path):
    with pytest.raises(MgdedupError, match="no such folder"):
        scan_images([tmp_path / "missing"])


def test_overlapping_roots_list_each_file_once(tree):
    files, _ = scan_images([tree / "a", tree])
    paths = [f.path for f in files]
    assert len(paths) == len(set(paths))
    assert {f.root for f in files} == {tree.resolve()}


def test_unreadable_entries_are_reported_not_raised(tree, monkeypatch):
    real_read_head = scan_module.read_head

    def guarded(path, *args, **kwargs):
        if Path(path).name == "b.jpg":
            raise PermissionError(13, "Permission denied")
        return real_read_head(path, *args, **kwargs)
    monkeypatch.setattr(scan_module, "read_head", guarded)
    real_scandir = os.scandir

    def listing(path):
        if Path(path).name == "deep":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)
    monkeypatch.setattr(scan_module.os, "scandir", listing)
    files, problems = scan_images([tree])
    assert "b.jpg" not in {f.rel for f in files}
    reasons = {path.name: reason for path, reason in problems}
    assert reasons["b.jpg"] == "permission denied"
    assert reasons["deep"] == "permission denied"


def test_empty_folder(tmp_path):
    assert scan_images([tmp_path]) == ([], [])


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 5])
def test_file_digest_matches_blake2b(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    expected = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert file_digest(tmp_path / "f.bin") == expected
    assert len(expected) == 32

"""Shared fixtures: an isolated config directory and generated collections with planted copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgdedup.files.digest import file_digest
from mgdedup.imaging.synthetic import PlantedCollection, make_collection, random_scene
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexStore


@pytest.fixture
def torch_one_thread():
    """Tiny tensors: thread hand-off (OpenMP/MKL spin-waits) costs more than the math on a
    loaded machine, up to 40 ms for one 24 x 8 matmul."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One cache folder (ONNX graphs, eval embeddings) shared by the whole test session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_config(tmp_path_factory, monkeypatch, session_cache):
    """Never read or write the developer's ~/.config/mgdedup or ~/.cache/mgdedup."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(session_cache))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> PlantedCollection:
    """40 images: 30 generated scenes and 10 edited copies (2 per edit), read-only for tests."""
    return make_collection(tmp_path_factory.mktemp("planted"), originals=30, copies_per_edit=2,
                           seed=1)


def family_of(collection: PlantedCollection) -> dict[str, int]:
    """Absolute path -> id of the original it was made from."""
    family = {str(p.resolve()): i for i, p in enumerate(collection.originals)}
    for original, copy, _ in collection.copies:
        family[str(copy.resolve())] = family[str(original.resolve())]
    return family


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".mgdedup"))
    return dst


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: compresses and resamples like a real photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height,
                     127 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    base += rng.standard_normal(base.shape, dtype=np.float32) * 12
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


# --- a small indexed library to act on (actions, undo, crash safety) --------------------------
ORIGINALS = 3


@pytest.fixture(scope="module")
def action_template(tmp_path_factory) -> Path:
    """photos/ with generated scenes, exact copies in sub/deep/ and resized JPEGs in small/, indexed
    ONCE; tests work on copies of this folder."""
    from mgdedup.index.build import update_index
    from mgdedup.model.registry import load_model

    base = tmp_path_factory.mktemp("template")
    root = base / "photos"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "small").mkdir()
    rng = np.random.default_rng(7)
    for i in range(ORIGINALS):
        image = random_scene(rng, (256, 192))
        image.save(root / f"a{i}.png")
        shutil.copy2(root / f"a{i}.png", root / "sub" / "deep" / f"a{i}.png")
        image.resize((128, 96), Image.BILINEAR).save(root / "small" / f"a{i}.jpg", quality=90)
    update_index([root], root / ".mgdedup", load_model(), "default", 224, workers=0)
    return base


@pytest.fixture
def lib(action_template, tmp_path) -> tuple[Path, Path]:
    """A private copy of the indexed folder (mtimes kept) whose index points at the copy."""
    base = tmp_path / "lib"
    shutil.copytree(action_template, base, symlinks=True)
    root, index_dir = base / "photos", base / "photos" / ".mgdedup"
    with IndexStore.open(IndexDir(index_dir).embeddings, mode="a") as store:
        store.set_roots([str(root)])
    return root, index_dir


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below root (index folder excluded): digest and mtime, or a link target."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".mgdedup"]
        for name in files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            else:
                out[rel] = (file_digest(path), path.stat().st_mtime_ns, path.stat().st_ino)
    return out


def content(snap: dict[str, tuple]) -> dict[str, tuple]:
    """A snapshot without inode numbers (a restored file may be a new inode after a copy)."""
    return {k: v[:2] for k, v in snap.items()}



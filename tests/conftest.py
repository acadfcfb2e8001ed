"""Shared fixtures: an isolated config directory and generated collections with planted copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgdedup.imaging.synthetic import PlantedCollection, make_collection


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
    import shutil

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

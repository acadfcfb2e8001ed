"""The batched file pipeline gives each image the vector it gets alone, in input order."""

from __future__ import annotations

import pytest
import torch
from conftest import photo

from mgdedup.embed import Embedder
from mgdedup.registry import DEFAULT_MODEL, load_model
from mgdedup.transforms import load_for_embedding

# s* = 256 > 224 keeps aspect ratios: several shapes in one batch, some repeated
SIZES = [(640, 480), (480, 640), (640, 480), (600, 451), (640, 480), (360, 800), (301, 227)]


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"{i}.jpg"
        photo(w, h, seed=i).save(path, quality=90)
        paths.append(path)
    bad = folder / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths.insert(3, bad)
    return paths


@pytest.mark.parametrize("backend,workers", [("auto", 0), ("torch", 0), ("auto", 1)])
def test_batches_equal_single_images_in_order(model, files, backend, workers, tmp_path,
                                              monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    embedder = Embedder(model, 256, batch_size=4, workers=workers, backend=backend)
    positions, errors, rows = [], [], []
    for batch in embedder.embed_files(files, digest=False, keep_gem=True):
        positions += batch.positions
        errors += [position for position, _ in batch.errors]
        rows.append(batch.gem)
    assert errors == [3]
    assert positions == [i for i in range(len(files)) if i != 3]
    got = torch.cat(rows)
    alone = torch.cat([embedder.gem([load_for_embedding(files[i], 256)[0]])
                       for i in positions])
    assert torch.allclose(got, alone, rtol=1e-4, atol=1e-6)
    shapes = {tuple(load_for_embedding(files[i], 256)[0].shape) for i in positions}
    assert (3, 192, 256) in shapes and len(shapes) >= 4  # really mixed shapes

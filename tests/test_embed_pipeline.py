"""The batched file pipeline gives each image the vector it gets alone, in input order."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import photo

from mgdedup.embedding.embedder import (
    DecodedImage,
    Embedder,
    WorkerForward,
)
from mgdedup.embedding.onnx_trunk import OnnxTrunk
from mgdedup.imaging.transforms import load_for_embedding
from mgdedup.model.registry import DEFAULT_MODEL, load_model

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


@pytest.mark.parametrize("backend,workers", [("auto", 0), ("torch", 0), ("torch", 1), ("auto", 1),
                                             ("auto", 2)])
def test_batches_equal_single_images_in_order(model, files, backend, workers, tmp_path,
                                              monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    embedder = Embedder(model, 256, batch_size=4, workers=workers, backend=backend)
    assert embedder.forward_in_workers == (backend == "auto" and workers > 0)
    positions, errors, rows = [], [], []
    for batch in embedder.embed_files(files, digest=False, keep_gem=True):
        positions += batch.positions
        errors += [position for position, _ in batch.errors]
        rows.append(batch.gem)
    assert errors == [3]
    assert positions == [i for i in range(len(files)) if i != 3]
    if embedder.forward_in_workers:  # the workers embedded: the main process ran no session
        assert embedder.onnx is not None and not embedder.onnx.sessions
    got = torch.cat(rows)
    alone = torch.cat([embedder.gem([load_for_embedding(files[i], 256)[0]])
                       for i in positions])
    assert torch.allclose(got, alone, rtol=1e-4, atol=1e-6)
    shapes = {tuple(load_for_embedding(files[i], 256)[0].shape) for i in positions}
    assert (3, 192, 256) in shapes and len(shapes) >= 4  # really mixed shapes


def test_worker_forward_gives_the_main_process_vector(model, files, tmp_path, monkeypatch):
    """What a worker computes (its own single-threaded session + GeM) is what the main process
    computes; a copy sent to a spawned worker leaves the sessions behind."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    embedder = Embedder(model, 256, workers=0)
    assert embedder.onnx is not None
    forward = WorkerForward(embedder.onnx, embedder.p, model.pool.eps, threads=1, max_sessions=2)
    tensor, size = load_for_embedding(files[0], 256)
    item = forward(DecodedImage(0, tensor.clone(), size, "d"))
    assert item.tensor is None and item.readable
    expected = embedder.gem([tensor])[0]
    assert torch.allclose(torch.from_numpy(item.gem), expected, rtol=1e-5, atol=1e-7)
    assert forward._onnx is not None and forward._onnx.threads == 1
    copy = pickle.loads(pickle.dumps(forward))
    assert copy._onnx is None and copy.fingerprint == embedder.onnx.fingerprint
    unreadable = forward(DecodedImage(1, None, (0, 0), "", "broken"))
    assert unreadable.gem is None and not unreadable.readable


def test_onnx_failure_in_workers_falls_back_to_pytorch(model, files, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reference = Embedder(model, 256, batch_size=3, workers=0, backend="torch")
    expected = torch.cat([b.gem for b in reference.embed_files(files, digest=False,
                                                               keep_gem=True)])

    def broken(self, images):
        raise RuntimeError("simulated ONNX Runtime failure")

    monkeypatch.setattr(OnnxTrunk, "forward_features", broken)  # in the workers too (fork)
    embedder = Embedder(model, 256, batch_size=3, workers=2)
    assert embedder.forward_in_workers
    batches = list(embedder.embed_files(files, digest=False, keep_gem=True))
    got = torch.cat([b.gem for b in batches])
    assert [p for b in batches for p, _ in b.errors] == [3]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert embedder.backend == "torch"  # the main process gave ONNX Runtime up as well


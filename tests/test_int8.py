"""int8 rows: the quantised trunk stays close to PyTorch's, an index records its precision and
keeps it, its queries are embedded in it, and its cached graphs are trusted only as written."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: int8 path untested")
pytest.importorskip("onnx", reason="onnx not installed: ONNX graphs cannot be written")

from cli_helpers import one_line_error, run  # noqa: E402
from conftest import photo  # noqa: E402

from mgdedup.embedding import int8_graph  # noqa: E402
from mgdedup.embedding.embedder import Embedder  # noqa: E402
from mgdedup.embedding.onnx_trunk import OnnxTrunk, padding_class  # noqa: E402
from mgdedup.index.build import update_index  # noqa: E402
from mgdedup.index.store import DamagedIndex, IndexMeta, IndexStore  # noqa: E402
from mgdedup.model.fingerprint import weights_fingerprint  # noqa: E402
from mgdedup.model.registry import DEFAULT_MODEL, load_model  # noqa: E402

RES = 96

if not int8_graph.quantiser_available():
    pytest.skip("this onnxruntime cannot quantise from given ranges", allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for seed in range(4):
        photo(160 + 16 * seed, 120, seed).save(root / f"p{seed}.jpg", quality=92)
    return root


def _gem(features: np.ndarray) -> np.ndarray:
    return (np.maximum(features, 1e-6) ** 3).mean(axis=(2, 3)) ** (1 / 3)


def test_the_default_model_has_shipped_ranges(model):
    assert int8_graph.ranges_for(weights_fingerprint(model.trunk, model.info.trunk))
    assert int8_graph.ranges_for("some-other-weights") is None


def test_int8_trunk_stays_close_to_pytorch(model, tmp_path):
    trunk = OnnxTrunk(model.trunk, model.info.trunk, cache=tmp_path, precision="int8")
    for seed, (width, height) in enumerate(((128, 96), (96, 128), (224, 224))):
        image = np.asarray(photo(width, height, seed), np.float32) / 255
        batch = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
        with torch.inference_mode():
            expected = _gem(model.trunk.forward_features(batch).numpy())[0]
        got = _gem(trunk.forward_features(batch).numpy())[0]
        cosine = float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected))
        assert 0.95 <= cosine < 0.999999, cosine  # close, and really quantised


def test_a_changed_int8_graph_is_written_again(model, tmp_path):
    trunk = OnnxTrunk(model.trunk, model.info.trunk, cache=tmp_path, precision="int8")
    trunk.session(96, 128)
    path = trunk.model_path(padding_class(96, 128))
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    again = OnnxTrunk(model.trunk, model.info.trunk, cache=tmp_path, precision="int8")
    from mgdedup.embedding import onnx_cache

    onnx_cache._verified.clear()
    again.session(96, 128)
    assert path.read_bytes() == good  # quantisation from fixed ranges is reproducible


def test_an_int8_index_keeps_its_precision(folder, model):
    index_dir = folder / ".mgdedup"
    update_index([folder], index_dir, model, DEFAULT_MODEL, RES, precision="int8")
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        assert store.meta.precision == "int8"
        rows = dict(zip(store.absolute_paths(), store.embeddings()))
    fp32_dir = folder.parent / "fp32"
    update_index([folder], fp32_dir, model, DEFAULT_MODEL, RES)  # fp32: the default
    with IndexStore.open(fp32_dir / "embeddings.h5") as store:
        assert store.meta.precision == "fp32"
        fp32_rows = dict(zip(store.absolute_paths(), store.embeddings()))
    reference = Embedder(model, RES, workers=0, backend="torch")
    for path, row in fp32_rows.items():  # fp32 rows are PyTorch's
        (expected,) = [b.descriptors.descriptors[0] for b in
                       reference.embed_files([path], digest=False)]
        np.testing.assert_allclose(row, expected, atol=1e-4)
        cosine = float(row @ rows[path])
        assert 0.9 <= cosine < 0.99999, cosine

    # a new file added to each index is embedded in that index's precision
    photo(200, 150, 9).save(folder / "new.jpg", quality=92)
    update_index([folder], fp32_dir, None, DEFAULT_MODEL, RES)
    update_index([folder], index_dir, None, DEFAULT_MODEL, RES)
    new = str((folder / "new.jpg").resolve())
    (torch_row,) = [b.descriptors.descriptors[0] for b in
                    reference.embed_files([new], digest=False)]
    int8 = Embedder(model, RES, workers=0, precision="int8")
    (int8_row,) = [b.descriptors.descriptors[0] for b in int8.embed_files([new], digest=False)]
    with IndexStore.open(fp32_dir / "embeddings.h5") as store:
        assert store.meta.precision == "fp32"
        np.testing.assert_allclose(dict(zip(store.absolute_paths(), store.embeddings()))[new],
                                   torch_row, atol=1e-4)
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        assert store.meta.precision == "int8"
        np.testing.assert_allclose(dict(zip(store.absolute_paths(), store.embeddings()))[new],
                                   int8_row, atol=1e-5)

    # another precision for an existing index is refused, in one line
    one_line_error(run("index", folder, "-r", RES, "--out", fp32_dir, "--precision", "int8"),
                   "precision differs")


def test_queries_of_an_int8_index_are_embedded_in_int8(folder, model, tmp_path):
    from mgdedup.queries.search import _embedded_queries

    index_dir = folder / ".mgdedup"
    update_index([folder], index_dir, model, DEFAULT_MODEL, RES, precision="int8")
    query = tmp_path / "query.jpg"
    photo(180, 130, 21).save(query, quality=92)
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        meta = store.meta
    got = _embedded_queries(meta, None, [query], workers=0)[0].descriptors.descriptors[0]
    int8 = Embedder(model, RES, workers=0, precision="int8")
    (expected,) = [b.descriptors.descriptors[0] for b in int8.embed_files([query],
                                                                          digest=False)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    torch_path = Embedder(model, RES, workers=0, backend="torch")
    (fp32,) = [b.descriptors.descriptors[0] for b in torch_path.embed_files([query],
                                                                            digest=False)]
    assert float(got @ fp32) < 0.99999  # not the fp32 descriptor


def test_int8_needs_onnx_runtime_on_cpu(model):
    from mgdedup.errors import MgdedupError

    with pytest.raises(MgdedupError, match="ONNX Runtime"):
        Embedder(model, RES, workers=0, backend="torch", precision="int8")


def test_precision_is_part_of_what_rows_are(tmp_path):
    meta = dict(model_id="m", model_name="m", resolution=224, p=3.0, whitening_id="w", dim=8)
    assert "precision" in IndexMeta(**meta).mismatch(IndexMeta(**meta, precision="int8"))
    path = tmp_path / "embeddings.h5"
    IndexStore.create(path, IndexMeta(**meta, precision="int8")).close()
    with IndexStore.open(path) as store:
        assert store.meta.precision == "int8"
    old = tmp_path / "old.h5"
    IndexStore.create(old, IndexMeta(**meta)).close()
    with h5py.File(old, "r") as f:
        assert "precision" not in f.attrs  # an fp32 index is written as before int8 existed
    with IndexStore.open(old) as store:
        assert store.meta.precision == "fp32"
    forged = tmp_path / "forged.h5"
    shutil.copy(path, forged)
    with h5py.File(forged, "r+") as f:
        del f.attrs["precision"]  # int8 rows passed off as fp32
    with pytest.raises(DamagedIndex):
        IndexStore.open(forged).close()

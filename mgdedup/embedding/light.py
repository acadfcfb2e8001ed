"""Embedding and classifying a few images without PyTorch, for answers in about a second.

Importing PyTorch and building the model costs 2-4 s on a small machine, more than embedding
one image. Everything the forward pass needs after the trunk is small: p*, GeM's eps, the
whitening's mean and matrix, the classifier and the class names. They are written, the first
time a model is used with PyTorch at a resolution, to
``$XDG_CACHE_HOME/mgdedup/models/<source key>-r<resolution>.npz``, next to the model facts
(`mgdedup.model.facts`, same key: a changed model file gets a new one). The trunk itself runs
from the ONNX graphs `mgdedup.embedding.onnx_trunk` already caches, one per input-padding class.

Trust: the arrays file is read with ``allow_pickle=False`` and used only while its bytes match
the seal written beside it; the graphs only while theirs match (`onnx_cache.sealed`), the same
rule as the PyTorch path's. Whatever is missing (no arrays yet, an input shape whose graph was
never written, a changed file) makes `load` or `embed_files` give up with `NotCached`, and the
caller runs the PyTorch path, which writes it for the next time. The numbers are the PyTorch
path's to ~1e-6 (`tests/test_light.py`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mgdedup.cpus import available_cpus
from mgdedup.embedding import onnx_cache
from mgdedup.embedding.results import EmbeddedBatch
from mgdedup.files import user_dirs
from mgdedup.files.atomic import write_bytes
from mgdedup.imaging.reading import ImageReadError
from mgdedup.model.descriptors import Descriptors
from mgdedup.model.facts import source_key

if TYPE_CHECKING:
    from mgdedup.model.multigrain import MultiGrainModel

log = logging.getLogger(__name__)

ARRAYS_VERSION = 1
#: F.normalize's eps, so that the descriptors are the PyTorch path's
NORMALIZE_EPS = 1e-12


class NotCached(Exception):
    """Something the light path needs is not in the cache: run the PyTorch path instead."""


def arrays_file(canonical: str, resolution: int) -> Path | None:
    key = source_key(canonical)
    if key is None:
        return None
    return user_dirs.cache_dir("models") / f"{key}-r{int(resolution)}.npz"


def remember_arrays(canonical: str, model: MultiGrainModel, resolution: int) -> None:
    """Write what the light path needs of `model` at `resolution` (best effort; only for
    trunks that have ONNX graphs)."""
    from mgdedup.embedding import onnx_trunk

    path = arrays_file(canonical, resolution)
    if path is None or not onnx_trunk.supports(model.trunk):
        return
    if path.is_file() and onnx_cache._sealed(path):
        return
    whitening = model.whitening_for(resolution)
    classifier = model.trunk.classifier
    arrays = {
        "version": np.array(ARRAYS_VERSION),
        "fingerprint": np.array(model.fingerprint()),
        "trunk": np.array(model.info.trunk),
        "p": np.array(float(model.p_for(resolution))),
        "eps": np.array(float(model.pool.eps)),
        "whitening_id": np.array(whitening.identifier if whitening is not None else ""),
        "mean": (whitening.mean.detach().float().cpu().numpy() if whitening is not None
                 else np.zeros(0, np.float32)),
        "matrix": (whitening.matrix.detach().float().cpu().numpy() if whitening is not None
                   else np.zeros((0, 0), np.float32)),
        "weight": classifier.weight.detach().float().cpu().numpy(),
        "bias": classifier.bias.detach().float().cpu().numpy(),
        "class_names": np.array(list(model.class_names), dtype=str),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_bytes(path, buffer.getvalue(), "model arrays cache")
        onnx_cache._seal(path)
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written costs time only
        log.debug("model arrays not cached: %s", error)


@dataclass
class LightModel:
    """A cached model at one resolution: numpy arrays, and the trunk through ONNX Runtime."""

    resolution: int
    fingerprint: str
    trunk: str
    p: float
    eps: float
    whitening_id: str
    mean: np.ndarray | None  # (D,) or None without whitening
    matrix: np.ndarray | None  # (k, D)
    weight: np.ndarray  # (classes, C)
    bias: np.ndarray  # (classes,)
    class_names: list[str]

    @classmethod
    def load(cls, canonical: str, resolution: int) -> LightModel:
        """The cached arrays of model `canonical` at `resolution`; NotCached if absent or
        changed since they were written."""
        path = arrays_file(canonical, resolution)
        if path is None or not path.is_file() or not onnx_cache._sealed(path):
            raise NotCached(f"no cached arrays for {canonical} at {resolution}")
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["version"]) != ARRAYS_VERSION:
                    raise NotCached("arrays of another version")
                has_whitening = data["matrix"].size > 0
                return cls(
                    resolution=int(resolution), fingerprint=str(data["fingerprint"]),
                    trunk=str(data["trunk"]), p=float(data["p"]), eps=float(data["eps"]),
                    whitening_id=str(data["whitening_id"]),
                    mean=np.asarray(data["mean"], np.float32) if has_whitening else None,
                    matrix=np.asarray(data["matrix"], np.float32) if has_whitening else None,
                    weight=np.asarray(data["weight"], np.float32),
                    bias=np.asarray(data["bias"], np.float32),
                    class_names=[str(name) for name in data["class_names"]])
        except (OSError, ValueError, KeyError) as error:
            raise NotCached(f"unreadable arrays file {path}: {error}") from None

    def embed_files(self, paths: Sequence[Path], *, with_hash: bool = True,
                    keep_gem: bool = False, precision: str = "fp32") -> Iterator[EmbeddedBatch]:
        """One EmbeddedBatch per file (positions into `paths`), like `Embedder.embed_files`
        without digests. NotCached when a file's input size has no checked graph yet (in
        `precision`: an int8 index's queries go through its int8 graphs)."""
        from mgdedup.imaging.transforms import load_array

        runner = _Trunk(self.fingerprint, precision)
        for position, path in enumerate(paths):
            try:
                pixels, size, hashed = load_array(path, self.resolution, with_hash)
            except ImageReadError as error:
                yield _failed(position, str(error), self.dim)
                continue
            features = runner.forward(pixels[None])
            gem = self.gem(features)
            if not np.isfinite(gem).all():
                yield _failed(position, "the model gave values that are not finite numbers "
                              "for this image", self.dim)
                continue
            yield EmbeddedBatch(positions=[position], sizes=[size], digests=[""],
                                descriptors=self.describe(gem), errors=[],
                                gem=gem if keep_gem else None, phashes=[int(hashed)])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0]) if self.matrix is not None else \
            int(self.weight.shape[1])

    def gem(self, features: np.ndarray) -> np.ndarray:
        """(B, C, h, w) -> (B, C): `mgdedup.model.pooling.gem` in float32."""
        p = np.float32(self.p)
        pooled = np.power(np.maximum(features, np.float32(self.eps)), p).mean(axis=(2, 3),
                                                                             dtype=np.float32)
        return np.power(pooled, np.float32(1.0) / p).astype(np.float32)

    def describe(self, g: np.ndarray) -> Descriptors:
        """`MultiGrainModel.describe` in numpy."""
        gem_norm = np.linalg.norm(g, axis=1).astype(np.float32)
        x = g / np.maximum(gem_norm, NORMALIZE_EPS)[:, None]
        if self.matrix is None:
            y = x
        else:
            y = (x - self.mean) @ self.matrix.T
        white_norm = np.linalg.norm(y, axis=1).astype(np.float32)
        descriptors = (y / np.maximum(white_norm, NORMALIZE_EPS)[:, None]).astype(np.float32)
        if self.matrix is None:
            white_norm = np.ones_like(white_norm)
        return Descriptors(descriptors, gem_norm, white_norm)

    def logits(self, g: np.ndarray) -> np.ndarray:
        """The classifier on the raw GeM vectors, as `MultiGrainModel.logits`."""
        return g @ self.weight.T + self.bias


class _Trunk:
    """The trunk's checked ONNX graphs of one model, opened as input sizes come."""

    def __init__(self, fingerprint: str, precision: str = "fp32") -> None:
        self.ort = onnx_cache.import_ort()
        self.fingerprint, self.precision = fingerprint, precision
        self.cache = onnx_cache.cache_dir()
        self.sessions: dict[Any, Any] = {}

    def forward(self, batch: np.ndarray) -> np.ndarray:
        key = onnx_cache.padding_class(batch.shape[2], batch.shape[3])
        session = self.sessions.get(key)
        if session is None:
            graph, weights = onnx_cache.graph_files(self.cache, self.fingerprint,
                                                    self.ort.__version__, key, self.precision)
            if not (onnx_cache._sealed(graph) and onnx_cache._sealed(weights)):
                raise NotCached(f"no checked ONNX graph for inputs of class "
                                f"{onnx_cache.class_name(key)}")
            try:
                session = onnx_cache.new_session(self.ort, graph, available_cpus())
            except Exception as error:  # noqa: BLE001 - ORT errors are bare Exceptions
                raise NotCached(f"ONNX graph {graph} unusable: {error}") from None
            self.sessions[key] = session
        return session.run(None, {"images": np.ascontiguousarray(batch, np.float32)})[0]


def _failed(position: int, reason: str, dim: int) -> EmbeddedBatch:
    empty = Descriptors(np.zeros((0, dim), np.float32), np.zeros(0, np.float32),
                        np.zeros(0, np.float32))
    return EmbeddedBatch(positions=[], sizes=[], digests=[], descriptors=empty,
                         errors=[(position, reason)])

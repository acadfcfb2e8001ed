"""Candidate pairs and their copy scores, kept between `dedup` runs (``IDX/candidates.npz``).

With the verification cached (`mgdedup.duplicates.evidence_cache`), what is left of a rerun
is finding every image's nearest neighbours (all pairs of descriptors: O(N^2 d), about 1.6 s
for 10,000 images of 1280 dimensions on 2 cores) and the copy score of each of the ~10^5
candidate pairs. Both are functions of what is cached here:

- the candidates are a function of the rows' descriptors and perceptual hashes, which are a
  function of the files' bytes and of the model: they are keyed by the digest and hash
  columns in row order, the model fields of the index, the candidate settings and the saved
  search structure's file (an approximate one finds other neighbours once rebuilt), so a
  changed, added or removed file, another model or a rebuilt search index recomputes them;
- the scores are a function of the pairs' features and of the copy score model: they are
  keyed by a hash of both, so new evidence or another model rescores.

The file is a cache and untrusted: NumPy arrays only, read without pickle, a checksum of its
arrays checked on reading, shapes and ranges checked; a file that fails a check is ignored
and replaced by the next run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgdedup.duplicates.candidates import Candidates
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import replacing

log = logging.getLogger(__name__)

FORMAT = "mgdedup-candidates-1"


def rows_key(store, search_file: Path, settings: str) -> str | None:
    """What the candidates of `store` depend on, hashed; None where a row's digest is
    missing (its descriptor cannot be told unchanged). `settings`: the candidate search's
    parameters, in words."""
    digests = np.asarray(store.read("digest")).astype(str)
    if len(digests) and (np.char.str_len(digests) == 0).any():
        return None
    meta = store.meta
    digest = hashlib.sha1(FORMAT.encode())
    digest.update(repr((meta.model_id, meta.resolution, meta.p, meta.whitening_id,
                        meta.precision, meta.dim, len(digests), settings)).encode())
    try:
        st = os.stat(search_file)
        digest.update(f"search:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        digest.update(b"search:none")
    digest.update(np.ascontiguousarray(digests.astype("S64")).tobytes())
    digest.update(np.ascontiguousarray(np.asarray(store.read("phash"), np.uint64)).tobytes())
    return digest.hexdigest()


def scores_key(features: np.ndarray, model_fingerprint: str) -> str:
    """What the copy scores of these pairs depend on, hashed."""
    digest = hashlib.sha1(model_fingerprint.encode())
    x = np.ascontiguousarray(features, np.float64)
    digest.update(repr(x.shape).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


@dataclass
class CachedPairs:
    rows_key: str
    candidates: Candidates
    scores_key: str = ""
    probability: np.ndarray | None = None  # float32 per pair, before same-bytes pairs


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha1()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load(path: Path, key: str | None, rows: int) -> CachedPairs | None:
    """The cached pairs of an index of `rows` rows whose rows key is `key`; None when there
    are none, they are of other rows, or the file fails a check."""
    if key is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        stored = str(arrays.pop("checksum"))
        if str(arrays["format"]) != FORMAT or stored != _checksum(arrays):
            raise ValueError("format or checksum differ")
        if str(arrays["rows_key"]) != key:
            return None
        i, j = arrays["i"].astype(np.int64), arrays["j"].astype(np.int64)
        pairs = len(i)
        shapes = {"j": (pairs,), "cosine": (pairs,), "rank": (pairs,),
                  "hash_distance": (pairs,), "background": (rows,)}
        if any(arrays[name].shape != shape for name, shape in shapes.items()):
            raise ValueError("arrays of the wrong shape")
        if pairs and (i.min() < 0 or j.max() >= rows or (i >= j).any()):
            raise ValueError("pairs outside the index")
        probability = arrays["probability"]
        if probability.shape not in ((pairs,), (0,)):
            raise ValueError("scores of the wrong shape")
        if not (np.isfinite(arrays["cosine"]).all() and np.isfinite(arrays["background"]).all()
                and np.isfinite(probability).all()):
            raise ValueError("values that are not finite")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        log.info("candidate cache %s ignored: %s", path, error)
        return None
    candidates = Candidates(i, j, arrays["cosine"].astype(np.float32),
                            arrays["rank"].astype(np.int64),
                            arrays["hash_distance"].astype(np.int64),
                            arrays["background"].astype(np.float32))
    return CachedPairs(key, candidates, str(arrays["scores_key"]),
                       probability.astype(np.float32) if len(probability) == pairs else None)


def save(path: Path, cached: CachedPairs) -> None:
    """Keep these pairs (and their scores, when given), replacing the file atomically."""
    c = cached.candidates
    probability = np.zeros(0, np.float32) if cached.probability is None else \
        np.asarray(cached.probability, np.float32)
    arrays = {
        "format": np.array(FORMAT), "rows_key": np.array(cached.rows_key),
        "i": np.asarray(c.i, np.int64), "j": np.asarray(c.j, np.int64),
        "cosine": np.asarray(c.cosine, np.float32), "rank": np.asarray(c.rank, np.int32),
        "hash_distance": np.asarray(c.hash_distance, np.int32),
        "background": np.asarray(c.background, np.float32),
        "scores_key": np.array(cached.scores_key if cached.probability is not None else ""),
        "probability": probability,
    }
    arrays["checksum"] = np.array(_checksum(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        with replacing(path, "candidate cache") as tmp:
            tmp.write_bytes(buffer.getvalue())
    except MgdedupError as error:  # a cache that cannot be written costs time only
        log.warning("%s", error)

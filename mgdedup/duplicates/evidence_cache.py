"""Verification results kept between `dedup` runs, by the content of the two files.

Verifying a candidate pair (local features and a homography) costs ~10 ms, and `dedup`,
`dedup --action ...` and its `--apply` each need every pair: without a cache each would
verify the whole collection again. Evidence is kept per pair of file digests (the blake2b
of each file's bytes, from the index), so a changed file is verified again and an unchanged
one never is. Each run writes the evidence of its own candidate pairs only: the file never
outgrows the collection.

The file (``IDX/verified.npz``) is a cache and untrusted: NumPy arrays only, read without
pickle; a checksum of its arrays and the verification settings it was made with are checked
on reading, and a file that fails any check is ignored (and replaced by the next run).
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mgdedup.duplicates import local_match
from mgdedup.duplicates.local_match import Evidence, EvidenceRows
from mgdedup.files.atomic import replacing

log = logging.getLogger(__name__)

FORMAT = "mgdedup-verified-1"
#: digests are 32 hex characters (`mgdedup.files.digest`)
DIGEST_BYTES = 32
CELLS = local_match.GRID * local_match.GRID


def settings() -> str:
    """What a piece of evidence depends on besides the two files' bytes."""
    import cv2

    names = ("EVIDENCE_VERSION", "LOCAL_SIDE", "LOCAL_FEATURES", "RATIO", "MIN_MATCHES",
             "RANSAC_PIXELS", "RANSAC_ITERATIONS", "MIRROR_BELOW", "GRID", "TEXTURE_STD",
             "AGREE_NCC", "FLAT_DIFF", "GAIN_SPREAD", "GAIN_RANGE", "MAX_SCALE", "FRAME_LINEAR",
             "FRAME_SHIFT")
    values = ",".join(f"{name}={getattr(local_match, name)}" for name in names)
    return f"{FORMAT};{values};opencv={cv2.__version__}"


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def pair_keys(digests: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """One key per pair (an S64 array): the two digests in order (a pair is the same either
    way round), b"" where a digest is missing."""
    codes = np.asarray(digests).astype(f"S{DIGEST_BYTES}")  # ASCII hex; longer ones are cut
    valid = np.char.str_len(np.asarray(digests).astype(str)) == DIGEST_BYTES
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    a, b = codes[i], codes[j]
    first, second = np.where(a <= b, a, b), np.where(a <= b, b, a)
    both = np.concatenate([first.view(np.uint8).reshape(-1, DIGEST_BYTES),
                           second.view(np.uint8).reshape(-1, DIGEST_BYTES)], axis=1)
    keys = np.ascontiguousarray(both).view(f"S{2 * DIGEST_BYTES}").reshape(-1)
    return np.where(valid[i] & valid[j], keys, np.array(b"", f"S{2 * DIGEST_BYTES}"))


class CachedEvidence:
    """The cached evidence: keys sorted, a row of `Evidence.as_row` values per key and the
    cell states of the framed ones (by key position)."""

    def __init__(self, keys: np.ndarray | None = None, values: np.ndarray | None = None,
                 cells: dict[int, bytes] | None = None) -> None:
        self.keys = np.zeros(0, f"S{2 * DIGEST_BYTES}") if keys is None else keys
        self.values = np.zeros((0, 9)) if values is None else values
        self.cells = cells or {}

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """The position of each key among the cached ones, -1 where it is not cached (or
        empty)."""
        keys = np.asarray(keys, f"S{2 * DIGEST_BYTES}")
        if not len(self.keys) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where((self.keys[at] == keys) & (keys != b""), at, -1).astype(np.int64)

    def get(self, key: bytes | None) -> Evidence | None:
        if not key:
            return None
        at = int(self.positions(np.array([key]))[0])
        return None if at < 0 else Evidence.from_row(self.values[at], self.cells.get(at))

    def rows(self, positions: np.ndarray) -> EvidenceRows:
        """The evidence at these positions (all >= 0), in their order."""
        positions = np.asarray(positions, np.int64)
        cells = {k: self.cells[p] for k, p in enumerate(positions.tolist()) if p in self.cells}
        return EvidenceRows(self.values[positions], cells)


def load(path: Path) -> CachedEvidence:
    """The cached evidence; empty when there is none or it fails a check."""
    if not path.is_file():
        return CachedEvidence()
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        stored = str(arrays.pop("checksum"))
        if stored != _checksum(arrays) or str(arrays["settings"]) != settings():
            raise ValueError("checksum or settings differ")
        keys, values = arrays["keys"], arrays["values"]
        cell_rows, cells = arrays["cell_rows"], arrays["cells"]
        if keys.dtype != np.dtype(f"S{2 * DIGEST_BYTES}") or values.shape != (len(keys), 9) \
                or cells.shape != (len(cell_rows), CELLS) or cells.dtype != np.uint8 \
                or (len(cell_rows) and not (0 <= cell_rows.min() <= cell_rows.max()
                                            < len(keys))):
            raise ValueError("arrays of the wrong shape")
        if not np.isfinite(values).all():
            raise ValueError("values that are not finite")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        log.info("verification cache %s ignored: %s", path, error)
        return CachedEvidence()
    ascending = len(keys) < 2 or bool((keys[1:] > keys[:-1]).all())  # as `save` writes
    order = np.arange(len(keys)) if ascending else np.argsort(keys, kind="stable")
    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))
    framed = {int(where[row]): cell.tobytes() for row, cell in zip(cell_rows.tolist(), cells)}
    return CachedEvidence(keys[order], values[order], framed)


def save(path: Path, keys: np.ndarray, evidence: Sequence[Evidence]) -> None:
    """Keep the evidence of these pairs (those with a key), replacing the file atomically."""
    rows = EvidenceRows.of(evidence)
    keys = np.asarray(keys, f"S{2 * DIGEST_BYTES}")
    keyed = np.flatnonzero(keys != b"")
    unique, first = np.unique(keys[keyed], return_index=True)  # sorted
    picked = keyed[first]
    framed = [(row, rows.cells[k]) for row, k in enumerate(picked.tolist()) if k in rows.cells]
    arrays = {
        "settings": np.array(settings()),
        "keys": unique.astype(f"S{2 * DIGEST_BYTES}"),
        "values": rows.values[picked].reshape(-1, 9),
        "cell_rows": np.array([row for row, _ in framed], np.int64),
        "cells": np.array([np.frombuffer(c, np.uint8) for _, c in framed],
                          np.uint8).reshape(-1, CELLS),
    }
    arrays["checksum"] = np.array(_checksum(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with replacing(path, "verification cache") as tmp:
        tmp.write_bytes(buffer.getvalue())

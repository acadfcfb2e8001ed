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
from pathlib import Path

import numpy as np

from mgdedup.duplicates import local_match
from mgdedup.duplicates.local_match import Evidence
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


def pair_keys(digests: np.ndarray, i: np.ndarray, j: np.ndarray) -> list[bytes | None]:
    """One key per pair: the two digests in order (a pair is the same either way round),
    None where a digest is missing."""
    out: list[bytes | None] = []
    for a, b in zip(i.tolist(), j.tolist()):
        da, db = str(digests[a]), str(digests[b])
        if len(da) != DIGEST_BYTES or len(db) != DIGEST_BYTES:
            out.append(None)
        else:
            first, second = sorted((da, db))
            out.append((first + second).encode("ascii"))
    return out


def load(path: Path) -> dict[bytes, Evidence]:
    """The cached evidence by pair key; empty when there is none or it fails a check."""
    if not path.is_file():
        return {}
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
        return {}
    framed = dict(zip(cell_rows.tolist(), cells))
    out = {}
    for row, (key, v) in enumerate(zip(keys.tolist(), values.tolist())):
        cell = framed.get(row)
        out[key] = Evidence(inliers=int(v[0]), cover_a=v[1], cover_b=v[2], angle=v[3],
                            log_scale=v[4], mirrored=bool(v[5]), agree=int(v[6]),
                            disagree=int(v[7]), ratio=v[8],
                            cells=None if cell is None else cell.tobytes())
    return out


def save(path: Path, keys: list[bytes | None], evidence: list[Evidence]) -> None:
    """Keep the evidence of these pairs (those with a key), replacing the file atomically."""
    kept = [(k, e) for k, e in zip(keys, evidence) if k is not None]
    framed = [(row, e.cells) for row, (_, e) in enumerate(kept) if e.cells is not None]
    arrays = {
        "settings": np.array(settings()),
        "keys": np.array([k for k, _ in kept], dtype=f"S{2 * DIGEST_BYTES}"),
        "values": np.array([e.as_row() for _, e in kept], np.float64).reshape(-1, 9),
        "cell_rows": np.array([row for row, _ in framed], np.int64),
        "cells": np.array([np.frombuffer(c, np.uint8) for _, c in framed],
                          np.uint8).reshape(-1, CELLS),
    }
    arrays["checksum"] = np.array(_checksum(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with replacing(path, "verification cache") as tmp:
        tmp.write_bytes(buffer.getvalue())

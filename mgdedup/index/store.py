"""The on-disk index rows: ``IDX/embeddings.h5``, the source of truth of an index directory.

The format is public and versioned: docs/index-format.md describes every attribute and
column; this module is its only reader and writer (``FORMAT_VERSION`` below).

Concurrency: why every operation opens and closes the file
----------------------------------------------------------
HDF5 without SWMR is not safe to read while another process writes it, and SWMR would forbid
variable-length strings and need ``libver="latest"`` (unreadable by older HDF5). So the file is
opened with HDF5 file locking (``locking="best-effort"``: shared lock for readers, exclusive for
the writer; silently unlocked on filesystems without ``flock``) and :class:`IndexStore` holds no
handle between calls: each public method opens the file, does its work and closes it. The
writer's exclusive window is therefore one ``append`` (milliseconds), readers slip in between
batches, and a call that meets a lock retries for up to ``lock_timeout`` seconds.

A read-mode store sees a snapshot: the row count fixed at ``open`` (or ``refresh``). Appends by
other processes are invisible until ``refresh``/reopen, which keeps columns read in separate
calls consistent. If the file is replaced (compaction by another process), row numbers are no
longer valid and reads raise :class:`MgdedupError`.

Why no compression: ``embeddings`` are random-looking floats (gzip saves little, costs a lot),
and a compressed chunk rewritten by a later append moves inside the file, leaving holes HDF5
never reuses across opens. Each append (one reopen) also starts a new 4 KiB global heap block
for the ``paths`` strings; batches of a few hundred rows keep that overhead small, and
:meth:`IndexStore.compact` (or any ``remove_rows``) rewrites the file without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from mgdedup.embedding.onnx_cache import PRECISIONS
from mgdedup.errors import MgdedupError, one_line
from mgdedup.files.atomic import replacing
from mgdedup.imaging.perceptual_hash import UNKNOWN as UNKNOWN_HASH

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

FORMAT = "mgdedup-index"
FORMAT_VERSION = 2
#: versions this module reads; a version 1 index opened for writing is upgraded in place
READABLE_VERSIONS = (1, 2)
DIGEST_CHARS = 32

_PATH_DTYPE = h5py.string_dtype("utf-8")
_DIGEST_DTYPE = h5py.string_dtype("ascii", DIGEST_CHARS)
#: one-dimensional columns and their on-disk dtypes (``embeddings`` is handled apart)
_COLUMNS: dict[str, Any] = {
    "paths": _PATH_DTYPE,
    "root": np.int32,
    "size": np.int64,
    "mtime_ns": np.int64,
    "digest": _DIGEST_DTYPE,
    "width": np.int32,
    "height": np.int32,
    "gem_norm": np.float32,
    "white_norm": np.float32,
    "phash": np.uint64,
}
DATASETS = (*_COLUMNS, "embeddings")
#: columns added after the first files were written: a file without one reads it as its
#: `_missing` value, and gets it (that value for the old rows) when it is next written
ADDED_COLUMNS = ("phash",)


def _missing(name: str, rows: int) -> np.ndarray:
    """The values of an added column a file lacks."""
    if name == "phash":
        return np.full(rows, UNKNOWN_HASH, np.uint64)
    raise KeyError(name)
#: root attribute: rows committed (written last by each append)
ROWS_ATTR = "rows"
#: root attribute present while an append is under way (its starting row): found on opening,
#: it says a writer died mid-append, whose half-written data (HDF5 heap blocks included)
#: must not be appended to; `interrupted` tells, `compact` cleans
APPENDING_ATTR = "appending"
_SCALAR_CHUNK_ROWS = 4096
#: free space kept beyond the chunks an append allocates: HDF5's metadata and heap blocks
_SPACE_MARGIN = 128 * 1024
_EMBEDDING_CHUNK_BYTES = 256 * 1024
_COPY_BLOCK_BYTES = 64 * 1024 * 1024


class DamagedIndex(MgdedupError):
    """The file is an index no longer: HDF5 structures damaged, attributes or columns that
    make no sense. `mgdedup index` then salvages what can be read (`salvage`)."""


@dataclass
class IndexMeta:
    """What the rows were computed with; two indexes are comparable only if these agree."""

    model_id: str
    model_name: str
    resolution: int
    p: float
    whitening_id: str
    dim: int
    roots: list[str] = field(default_factory=list)
    threshold: float | None = None  # default `dedup` threshold measured for these descriptors
    factory: str | None = None  # FAISS factory the user chose; None: automatic by row count
    shard: str | None = None  # "K/N" for a shard index (`index --shard`), None for a whole one
    precision: str = "fp32"  # what the trunk computed the rows in: "fp32" or "int8"

    def __post_init__(self) -> None:
        self.resolution, self.dim, self.p = int(self.resolution), int(self.dim), float(self.p)
        self.factory = self.factory or None
        self.shard = self.shard or None
        self.precision = self.precision or "fp32"
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.dim <= 0 or self.resolution <= 0:
            raise ValueError(f"dim and resolution must be positive, got {self.dim}, "
                             f"{self.resolution}")
        self.roots = _check_roots(self.roots)

    def mismatch(self, other: IndexMeta) -> str | None:
        """Why descriptors of `other` cannot be mixed with these (None if they can)."""
        for name in ("model_id", "resolution", "p", "whitening_id", "dim", "precision"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs ({mine!r} vs {theirs!r})"
        return None


@dataclass
class RowBatch:
    """Rows to append (or read back): one entry per image, every field of length n."""

    paths: list[str]
    root: np.ndarray
    size: np.ndarray
    mtime_ns: np.ndarray
    digest: list[str]
    width: np.ndarray
    height: np.ndarray
    embeddings: np.ndarray
    gem_norm: np.ndarray
    white_norm: np.ndarray
    #: (N,) uint64 perceptual hashes (`mgdedup.imaging.perceptual_hash`); None: unknown
    phash: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Coerce to the on-disk dtypes and refuse ragged or lossy input early, before a
        half-written append could make the columns disagree."""
        self.paths = [str(p) for p in self.paths]
        self.digest = [str(d) for d in self.digest]
        n = len(self.paths)
        for name, dtype in (("root", np.int32), ("size", np.int64), ("mtime_ns", np.int64),
                            ("width", np.int32), ("height", np.int32),
                            ("gem_norm", np.float32), ("white_norm", np.float32)):
            setattr(self, name, _coerce(name, getattr(self, name), dtype, (n,)))
        if self.phash is None:
            self.phash = np.full(n, UNKNOWN_HASH, np.uint64)
        self.phash = _coerce("phash", self.phash, np.uint64, (n,))
        emb = np.asarray(self.embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"embeddings must be ({n}, dim), got {emb.shape}")
        self.embeddings = _coerce("embeddings", emb, np.float32, emb.shape)
        if len(self.digest) != n:
            raise ValueError(f"digest has {len(self.digest)} entries, expected {n}")
        for d in self.digest:
            if len(d) != DIGEST_CHARS or not d.isascii():
                raise ValueError(f"digest must be {DIGEST_CHARS} ASCII hex chars, got {d!r}")
        for p in self.paths:
            if not p or p.startswith("/"):
                raise ValueError(f"paths must be relative to their root, got {p!r}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def select(self, rows: np.ndarray) -> RowBatch:
        """The rows at `rows` (indices or boolean mask), in that order."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RowBatch(**{k: [v[i] for i in idx] if isinstance(v, list) else v[idx]
                           for k, v in values.items()})


def _coerce(name: str, value: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size and not np.can_cast(arr.dtype, dtype, "same_kind"):
        raise ValueError(f"{name}: cannot store {arr.dtype} as {np.dtype(dtype)}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def _check_roots(roots: Sequence[str]) -> list[str]:
    out = [os.path.normpath(str(r)) for r in roots]
    for r in out:
        if not os.path.isabs(r):
            raise ValueError(f"index roots must be absolute paths, got {r!r}")
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



def _h5_open(path: Path, mode: str, lock_timeout: float) -> h5py.File:
    """Open with HDF5 locking, retrying while another process holds a conflicting lock."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.01
    while True:
        try:
            return h5py.File(path, mode, locking="best-effort")
        except BlockingIOError:
            pass  # another process holds the lock: wait for its (short) window to close
        except FileNotFoundError as exc:
            raise MgdedupError(f"index file not found: {path}") from exc
        except OSError as exc:
            if "already open" not in str(exc):  # same process, another thread: wait too
                raise DamagedIndex(f"index file is corrupt: {path} ({one_line(exc)})") from exc
        if time.monotonic() >= deadline:
            raise MgdedupError(f"index file {path} is locked by another process (an "
                               f"`mgdedup index` run?); try again when it finishes")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _read_meta(f: h5py.File, path: Path) -> IndexMeta:
    attrs = f.attrs
    if attrs.get("format") != FORMAT:
        raise MgdedupError(f"not an mgdedup index: {path}")
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise MgdedupError(f"index {path} has format version {version}; this mgdedup reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))} (upgrade mgdedup "
                           "or rebuild the index)")
    try:
        meta = IndexMeta(model_id=str(attrs["model_id"]), model_name=str(attrs["model_name"]),
                         resolution=int(attrs["resolution"]), p=float(attrs["p"]),
                         whitening_id=str(attrs["whitening_id"]), dim=int(attrs["dim"]),
                         roots=list(json.loads(attrs["roots"])),
                         threshold=float(attrs["threshold"]) if "threshold" in attrs else None,
                         factory=str(attrs["factory"]) if "factory" in attrs else None,
                         shard=str(attrs["shard"]) if "shard" in attrs else None,
                         precision=str(attrs["precision"]) if "precision" in attrs else "fp32")
    except (KeyError, ValueError, TypeError) as exc:
        raise DamagedIndex(f"index file is corrupt: {path} (bad attribute: "
                           f"{one_line(exc)})") from exc
    sealed = attrs.get(META_DIGEST_ATTR)
    if sealed is not None and str(sealed) != _meta_digest(f):
        raise DamagedIndex(f"index file is corrupt: {path} (its attributes were changed or "
                           "damaged)")
    for name in DATASETS:
        if name not in f and name not in ADDED_COLUMNS:
            raise DamagedIndex(f"index file is corrupt: {path} (missing dataset {name!r})")
    if f["embeddings"].ndim != 2 or f["embeddings"].shape[1] != meta.dim:
        raise DamagedIndex(f"index file is corrupt: {path} (embeddings are not N x {meta.dim})")
    return meta


def _row_count(f: h5py.File) -> int:
    """The committed rows: ``rows`` is written only after a batch's every column is written
    and flushed, so rows a writer was still writing when it died (or a full disk stopped) are
    never seen. A version 1 file has no ``rows``: the rows every column has."""
    lengths = {name: f[name].shape[0] for name in DATASETS if name in f}
    n = min(lengths.values())
    committed = f.attrs.get(ROWS_ATTR)
    if committed is not None:
        try:
            committed = int(committed)
        except (TypeError, ValueError):
            raise DamagedIndex(f"index file is corrupt: {f.filename} (bad attribute "
                               f"{ROWS_ATTR!r})") from None
        if not 0 <= committed <= n:
            raise DamagedIndex(f"index file is corrupt: {f.filename} ({committed} rows "
                               f"committed, {n} written)")
        return committed
    if max(lengths.values()) != n:
        log.warning("index columns have different lengths %s; using the first %d rows",
                    lengths, n)
    return n


def _write_meta(f: h5py.File, meta: IndexMeta) -> None:
    f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, ROWS_ATTR: 0,
                    "model_id": meta.model_id, "model_name": meta.model_name,
                    "resolution": meta.resolution, "p": meta.p,
                    "whitening_id": meta.whitening_id, "dim": meta.dim,
                    "roots": json.dumps(meta.roots), "updated": _now()})
    if meta.threshold is not None:
        f.attrs["threshold"] = float(meta.threshold)
    # fp32 (what every index made before int8 holds) is the absence of the attribute
    precision = meta.precision if meta.precision != "fp32" else None
    for name, value in (("factory", meta.factory), ("shard", meta.shard),
                        ("precision", precision)):
        if value:
            f.attrs[name] = str(value)
        elif name in f.attrs:
            del f.attrs[name]
    _seal_meta(f)


#: root attribute: digest of the attributes that say what the rows are (`_seal_meta`)
META_DIGEST_ATTR = "meta_digest"
_SEALED_ATTRS = ("format", "model_id", "model_name", "resolution", "p", "whitening_id", "dim",
                 "roots", "threshold", "factory", "shard")
_SEALED_WHEN_PRESENT = ("precision",)


def _meta_digest(f: h5py.File) -> str:
    """blake2b of the attributes that give the rows their meaning: HDF5 checks none of its
    metadata, so a damaged model id or root list would otherwise pass for another index."""
    digest = hashlib.blake2b(digest_size=16)
    for name in _SEALED_ATTRS:
        value = f.attrs.get(name)
        digest.update(f"{name}={value!r};".encode("utf-8", "surrogateescape"))
    for name in _SEALED_WHEN_PRESENT:  # added later: older files' digests stay valid
        if name in f.attrs:
            digest.update(f"{name}={f.attrs[name]!r};".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _seal_meta(f: h5py.File) -> None:
    f.attrs[META_DIGEST_ATTR] = _meta_digest(f)


def _add_missing_columns(f: h5py.File, rows: int) -> None:
    """Upgrade an older file: the added columns it lacks, with their `_missing` values."""
    for name in ADDED_COLUMNS:
        if name not in f:
            f.create_dataset(name, shape=(rows,), maxshape=(None,), dtype=_COLUMNS[name],
                             chunks=(_SCALAR_CHUNK_ROWS,), fletcher32=True)
            if rows:
                f[name][:rows] = _missing(name, rows)


def _create_datasets(f: h5py.File, dim: int, rows: int = 0) -> None:
    """Every fixed-size column chunked with a Fletcher-32 checksum per chunk (HDF5 allows none
    on the variable-length paths, whose damaged heap fails reads by itself): damaged bytes make
    reads fail (then `salvage`) instead of returning wrong descriptors. The checksum keeps chunks
    the same size, so rewritten chunks stay in place (no growth, unlike compression)."""
    for name, dtype in _COLUMNS.items():
        f.create_dataset(name, shape=(rows,), maxshape=(None,), dtype=dtype,
                         chunks=(_SCALAR_CHUNK_ROWS,), fletcher32=name != "paths")
    chunk_rows = _embedding_chunk_rows(dim)
    f.create_dataset("embeddings", shape=(rows, dim), maxshape=(None, dim), dtype=np.float32,
                     chunks=(chunk_rows, dim), fletcher32=True)


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class IndexStore:
    """Rows of one index file. Use :meth:`create` or :meth:`open`; see the module docstring
    for the format and for why no HDF5 handle is held between calls."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "r",
                 lock_timeout: float = 30.0) -> None:
        """Prefer :meth:`open`, which checks the file first and explains what is wrong."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.lock_timeout = lock_timeout
        self._closed = False
        self.refresh()

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: IndexMeta, *,
               lock_timeout: float = 30.0) -> IndexStore:
        """A new empty index (writable). Never overwrites: an existing index is user data."""
        path = Path(path)
        if path.exists():
            raise MgdedupError(f"index file already exists: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with h5py.File(path, "x", locking="best-effort") as f:
                _write_meta(f, meta)
                _create_datasets(f, meta.dim)
        except FileExistsError as exc:
            raise MgdedupError(f"index file already exists: {path}") from exc
        except OSError as exc:
            raise MgdedupError(f"cannot create index file {path}: {one_line(exc)}") from exc
        log.info("created index %s (model %s, dim %d)", path, meta.model_name, meta.dim)
        return cls(path, "a", lock_timeout)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r", *,
             lock_timeout: float = 30.0) -> IndexStore:
        """An existing index, read-only ("r") or appendable ("a"), after checking it is one."""
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not an index file" if path.is_dir() else "not found"
            raise MgdedupError(f"index file {what}: {path}")
        if not os.access(path, os.R_OK if mode == "r" else os.R_OK | os.W_OK):
            raise MgdedupError(f"no permission to {'read' if mode == 'r' else 'write'} "
                               f"index file {path}")
        if not h5py.is_hdf5(path):
            raise DamagedIndex(f"not an mgdedup index (not an HDF5 file): {path}")
        return cls(path, mode, lock_timeout)

    def refresh(self) -> None:
        """Re-read attributes and row count: picks up rows other processes appended."""
        self._check_open()
        with self._h5("r") as f:
            self._meta = _read_meta(f, self.path)
            self._n = _row_count(f)
            self._file_id = _file_id(self.path)
            self._interrupted = APPENDING_ATTR in f.attrs

    @property
    def interrupted(self) -> bool:
        """A writer died in the middle of an append (its committed rows are intact)."""
        return self._interrupted

    def close(self) -> None:
        """Nothing is held between calls; closing only forbids further use."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- metadata --------------------------------------------------------------------------
    @property
    def meta(self) -> IndexMeta:
        return IndexMeta(**{f.name: getattr(self._meta, f.name) for f in fields(IndexMeta)})

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"IndexStore({str(self.path)!r}, mode={self.mode!r}, rows={self._n})"

    def set_roots(self, roots: list[str]) -> None:
        """Replace the root list (e.g. a new folder was indexed); rows keep their indices.

        The same list again writes nothing: touching the file would make faiss.index look
        stale and cost an unchanged re-index a full rebuild."""
        self._check_writable()
        roots = _check_roots(roots)
        if roots == self._meta.roots:
            return
        with self._h5("a") as f:
            used = f["root"][: _row_count(f)]
            if used.size and int(used.max()) >= len(roots):
                raise ValueError(f"rows refer to root {int(used.max())}, only {len(roots)} "
                                 f"roots given")
            f.attrs["roots"] = json.dumps(roots)
            f.attrs["updated"] = _now()
            _seal_meta(f)
        self._meta.roots = roots

    def set_options(self, *, factory: str | None = None, shard: str | None = None) -> None:
        """Record the FAISS factory and shard spec (None or "" removes them); a no-op, leaving
        the file untouched (and its mtime, which keeps faiss.index fresh), if nothing changes."""
        self._check_writable()
        factory, shard = factory or None, shard or None
        if (factory, shard) == (self._meta.factory, self._meta.shard):
            return
        with self._h5("a") as f:
            for name, value in (("factory", factory), ("shard", shard)):
                if value:
                    f.attrs[name] = value
                elif name in f.attrs:
                    del f.attrs[name]
            f.attrs["updated"] = _now()
            _seal_meta(f)
        self._meta.factory, self._meta.shard = factory, shard

    # --- writing ---------------------------------------------------------------------------
    def append(self, batch: RowBatch) -> None:
        """Add rows at the end and flush, so an interruption loses at most this batch."""
        self._check_writable()
        if batch.dim != self._meta.dim:
            raise ValueError(f"batch has dim {batch.dim}, index has {self._meta.dim}")
        if len(batch) and (batch.root.min() < 0 or batch.root.max() >= len(self._meta.roots)):
            raise ValueError(f"root index out of range for {len(self._meta.roots)} roots")
        k = len(batch)
        if k == 0:
            return
        self._ensure_space(batch)
        with self._h5("a") as f:
            n = _row_count(f)  # another writer may have appended since we last looked
            f.attrs[APPENDING_ATTR] = n  # cleared once committed: a kill leaves it set
            _add_missing_columns(f, n)
            f.flush()
            for name in _COLUMNS:  # rows past the committed count are overwritten
                ds = f[name]
                ds.resize((n + k,))
                ds[n:] = _encoded_paths(batch.paths) if name == "paths" else getattr(batch,
                                                                                      name)
            emb = f["embeddings"]
            emb.resize((n + k, self._meta.dim))
            emb[n:] = batch.embeddings
            f.flush()  # the rows on disk first, then the count that makes them visible
            f.attrs[ROWS_ATTR] = n + k
            f.attrs["format_version"] = FORMAT_VERSION  # a version 1 file is upgraded
            f.attrs["updated"] = _now()
            del f.attrs[APPENDING_ATTR]
            f.flush()
        self._n = n + k

    def _ensure_space(self, batch: RowBatch) -> None:
        """Refuse an append the disk cannot hold, before HDF5 starts it: a write that fails
        half-way leaves HDF5's in-memory state broken (its errors then surface while objects
        are freed, and can crash the process)."""
        needed = _append_bytes(self._n, batch) + _SPACE_MARGIN
        try:
            st = os.statvfs(self.path.parent)
        except (OSError, AttributeError):  # no statvfs (Windows): HDF5's own error then
            return
        free = st.f_bavail * st.f_frsize
        if free < needed:
            raise MgdedupError(f"no space left on device for the index {self.path} "
                               f"({free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed); "
                               "free some space and run the command again: finished batches "
                               "are kept")

    def remove_rows(self, indices: Sequence[int] | np.ndarray) -> None:
        """Drop rows (deleted files) by rewriting the file compactly; later rows move up."""
        self._check_writable()
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        if idx.size == 0:
            return
        if idx[0] < 0 or idx[-1] >= self._n:
            raise IndexError(f"row {idx[0] if idx[0] < 0 else idx[-1]} out of range for "
                             f"{self._n} rows")
        keep = np.ones(self._n, dtype=bool)
        keep[idx] = False
        self._rewrite(keep)
        log.info("removed %d rows from %s", idx.size, self.path)

    def compact(self) -> None:
        """Rewrite the file without the space many small appends leave behind."""
        self._check_writable()
        self._rewrite(np.ones(self._n, dtype=bool))

    def _rewrite(self, keep: np.ndarray) -> None:
        """Copy kept rows block by block into a temporary file and atomically swap it in."""
        n_keep = int(keep.sum())
        block = max(1, _COPY_BLOCK_BYTES // (4 * self._meta.dim))
        src = _h5_open(self.path, "r", self.lock_timeout)
        try:
            # the source stays open read-only throughout: its shared lock keeps other writers out
            self._check_same_file()
            if _row_count(src) != self._n:
                raise MgdedupError(f"index {self.path} changed while being compacted; run again")
            with replacing(self.path, "index file") as tmp, \
                    h5py.File(tmp, "w", locking="best-effort") as dst:
                for key, value in src.attrs.items():
                    if key != APPENDING_ATTR:
                        dst.attrs[key] = value
                dst.attrs["updated"] = _now()
                dst.attrs["format_version"] = FORMAT_VERSION
                dst.attrs[ROWS_ATTR] = n_keep  # written after the rows, as the file is renamed
                _create_datasets(dst, self._meta.dim, n_keep)
                out = 0
                for start in range(0, self._n, block):
                    mask = keep[start:start + block]
                    m = int(mask.sum())
                    if m == 0:
                        continue
                    for name in DATASETS:
                        dst[name][out:out + m] = src[name][start:start + len(mask)][mask] \
                            if name in src else _missing(name, m)
                    out += m
        finally:
            src.close()
        self._n = n_keep
        self._file_id = _file_id(self.path)

    # --- reading ---------------------------------------------------------------------------
    def read(self, name: str, rows: slice | Sequence[int] | np.ndarray | None = None
             ) -> np.ndarray:
        """One column for all rows, a slice, or given row indices (any order, repeats ok).

        ``paths`` come back as an object array of str, ``digest`` as ``<U32``.
        ``embeddings`` work too but read a contiguous span; prefer :meth:`iter_embeddings`.
        """
        if name not in DATASETS:
            raise ValueError(f"unknown column {name!r}; columns: {', '.join(DATASETS)}")
        with self._reading() as f:
            if name not in f:  # an added column an older file lacks
                return _missing(name, self._n)[rows if rows is not None else slice(None)]
            ds = f[name]
            if name == "paths":
                ds = ds.asstr(errors="surrogateescape")
            out = _take(ds, rows, self._n)
        if name == "digest":
            out = out.astype(f"U{DIGEST_CHARS}")
        return out

    def embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Descriptors of rows [start, stop) as float32 (stop None: to the end)."""
        start, stop, _ = slice(start, stop).indices(self._n)
        with self._reading() as f:
            return f["embeddings"][start:max(start, stop)]

    def iter_embeddings(self, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, block) pairs covering all rows; the file is closed between blocks."""
        if block_rows <= 0:
            raise ValueError("block_rows must be positive")
        for start in range(0, self._n, block_rows):
            yield start, self.embeddings(start, start + block_rows)

    def batch(self, start: int = 0, stop: int | None = None) -> RowBatch:
        """Rows [start, stop) as a RowBatch, e.g. to copy them into another index (merge)."""
        start, stop, _ = slice(start, stop).indices(self._n)
        stop = max(start, stop)
        with self._reading() as f:
            cols = {name: f[name][start:stop] for name in _COLUMNS
                    if name != "paths" and name in f}
            cols["paths"] = list(f["paths"].asstr(errors="surrogateescape")[start:stop])
            cols["digest"] = [d.decode("ascii") for d in cols["digest"]]
            cols["embeddings"] = f["embeddings"][start:stop]
        return RowBatch(**cols)

    def absolute_path(self, i: int) -> str:
        """The file of row i: its root joined with its relative path."""
        if not -self._n <= i < self._n:
            raise IndexError(f"row {i} out of range for {self._n} rows")
        i %= self._n
        root = int(self.read("root", [i])[0])
        return _join(self._meta.roots[root], self.read("paths", [i])[0])

    def absolute_paths(self) -> list[str]:
        """Files of every row, in row order."""
        roots = self._meta.roots
        return [_join(roots[r], p) for r, p in zip(self.root_ids().tolist(), self.read("paths"))]

    def root_ids(self) -> np.ndarray:
        """The ``root`` column, each value checked to name one of the index's roots."""
        root_ids = self.read("root")
        if len(root_ids) and (root_ids.min() < 0 or root_ids.max() >= len(self._meta.roots)):
            raise DamagedIndex(f"index file is corrupt: {self.path} (a row names a root "
                               f"outside the {len(self._meta.roots)} it lists)")
        return root_ids

    # --- plumbing --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"index store {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode != "a":
            raise ValueError(f"index store {self.path} was opened read-only")

    def _check_same_file(self) -> None:
        """Row numbers are only meaningful in the file they came from."""
        try:
            same = _file_id(self.path) == self._file_id
        except FileNotFoundError:
            same = False
        if not same:
            raise MgdedupError(f"index {self.path} was rewritten or removed by another "
                               f"process while in use; run the command again")

    @contextmanager
    def _h5(self, mode: str) -> Iterator[h5py.File]:
        """A short-lived handle; HDF5 I/O errors become one-line user errors."""
        self._check_open()
        # "r+", not h5py's "a": a file deleted meanwhile must not be recreated empty
        f = _h5_open(self.path, "r+" if mode == "a" else mode, self.lock_timeout)
        try:
            yield f
        except (OSError, RuntimeError) as exc:  # h5py reports a full disk as either
            if mode == "r":
                raise DamagedIndex(f"index file is corrupt: {self.path} "
                                   f"({_hdf5_reason(exc)})") from exc
            raise MgdedupError(f"index file cannot be written: {self.path} "
                               f"({_hdf5_reason(exc)})") from exc
        except (KeyError, ValueError, TypeError) as exc:  # damaged object headers, types
            raise DamagedIndex(f"index file is corrupt: {self.path} "
                               f"({_hdf5_reason(exc)})") from exc
        finally:
            f.close()

    @contextmanager
    def _reading(self) -> Iterator[h5py.File]:
        with self._h5("r") as f:
            self._check_same_file()
            yield f


def _embedding_chunk_rows(dim: int) -> int:
    return int(np.clip(_EMBEDDING_CHUNK_BYTES // (4 * dim), 16, 65536))


def _append_bytes(n: int, batch: RowBatch) -> int:
    """Bytes appending `batch` after row n can allocate: the new chunks of each column and
    the path strings' heap."""
    def new_chunks(chunk_rows: int) -> int:
        k = len(batch)
        return -(-(n + k) // chunk_rows) - (-(-n // chunk_rows))

    total = 0
    for name, dtype in _COLUMNS.items():
        item = 16 if name == "paths" else np.dtype(dtype).itemsize  # vlen: a heap reference
        total += new_chunks(_SCALAR_CHUNK_ROWS) * _SCALAR_CHUNK_ROWS * item
    total += new_chunks(_embedding_chunk_rows(batch.dim)) * _EMBEDDING_CHUNK_BYTES
    total += sum(len(p.encode("utf-8", "surrogateescape")) + 16 for p in batch.paths)
    return total


def _hdf5_reason(exc: BaseException) -> str:
    """HDF5's error stack in a few words; a full disk says so."""
    text = one_line(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text \
            or "errno = 28" in text:
        return "no space left on device"
    return text[:200]


def _encoded_paths(paths: list[str]) -> np.ndarray:
    """Relative paths as UTF-8 bytes; a name that is not valid UTF-8 (kept by Python as lone
    surrogates, `os.fsdecode`) is stored as its own bytes, so nothing is lost and it reads
    back identical with ``errors="surrogateescape"``."""
    out = np.empty(len(paths), dtype=object)
    out[:] = [p.encode("utf-8", "surrogateescape") for p in paths]
    return out


SALVAGE_BLOCK = 4096


def salvage(path: str | os.PathLike[str]) -> tuple[int | None, Path]:
    """Replace a damaged index file by what can still be read of it: its attributes and its
    committed rows, block by block up to the first block that does not read back whole and
    sane. The damaged file is kept beside it, renamed ``NAME.damaged-<time>``. Returns (rows
    kept, where the damaged file went); rows None when not even the attributes could be read
    (the index then starts anew)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    rebuilt = path.with_name(path.name + ".salvaged")
    kept: int | None = None
    try:
        with h5py.File(path, "r", locking="best-effort") as src:
            meta = _read_meta(src, path)
            n = _row_count(src)
            with replacing(rebuilt, "index file") as tmp:
                out = IndexStore.create(tmp, meta)
                for start in range(0, n, SALVAGE_BLOCK):
                    try:
                        batch = _read_block(src, start, min(n, start + SALVAGE_BLOCK), meta)
                    except Exception as error:  # noqa: BLE001 - any damage ends the salvage
                        log.warning("index rows from %d on cannot be read (%s): dropped",
                                    start, one_line(error))
                        break
                    out.append(batch)
                kept = len(out)
                out.close()
    except Exception as error:  # noqa: BLE001 - nothing readable: start anew
        log.warning("index %s cannot be read at all (%s)", path, one_line(error))
        kept = None
        rebuilt.unlink(missing_ok=True)
    os.replace(path, aside)
    if kept is not None:
        os.replace(rebuilt, path)
    log.warning("damaged index %s: %s; the damaged file is kept as %s", path,
                f"{kept} rows salvaged" if kept is not None else "nothing could be salvaged",
                aside)
    return kept, aside


def _read_block(f: h5py.File, start: int, stop: int, meta: IndexMeta) -> RowBatch:
    """Rows [start, stop) of an open file, checked as an append would check them."""
    cols = {name: f[name][start:stop] for name in _COLUMNS if name != "paths" and name in f}
    cols["paths"] = list(f["paths"].asstr(errors="surrogateescape")[start:stop])
    cols["digest"] = [d.decode("ascii") for d in cols["digest"]]
    cols["embeddings"] = f["embeddings"][start:stop]
    batch = RowBatch(**cols)
    if len(batch) and (batch.root.min() < 0 or batch.root.max() >= len(meta.roots)):
        raise ValueError("a row names a root that does not exist")
    if not np.isfinite(batch.embeddings).all():
        raise ValueError("descriptors that are not finite numbers")
    return batch


def _join(root: str, rel: str) -> str:
    return os.path.join(root, *rel.split("/"))


#: rows read by point selection at once (cheap for a few rows anywhere in the file)
TAKE_POINTS = 1024
#: a span of the file this long is read in one piece when at least 1/TAKE_DENSITY of its rows
#: are wanted: far faster than a large point selection, and never the whole of a 100M-row file
TAKE_SPAN_ROWS = 65536
TAKE_DENSITY = 16


def _take(ds: Any, rows: slice | Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Rows of a 1-D or 2-D dataset limited to the first n (the snapshot)."""
    if rows is None:
        return np.asarray(ds[:n])
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        if step == 1:
            return np.asarray(ds[start:max(start, stop)])
        return np.asarray(ds[:n])[rows]
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return np.asarray(ds[0:0])
    idx = np.where(idx < 0, idx + n, idx)
    if idx.min() < 0 or idx.max() >= n:
        raise IndexError(f"row index out of range for {n} rows")
    uniq, inverse = np.unique(idx, return_inverse=True)
    if uniq.size <= TAKE_POINTS:  # point selection: cheap for a few rows anywhere in the file
        return np.asarray(ds[uniq])[inverse]
    parts = []
    start = 0
    while start < uniq.size:  # spans of the file: dense ones read whole, sparse ones by point
        stop = int(np.searchsorted(uniq, uniq[start] + TAKE_SPAN_ROWS))
        chunk = uniq[start:stop]
        span = int(chunk[-1] - chunk[0]) + 1
        if chunk.size * TAKE_DENSITY >= span:  # reads at most TAKE_DENSITY x the rows wanted
            parts.append(np.asarray(ds[int(chunk[0]):int(chunk[-1]) + 1])[chunk - chunk[0]])
        else:
            parts.extend(np.asarray(ds[chunk[k:k + TAKE_POINTS]])
                         for k in range(0, chunk.size, TAKE_POINTS))
        start = stop
    return np.concatenate(parts)[inverse]

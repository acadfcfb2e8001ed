"""FAISS search over the stored descriptors (inner product = cosine, they are L2-normalised).

``IDX/faiss.index`` is a cache: it is rebuilt from ``embeddings.h5`` (the source of truth)
whenever it is missing, older than the rows, or holds a different number of them. FAISS ids
are row numbers of the HDF5 file.

Memory: every function here is O(N d + results). :func:`range_pairs` searches one block of
queries at a time; with the exact (``Flat``) index it compares each block only with the rows at
or after it, so the all-pairs search does half the work of a plain self-join.

Scores are float32 and thresholds are compared in float32 (``score >= float32(threshold)``),
the same semantics as ``S >= t`` on a NumPy float32 similarity matrix.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.factory_tools import reverse_index_factory

from mgdedup.cpus import available_cpus
from mgdedup.errors import MgdedupError
from mgdedup.store import IndexStore

log = logging.getLogger(__name__)

INDEX_NAME = "faiss.index"
#: inverted lists visited per query by IVF indexes (saved with the index)
DEFAULT_NPROBE = 16
#: candidate list size of HNSW searches (saved with the index)
DEFAULT_EF_SEARCH = 64
TRAIN_ROWS = 100_000
#: queries per FAISS range search: its exact search holds ~4 KiB of scores per query row
QUERY_ROWS = 8192

Blocks = Iterable[tuple[int, np.ndarray]]
Source = IndexStore | np.ndarray | Blocks
Progress = Callable[[int], None]

_threads_configured = False


# --- threads ---------------------------------------------------------------------------------


def set_threads(n: int | None = None) -> int:
    """Set FAISS's OpenMP thread count (default: :func:`available_cpus`); returns it.

    OpenMP's own default counts the host's cores, which oversubscribes a CPU-limited
    container and makes BLAS-heavy searches several times slower.
    """
    global _threads_configured
    n = n or available_cpus()
    faiss.omp_set_num_threads(n)
    _threads_configured = True
    return n


def _auto_threads() -> None:
    if not _threads_configured and "OMP_NUM_THREADS" not in os.environ:
        set_threads()


# --- building, saving, loading ---------------------------------------------------------------
def build_index(source: Source, dim: int, factory: str = "Flat", *,
                train_rows: int = TRAIN_ROWS, seed: int = 0,
                progress: Progress | None = None) -> faiss.Index:
    """An inner-product FAISS index holding `source`'s rows, ids = row numbers.

    `source` is an IndexStore, an (N, dim) array, or (start, block) pairs in row order.
    "Flat" is exact. Other factory strings ("IVF1024,Flat", "HNSW32", "IVF4096,PQ32") are
    trained on at most `train_rows` rows: a uniform sample of a store or array, the first rows
    of a block stream (which cannot be read twice). `progress(rows_added)` after each block.
    """
    _auto_threads()
    index = _new_index(dim, factory)
    blocks: Iterator[tuple[int, np.ndarray]] = iter(_blocks(source))
    if not index.is_trained:
        if isinstance(source, IndexStore):
            sample = _store_sample(source, train_rows, seed)
        elif isinstance(source, np.ndarray):
            sample = _array_sample(_as_matrix(source, dim), train_rows, seed)
        else:
            buffered, rows = [], 0
            for start, block in blocks:
                buffered.append((start, block))
                rows += len(block)
                if rows >= train_rows:
                    break
            blocks = chain(buffered, blocks)
            parts = [_as_matrix(b, dim) for _, b in buffered]
            sample = np.concatenate(parts)[:train_rows] if parts else np.zeros((0, dim), "f4")
        _train(index, sample, factory)
    for start, block in blocks:
        if start != index.ntotal:
            raise ValueError(f"blocks must be contiguous from row 0: got start {start}, "
                             f"expected {index.ntotal}")
        index.add(_as_matrix(block, dim))
        if progress:
            progress(int(index.ntotal))
    log.info("built FAISS index %r: %d rows, dim %d", factory, index.ntotal, dim)
    return index


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Write atomically: a reader never sees a half-written index, even with concurrent
    writers (each writes its own ``<name>.<random>.tmp`` before ``os.replace``)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:
        raise MgdedupError(f"cannot write FAISS index {path}: {_faiss_msg(exc)}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_index(path: str | os.PathLike[str]) -> faiss.Index:
    """Read an index written by :func:`save_index`; problems are one-line MgdedupErrors."""
    path = Path(path)
    if not path.is_file():
        raise MgdedupError(f"FAISS index not found: {path}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise MgdedupError(f"FAISS index is corrupt: {path} ({_faiss_msg(exc)})") from exc
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise MgdedupError(f"FAISS index {path} does not use inner-product similarity")
    return index


# --- searching -------------------------------------------------------------------------------
def knn(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n, k'), best first; k' = min(k, ntotal).

    Approximate indexes may find fewer than k' neighbours: those slots hold id -1 and score
    -inf (columns that are -1 for every query are dropped), so callers filter ``ids >= 0``.
    """
    _auto_threads()
    q = _as_matrix(queries if np.ndim(queries) == 2 else np.reshape(queries, (1, -1)), index.d)
    k = min(int(k), int(index.ntotal))
    if k <= 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    scores, ids = index.search(q, k)
    found = ids >= 0
    width = int(found.sum(axis=1).max())
    scores, ids = scores[:, :width], ids[:, :width].astype(np.int64)
    scores[~found[:, :width]] = -np.inf
    return scores.astype(np.float32), ids


def range_pairs(index: faiss.Index, blocks: Blocks, threshold: float, *,
                max_pairs: int | None = None,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j, score) of indexed rows with i < j and score >= threshold.

    `blocks` are the indexed rows themselves as (start row, block), e.g.
    ``store.iter_embeddings()``; each block (in pieces of QUERY_ROWS) is one range search, so
    memory is O(N d + pairs).
    Returns int64 i, int64 j, float32 scores, sorted by (i, j). With an approximate index a
    pair is kept if either of its rows finds the other (best score kept). `max_pairs` turns
    a runaway result (threshold far too low) into an MgdedupError instead of exhausting memory.
    `progress(rows_done)` after each block.
    """
    _auto_threads()
    t = np.float32(threshold)
    # FAISS keeps sim > radius; the next float32 below t makes that exactly sim >= t
    radius = float(np.nextafter(t, np.float32(-np.inf)))
    flat = _flat_vectors(index)
    parts_i, parts_j, parts_s = [], [], []
    total, rows_done, t0 = 0, 0, time.perf_counter()
    for start, block in blocks:
        q = _as_matrix(block, index.d)
        for sub in range(0, len(q), QUERY_ROWS):
            i, j, scores = _block_pairs(index, flat, start + sub, q[sub:sub + QUERY_ROWS],
                                        radius, t)
            parts_i.append(i)
            parts_j.append(j)
            parts_s.append(scores)
            total += len(i)
            if max_pairs is not None and total > max_pairs:
                raise MgdedupError(f"more than {max_pairs} pairs score >= {threshold}: the "
                                   f"threshold is too low for this collection")
        rows_done += len(q)
        if progress:
            progress(rows_done)
        log.debug("range search rows %d-%d: %d pairs so far", start, start + len(q), total)
    i, j, s = _sorted_unique_pairs(parts_i, parts_j, parts_s)
    log.info("range search over %d rows at >= %s: %d pairs in %.1f s", rows_done, threshold,
             len(i), time.perf_counter() - t0)
    return i, j, s


def _block_pairs(index: faiss.Index, flat: np.ndarray | None, start: int, q: np.ndarray,
                 radius: float, t: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of query rows start.. with score >= t, as (min row, max row, score)."""
    if flat is not None:  # exact: only rows >= start can be a j > i
        lims, scores, j = _range_flat(q, flat[start:], radius)
        j += start
    else:
        lims, scores, j = index.range_search(q, radius)
        lims = lims.astype(np.int64)
    i = start + np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims))
    keep = (scores >= t) & (j >= 0) & (j != i)
    if flat is not None:
        keep &= j > i
    i, j, scores = i[keep], j[keep].astype(np.int64), scores[keep].astype(np.float32)
    return np.minimum(i, j), np.maximum(i, j), scores


# --- keeping faiss.index in step with embeddings.h5 ------------------------------------------
def is_stale(index_path: str | os.PathLike[str], h5_path: str | os.PathLike[str]) -> bool:
    """True if the index must be rebuilt: missing, unreadable, older than the HDF5 rows, or
    holding a different number of rows or dimension."""
    index_path, h5_path = Path(index_path), Path(h5_path)
    if _older_than(index_path, h5_path):
        return True
    try:
        index = load_index(index_path)
    except MgdedupError:
        return True
    with IndexStore.open(h5_path) as store:
        return index.ntotal != len(store) or index.d != store.meta.dim


def ensure_index(idx_dir: str | os.PathLike[str], store: IndexStore,
                 factory: str | None = None, *,
                 progress: Progress | None = None) -> faiss.Index:
    """The up-to-date search index of `store`, rebuilt and saved as ``idx_dir/faiss.index``
    when stale. `factory` None keeps the kind of the existing index ("Flat" if none);
    a different `factory` than the saved one also triggers a rebuild."""
    path = Path(idx_dir) / INDEX_NAME
    old: faiss.Index | None = None
    reason = "missing" if not path.is_file() else None
    if reason is None:
        try:
            old = load_index(path)
        except MgdedupError as exc:
            reason = str(exc)
    if old is not None:
        if _older_than(path, store.path):
            reason = "older than the index rows"
        elif old.ntotal != len(store) or old.d != store.meta.dim:
            reason = f"holds {old.ntotal} rows of dim {old.d}, the index has {len(store)} " \
                     f"of dim {store.meta.dim}"
        elif factory is not None and _factory_of(old) != _factory_of(
                _new_index(store.meta.dim, factory)):
            reason = f"built as {_factory_of(old)!r}, {factory!r} requested"
        else:
            return old
    kind = factory or (_factory_of(old) if old is not None else None) or "Flat"
    log.info("rebuilding %s (%s) as %r from %d rows", path, reason, kind, len(store))
    del old
    index = build_index(store, store.meta.dim, kind, progress=progress)
    try:
        save_index(index, path)
    except MgdedupError as exc:  # e.g. a read-only index directory: search anyway
        log.warning("%s; the index will be rebuilt next time", exc)
    return index


# --- helpers ---------------------------------------------------------------------------------
def _new_index(dim: int, factory: str) -> faiss.Index:
    if factory.strip() == "Flat":
        return faiss.IndexFlatIP(dim)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise MgdedupError(f"invalid FAISS factory string {factory!r}: "
                           f"{_faiss_msg(exc)}") from exc
    _set_search_defaults(index)
    return index


def _set_search_defaults(index: faiss.Index) -> None:
    """FAISS defaults (nprobe 1, efSearch 16) miss many near-duplicates; these are saved with
    the index, so set them once here."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) \
        else index
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = max(inner.hnsw.efSearch, DEFAULT_EF_SEARCH)


def _train(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    if len(sample) == 0:
        raise MgdedupError(f"cannot train FAISS index {factory!r} on an empty index; use 'Flat'")
    log.info("training FAISS index %r on %d rows", factory, len(sample))
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise MgdedupError(f"cannot build FAISS index {factory!r} from {len(sample)} rows: "
                           f"{_faiss_msg(exc)}; use a smaller factory or 'Flat'") from exc


def _blocks(source: Source) -> Iterable[tuple[int, np.ndarray]]:
    if isinstance(source, IndexStore):
        return source.iter_embeddings()
    if isinstance(source, np.ndarray):
        return [(0, source)]
    return source


def _store_sample(store: IndexStore, rows: int, seed: int) -> np.ndarray:
    """A uniform sample read in one pass, so memory stays O(sample + block)."""
    n = len(store)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    parts = []
    for start, block in store.iter_embeddings():
        lo, hi = np.searchsorted(pick, [start, start + len(block)])
        parts.append(block[pick[lo:hi] - start])
    return np.ascontiguousarray(np.concatenate(parts) if parts else
                                np.zeros((0, store.meta.dim), np.float32))


def _array_sample(x: np.ndarray, rows: int, seed: int) -> np.ndarray:
    if len(x) <= rows:
        return x
    pick = np.sort(np.random.default_rng(seed).choice(len(x), size=rows, replace=False))
    return np.ascontiguousarray(x[pick])


def _as_matrix(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected an (n, {dim}) array, got shape {x.shape}")
    return x


def _flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The stored vectors of an exact inner-product index, as a zero-copy view."""
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(-1, index.d)


def _range_flat(q: np.ndarray, xb: np.ndarray, radius: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAISS's exhaustive (BLAS) range search of q against xb, as (lims, scores, ids)."""
    nq, d = q.shape
    if nq == 0 or len(xb) == 0:
        return np.zeros(nq + 1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    res = faiss.RangeSearchResult(nq)
    faiss.range_search_inner_product(faiss.swig_ptr(q), faiss.swig_ptr(xb), d, nq, len(xb),
                                     radius, res, None)
    lims = faiss.rev_swig_ptr(res.lims, nq + 1).astype(np.int64)
    n = int(lims[-1])
    if n == 0:
        return lims, np.zeros(0, np.float32), np.zeros(0, np.int64)
    scores = faiss.rev_swig_ptr(res.distances, n).copy()
    ids = faiss.rev_swig_ptr(res.labels, n).astype(np.int64)
    return lims, scores, ids


def _sorted_unique_pairs(parts_i: list[np.ndarray], parts_j: list[np.ndarray],
                         parts_s: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate, sort by (i, j) and keep the best score of a pair found twice."""
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    if not first.all():
        i, j, s = i[first], j[first], s[first]
    return i, j, s


def _factory_of(index: faiss.Index) -> str:
    try:
        return reverse_index_factory(index)
    except (NotImplementedError, RuntimeError, AssertionError):
        return type(index).__name__


def _older_than(path: Path, reference: Path) -> bool:
    try:
        return path.stat().st_mtime_ns < reference.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _faiss_msg(exc: BaseException) -> str:
    """FAISS errors carry a C++ prefix ("Error in ... at file.cpp:66: Error: 'x' failed: ");
    keep the human part."""
    msg = " ".join(str(exc).split())
    msg = re.sub(r"^.*?\.(?:cpp|h):\d+: ", "", msg)
    return re.sub(r"^Error: '.*?' failed: ", "", msg)

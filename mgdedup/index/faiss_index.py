"""FAISS search over the stored descriptors (inner product = cosine, they are L2-normalised).

``IDX/faiss.index`` is a cache: it is rebuilt from ``embeddings.h5`` (the source of truth)
whenever it is missing, older than the rows, or holds a different number of them. FAISS ids
are row numbers of the HDF5 file.

Memory: every function here is O(N d + results). :func:`range_pairs` searches one block of
queries at a time; with the exact (``Flat``) index it compares each block only with the rows at
or after it, so the all-pairs search does half the work of a plain self-join.

Scores are float32 and thresholds are compared in float32 (``score >= float32(threshold)``),
the same semantics as ``S >= t`` on a NumPy float32 similarity matrix.

Which index: exact ``Flat`` up to :data:`AUTO_IVF_ROWS` rows, an inverted file of the
vectors above, an inverted file of 8-bit codes (SQ8, a quarter of the memory) above
:data:`AUTO_SQ_ROWS` (see :func:`auto_factory`; BENCHMARKS.md "Large collections" and "Search
at 10M-100M rows" have the measurements behind the cut-overs). A factory chosen with
``index --factory`` is stored in the HDF5 attributes and always wins. Inverted lists that
would take more than :data:`LIST_RAM_FRACTION` of the machine's memory are written to a file
beside ``faiss.index`` and memory-mapped (:func:`build_and_save`).

Lossy indexes (SQ, PQ) give approximate scores: :func:`range_pairs` then searches
:data:`LOSSY_MARGIN` below the threshold, and callers re-score every pair from the rows.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.factory_tools import reverse_index_factory

from mgdedup.cpus import available_cpus
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import replacing
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexStore

log = logging.getLogger(__name__)

#: inverted lists visited per query by IVF indexes (saved with the index)
DEFAULT_NPROBE = 16
#: candidate list size of HNSW searches (saved with the index)
DEFAULT_EF_SEARCH = 64
TRAIN_ROWS = 100_000
#: row count above which the automatic choice leaves exact search for IVF (see auto_factory)
AUTO_IVF_ROWS = 250_000
#: size of the float vectors above which the automatic choice stores 8-bit scalar codes
#: (IVF..,SQ8), a quarter of it: 4 GiB is 4.2M rows of 256-d, 840k rows of 1280-d
AUTO_SQ_BYTES = 4 << 30
#: the share of this machine's memory that inverted lists may take in RAM; above it they are
#: written to a file beside faiss.index and memory-mapped
LIST_RAM_FRACTION = 0.4
#: how far below the threshold a lossy index is searched: SQ8 moves a cosine by at most a
#: few thousandths (measured, BENCHMARKS.md), and every pair is re-scored from the rows
LOSSY_MARGIN = 0.02
#: rows per part index when inverted lists are built on disk (one part is in RAM at a time)
DISK_PART_ROWS = 1_000_000
#: training vectors per IVF list (FAISS warns below 39)
TRAIN_ROWS_PER_LIST = 40
#: queries per FAISS range search: its exact search holds ~4 KiB of scores per query row
QUERY_ROWS = 1024
#: queries per IVF self-join step: more queries per list make larger, faster matrix products
IVF_QUERY_ROWS = 32768

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
def auto_factory(rows: int, dim: int = 256) -> str:
    """The factory chosen when the user chose none: exact ``Flat`` while the all-pairs search
    is affordable, ``IVF<nlist>,Flat`` above :data:`AUTO_IVF_ROWS` rows.

    Exact all-pairs search costs O(N^2 d): 87 s at 200k x 256 on 2 cores, ~36 min at 1M.
    IVF with nlist lists and :data:`DEFAULT_NPROBE` probes costs O(N (nlist + N nprobe /
    nlist) d) and keeps ``Flat`` vectors, so scores are exact and only recall is traded.
    Recall of a near-duplicate pair depends mostly on the probed fraction nprobe / nlist, so
    nlist ~ sqrt(N) (a power of two; 1024 at 1M) probes 1/64 of the rows at 1M: the measured
    balance of time and recall (BENCHMARKS.md "Large collections"); FAISS's usual 4 sqrt(N)
    probes 1/256 and missed over half of the pairs near cosine 0.5 on random data.

    When the float vectors (rows x `dim` x 4 bytes) exceed :data:`AUTO_SQ_BYTES` the lists
    hold 8-bit codes (``IVF<nlist>,SQ8``): at 10M-100M rows the vectors no longer fit in RAM,
    the codes move a cosine by a few thousandths, and the pairs found are re-scored from the
    rows (:data:`LOSSY_MARGIN`).
    """
    if rows <= AUTO_IVF_ROWS:
        return "Flat"
    nlist = min(1 << round(math.log2(math.sqrt(rows))), 65536)
    return f"IVF{nlist},Flat" if rows * dim * 4 <= AUTO_SQ_BYTES else f"IVF{nlist},SQ8"


def is_lossy(index: faiss.Index) -> bool:
    """True if `index` holds codes smaller than the float vectors (SQ, PQ): its scores are
    approximate."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.code_size < 4 * index.d
    try:
        return index.sa_code_size() < 4 * index.d
    except RuntimeError:  # kinds without standalone codes (HNSW,Flat): exact vectors
        return False


def _product_quantized(index: faiss.Index) -> bool:
    """PQ codes: a cosine can move by 0.5 (BENCHMARKS.md), fine for ranking neighbours that
    are then re-scored, useless for a threshold."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    return isinstance(inner, faiss.IndexIVFPQ | faiss.IndexPQ)


def resolve_factory(chosen: str | None, rows: int, dim: int = 256) -> str:
    """The user's factory if any (``"auto"`` or None: automatic by row count and size)."""
    if chosen is None or chosen.strip().lower() in ("", "auto"):
        return auto_factory(rows, dim)
    return chosen.strip()


def check_factory(factory: str, dim: int) -> str:
    """`factory` if FAISS can make an inner-product index of it, else an MgdedupError;
    ``"auto"`` passes. Checked before any work, so a typo fails fast."""
    factory = factory.strip()
    if factory.lower() != "auto":
        _new_index(dim, factory)
    return factory


def build_index(source: Source, dim: int, factory: str = "Flat", *,
                train_rows: int | None = None, seed: int = 0,
                progress: Progress | None = None,
                list_file: Path | None = None) -> faiss.Index:
    """An inner-product FAISS index holding `source`'s rows, ids = row numbers.

    `source` is an IndexStore, an (N, dim) array, or (start, block) pairs in row order.
    "Flat" is exact. Other factory strings ("IVF1024,Flat", "HNSW32", "IVF4096,PQ32") are
    trained on at most `train_rows` rows: a uniform sample of a store or array, the first rows
    of a block stream (which cannot be read twice); default the larger of TRAIN_ROWS and
    TRAIN_ROWS_PER_LIST per IVF list. `progress(rows_added)` after each block.
    `list_file`: write an IVF index's inverted lists to this file and memory-map them (for
    lists larger than RAM; see :func:`build_and_save`).
    """
    _auto_threads()
    index = _new_index(dim, factory)
    if train_rows is None:
        ivf = faiss.try_extract_index_ivf(index)
        train_rows = max(TRAIN_ROWS, TRAIN_ROWS_PER_LIST * ivf.nlist if ivf is not None else 0)
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
    if list_file is not None and faiss.try_extract_index_ivf(index) is not None:
        _fill_on_disk(index, blocks, dim, Path(list_file), progress)
        log.info("built FAISS index %r: %d rows, dim %d, lists in %s", factory, index.ntotal,
                 dim, list_file)
        return index
    if isinstance(source, IndexStore | np.ndarray) and _fill_ivf_exactly(index, source, dim,
                                                                         progress):
        log.info("built FAISS index %r: %d rows, dim %d", factory, index.ntotal, dim)
        return index
    for start, block in blocks:
        if start != index.ntotal:
            raise ValueError(f"blocks must be contiguous from row 0: got start {start}, "
                             f"expected {index.ntotal}")
        index.add(_as_matrix(block, dim))
        if progress:
            progress(int(index.ntotal))
    log.info("built FAISS index %r: %d rows, dim %d", factory, index.ntotal, dim)
    return index


def _fill_ivf_exactly(index: faiss.Index, source: IndexStore | np.ndarray, dim: int,
                      progress: Progress | None) -> bool:
    """Fill an empty IVF-Flat index in two passes over a re-readable source: assign every
    row, size each inverted list exactly, then copy the rows in. ``index.add`` grows the
    lists by doubling, which at 1M x 256 peaks near 2 GB for 1 GB of vectors. The result
    is the same index (same lists, same order). False (nothing done) for other indexes."""
    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVFFlat) or ivf.ntotal:
        return False
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(invlists, faiss.ArrayInvertedLists):
        return False
    n = len(source)
    assign = np.empty(n, np.int64)
    for start, block in _blocks(source):
        _, a = ivf.quantizer.search(_as_matrix(block, dim), 1)
        assign[start:start + len(block)] = a[:, 0]
    for c, count in enumerate(np.bincount(assign, minlength=ivf.nlist).tolist()):
        invlists.resize(c, count)
    filled = np.zeros(ivf.nlist, np.int64)
    for start, block in _blocks(source):
        block = _as_matrix(block, dim)
        cells = assign[start:start + len(block)]
        order = np.argsort(cells, kind="stable")
        sorted_cells = cells[order]
        cuts = np.flatnonzero(np.diff(sorted_cells)) + 1
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(order)].tolist()):
            if lo == hi:
                continue
            c = int(sorted_cells[lo])
            rows = order[lo:hi]
            ids = np.ascontiguousarray(rows + start, dtype=np.int64)
            codes = np.ascontiguousarray(block[rows]).view(np.uint8)
            invlists.update_entries(c, int(filled[c]), hi - lo, faiss.swig_ptr(ids),
                                    faiss.swig_ptr(codes))
            filled[c] += hi - lo
        if progress:
            progress(start + len(block))
    ivf.ntotal = n
    return True


def _fill_on_disk(index: faiss.Index, blocks: Iterable[tuple[int, np.ndarray]], dim: int,
                  list_file: Path, progress: Progress | None) -> None:
    """Fill a trained, empty IVF index whose lists may not fit in RAM: the rows go, one
    block of DISK_PART_ROWS at a time, into copies of the empty index written aside, which
    FAISS then merges into one memory-mapped list file (its documented on-disk recipe,
    `faiss.contrib.ondisk`). Ids are row numbers, as for every other index."""
    from faiss.contrib.ondisk import merge_ondisk

    parts_dir = list_file.with_name(list_file.name + ".parts")
    shutil.rmtree(parts_dir, ignore_errors=True)
    try:
        parts_dir.mkdir(parents=True)
        parts: list[str] = []
        part, added = faiss.clone_index(index), 0

        def write_part(filled: faiss.Index) -> None:
            name = str(parts_dir / f"part-{len(parts):05d}.index")
            faiss.write_index(filled, name)
            parts.append(name)

        for start, block in blocks:
            if start != added:
                raise ValueError(f"blocks must be contiguous from row 0: got start {start}, "
                                 f"expected {added}")
            block = _as_matrix(block, dim)
            part.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
            added += len(block)
            if part.ntotal >= DISK_PART_ROWS:
                write_part(part)
                part = faiss.clone_index(index)
            if progress:
                progress(added)
        if part.ntotal or not parts:
            write_part(part)
        del part
        list_file.unlink(missing_ok=True)
        with _stdout_to_stderr():  # FAISS prints "resizing ..." there; stdout is data
            merge_ondisk(index, parts, str(list_file))
    except (RuntimeError, OSError) as exc:  # FAISS I/O: no space, no permission
        raise MgdedupError(f"cannot write the search lists to {list_file}: "
                           f"{_faiss_msg(exc)}") from exc
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what C++ code prints to file descriptor 1 to 2 instead, for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def list_file_for(path: Path, dim: int, factory: str, rows: int) -> Path | None:
    """Where :func:`build_and_save` puts the inverted lists of `factory` over `rows` rows:
    None (in RAM, inside faiss.index) unless they would take more than LIST_RAM_FRACTION of
    this machine's memory. A new name each build, so a reader that mapped the previous file
    keeps reading it."""
    ivf = faiss.try_extract_index_ivf(_new_index(dim, factory))
    if ivf is None:
        return None
    if rows * (ivf.code_size + 8) <= LIST_RAM_FRACTION * memory_bytes():
        return None
    return path.with_name(f"{path.stem}-{os.urandom(4).hex()}.ivfdata")


def memory_bytes() -> int:
    """This machine's memory, capped by a cgroup v2 memory limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def build_and_save(source: IndexStore, factory: str, path: Path, *,
                   progress: Progress | None = None,
                   keep_unsaved: bool = False) -> faiss.Index:
    """Build the search index of `source` as `factory` and save it at `path`; its lists go to
    a memory-mapped file beside it when they would not fit in RAM (:func:`list_file_for`).
    List files of earlier builds are removed once the new index is in place. `keep_unsaved`:
    a failed save (a read-only index folder) is a warning and the built index is returned,
    for a reader that only needs to search now."""
    path = Path(path)
    lists = list_file_for(path, source.meta.dim, factory, len(source))
    try:
        index = build_index(source, source.meta.dim, factory, progress=progress,
                            list_file=lists)
    except BaseException:
        if lists is not None:
            lists.unlink(missing_ok=True)
        raise
    try:
        save_index(index, path)
    except MgdedupError as exc:
        if not keep_unsaved:
            if lists is not None:
                lists.unlink(missing_ok=True)
            raise
        log.warning("%s; the index will be rebuilt next time", exc)
        return index
    for old in path.parent.glob(f"{path.stem}-*.ivfdata"):
        if old != lists:
            old.unlink(missing_ok=True)
    return index


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Write atomically: a reader never sees a half-written index, even with concurrent
    writers (`mgdedup.files.atomic.replacing`)."""
    try:
        with replacing(path, "FAISS index") as tmp:
            faiss.write_index(index, str(tmp))
    except RuntimeError as exc:
        raise MgdedupError(f"cannot write FAISS index {path}: {_faiss_msg(exc)}") from exc


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


def rescored_neighbours(queries: np.ndarray, ids: np.ndarray,
                        rows_of: Callable[[np.ndarray], np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of :func:`knn` neighbours with each score recomputed from the rows
    (`rows_of(sorted unique ids)` gives their vectors) and put back in order, best first; -1
    ids stay last at -inf. For lossy indexes, whose own scores are approximate."""
    scores = np.full(ids.shape, -np.inf, np.float32)
    found = np.unique(ids[ids >= 0])
    if len(found):
        vectors = np.asarray(rows_of(found), np.float32)
        at = np.searchsorted(found, np.where(ids >= 0, ids, found[0]))
        exact = np.einsum("qd,qkd->qk", np.asarray(queries, np.float32), vectors[at])
        scores = np.where(ids >= 0, exact, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def range_pairs(index: faiss.Index, blocks: Blocks, threshold: float, *,
                max_pairs: int | None = None,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j, score) of indexed rows with i < j and score >= threshold.

    `blocks` are the indexed rows themselves as (start row, block), e.g.
    ``store.iter_embeddings()``; each block (in pieces of QUERY_ROWS) is one range search, so
    memory is O(N d + pairs).
    Returns int64 i, int64 j, float32 scores, sorted by (i, j). With an approximate index a
    pair is kept if either of its rows finds the other (best score kept). With a lossy one
    (:func:`is_lossy`) the pairs down to threshold - LOSSY_MARGIN come back with approximate
    scores: re-score them from the rows. `max_pairs` turns
    a runaway result (threshold far too low) into an MgdedupError instead of exhausting memory.
    `progress(rows_done)` after each block.
    """
    _auto_threads()
    t = np.float32(threshold)
    if _product_quantized(index):
        raise MgdedupError(
            f"this index's search structure ({_factory_of(index)}) stores product-quantized "
            "codes, whose scores are too rough for a cosine threshold: use the copy score, "
            "or rebuild with `index --factory auto` (8-bit codes)")
    if is_lossy(index):  # approximate scores: search below t, the caller re-scores
        t = np.float32(threshold - LOSSY_MARGIN)
    # FAISS keeps sim > radius; the next float32 below t makes that exactly sim >= t
    radius = float(np.nextafter(t, np.float32(-np.inf)))
    flat = _flat_vectors(index)
    lists = _IvfLists.of(index) if flat is None else None
    step = QUERY_ROWS if lists is None else IVF_QUERY_ROWS
    parts_i, parts_j, parts_s = [], [], []
    total, rows_done, t0 = 0, 0, time.perf_counter()
    for start, block in blocks:
        q = _as_matrix(block, index.d)
        for sub in range(0, len(q), step):
            if lists is not None:
                i, j, scores = lists.block_pairs(start + sub, q[sub:sub + step], t, radius)
            else:
                i, j, scores = _block_pairs(index, flat, start + sub, q[sub:sub + step],
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


class _IvfLists:
    """The self-join of an ``IVF..,Flat`` inner-product index as matrix products.

    FAISS's IVF range search scans each query's `nprobe` lists one query at a time: memory
    bound (every scanned vector is read once per query). Here the queries of a block are
    grouped by the list they probe, and each list is compared with all of its queries in one
    BLAS product, reading the list once per block. The pairs are those FAISS would return
    (j in a list probed by i, score >= t), several times faster.
    """

    def __init__(self, ivf: faiss.IndexIVF, invlists: faiss.ArrayInvertedLists) -> None:
        self.quantizer = ivf.quantizer
        self.nprobe = int(min(ivf.nprobe, ivf.nlist))
        self.dim = ivf.d
        self.vectors: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        for c in range(ivf.nlist):  # zero-copy views of the stored vectors
            n = invlists.list_size(c)
            if n == 0:
                self.vectors.append(np.zeros((0, ivf.d), np.float32))
                self.ids.append(np.zeros(0, np.int64))
                continue
            codes = faiss.rev_swig_ptr(invlists.get_codes(c), n * ivf.code_size)
            self.vectors.append(codes.view(np.float32).reshape(n, ivf.d))
            self.ids.append(faiss.rev_swig_ptr(invlists.get_ids(c), n))

    @classmethod
    def of(cls, index: faiss.Index) -> _IvfLists | None:
        """Lists of a plain IVF-Flat IP index held in memory, else None (FAISS searches)."""
        index = faiss.downcast_index(index)
        if not isinstance(index, faiss.IndexIVFFlat) or \
                index.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        invlists = faiss.downcast_InvertedLists(index.invlists)
        if not isinstance(invlists, faiss.ArrayInvertedLists):
            return None
        return cls(index, invlists)

    def block_pairs(self, start: int, q: np.ndarray, t: np.float32, radius: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs of query rows start.. with a row of a probed list, as (min, max, score)."""
        empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(q) == 0:
            return empty
        _, probes = self.quantizer.search(q, self.nprobe)
        cells = probes.ravel()
        rows = np.repeat(np.arange(len(q), dtype=np.int64), probes.shape[1])
        valid = cells >= 0
        cells, rows = cells[valid], rows[valid]
        order = np.argsort(cells, kind="stable")
        cells, rows = cells[order], rows[order]
        cuts = np.flatnonzero(np.diff(cells)) + 1
        segments = list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(cells)].tolist()))

        def join(part: list[tuple[int, int]]) -> list[tuple[np.ndarray, ...]]:
            found = []
            for lo, hi in part:
                c = int(cells[lo])
                if len(self.ids[c]) == 0:
                    continue
                qi = rows[lo:hi]
                lims, scores, col = _range_flat(np.ascontiguousarray(q[qi]), self.vectors[c],
                                                radius)
                if len(col):
                    found.append((qi[np.repeat(np.arange(len(qi)), np.diff(lims))] + start,
                                  self.ids[c][col], scores))
            return found

        # one product per list is small: single-threaded products on all cores beat
        # multi-threaded BLAS (whose thread start-up dominates such sizes on a busy machine)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:  # FAISS releases the GIL
                results = list(pool.map(join, [segments[k::threads] for k in range(threads)]))
        finally:
            faiss.omp_set_num_threads(threads)
        found = [item for part in results for item in part]
        if not found:
            return empty
        i = np.concatenate([f[0] for f in found])
        j = np.concatenate([f[1] for f in found]).astype(np.int64)
        s = np.concatenate([f[2] for f in found]).astype(np.float32)
        keep = (s >= t) & (j >= 0) & (j != i)
        i, j, s = i[keep], j[keep], s[keep]
        return np.minimum(i, j), np.maximum(i, j), s


# --- keeping faiss.index in step with embeddings.h5 ------------------------------------------
def is_stale(index_path: str | os.PathLike[str], h5_path: str | os.PathLike[str]) -> bool:
    """True if the index must be rebuilt: missing, unreadable, older than the HDF5 rows, or
    holding a different number of rows or dimension."""
    index_path, h5_path = Path(index_path), Path(h5_path)
    if _older_than(index_path, h5_path):
        return True
    shape = _peek_shape(index_path)  # the header only: loading 1M rows takes seconds
    if shape is None:
        try:
            index = load_index(index_path)
        except MgdedupError:
            return True
        shape = index.d, index.ntotal
    with IndexStore.open(h5_path) as store:
        return shape != (store.meta.dim, len(store))


def ensure_index(idx_dir: str | os.PathLike[str], store: IndexStore,
                 factory: str | None = None, *,
                 progress: Progress | None = None) -> faiss.Index:
    """The up-to-date search index of `store`, rebuilt and saved as ``idx_dir/faiss.index``
    when stale. `factory` None: the factory stored in the index (``index --factory``), else
    the kind of the existing index, else :func:`auto_factory`; a different `factory` than the
    saved one also triggers a rebuild."""
    if factory is None and store.meta.factory is not None:
        factory = store.meta.factory
    path = IndexDir(idx_dir).faiss
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
            reason = _disagreement(old, store)
            if reason is None:
                return old
            log.warning("%s %s; rebuilding it from the index rows", path, reason)
    kind = factory or (_factory_of(old) if old is not None else None) or \
        auto_factory(len(store), store.meta.dim)
    log.info("rebuilding %s (%s) as %r from %d rows", path, reason, kind, len(store))
    del old
    # a read-only index directory: search anyway
    return build_and_save(store, kind, path, progress=progress, keep_unsaved=True)


#: stored vectors compared with the HDF5 rows each time a saved search index is loaded
VERIFY_ROWS = 512


def _stored_vectors(index: faiss.Index, rows: np.ndarray) -> np.ndarray | None:
    """The vectors `index` holds for ids `rows`, for the exact kinds (Flat, IVF-Flat); None
    for lossy or opaque kinds (PQ, HNSW), which cannot be checked this way."""
    flat = _flat_vectors(index)
    if flat is not None:
        return flat[rows]
    lists = _IvfLists.of(index)
    if lists is None:
        return None
    out = np.full((len(rows), index.d), np.nan, np.float32)  # rows sorted and unique
    for ids, vectors in zip(lists.ids, lists.vectors):
        found = np.isin(ids, rows)
        if found.any():
            out[np.searchsorted(rows, ids[found])] = vectors[found]
    return out


def _disagreement(index: faiss.Index, store: IndexStore) -> str | None:
    """Why a saved search index is not a copy of the rows (None: a sample of them matches).
    The HDF5 rows are the source of truth; faiss.index is only a cache of them."""
    n = len(store)
    if n == 0:
        return None
    rows = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(n).choice(
        n, size=min(VERIFY_ROWS, n), replace=False)])).astype(np.int64)
    held = _stored_vectors(index, rows)
    if held is None:
        return None
    expected = np.asarray(store.read("embeddings", rows), np.float32)
    if not np.array_equal(held, expected):
        return "does not hold the index rows' descriptors (damaged or altered)"
    return None


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


def _peek_shape(path: Path) -> tuple[int, int] | None:
    """(d, ntotal) from a FAISS file's header without reading the vectors. Every FAISS index
    file starts with a 4-byte type tag then d (int32) and ntotal (int64); None if unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if len(head) < 16:
        return None
    d = int(np.frombuffer(head, "<i4", 1, 4)[0])
    ntotal = int(np.frombuffer(head, "<i8", 1, 8)[0])
    return (d, ntotal) if d > 0 and ntotal >= 0 else None


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

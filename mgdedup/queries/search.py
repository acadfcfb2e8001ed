"""Nearest indexed images for query images, embedded exactly as the index was.

Results are ranked and scored as `dedup` scores pairs: by the copy score (P(copy), after
verifying each candidate against the query) where the index's model has one, else by
cosine; the raw cosine is kept beside the copy score. A query that is itself indexed and
unchanged (same path, size and modification time) reuses its stored row: nothing is embedded
and no model is loaded for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgdedup.errors import MgdedupError
from mgdedup.index.faiss_index import ensure_index, is_lossy, knn, rescored_neighbours
from mgdedup.index.layout import IndexDir

log = logging.getLogger(__name__)


@dataclass
class QueryResult:
    query: str
    results: list[tuple[str, float]]  # (absolute path, score), best first
    error: str | None = None
    cosines: list[float] = field(default_factory=list)  # raw cosine of each result
    score_kind: str = "cosine"  # "copy" (P(copy)) or "cosine"


def search_index(index_dir: Path, queries: Sequence[Path], k: int = 10,
                 model_spec: str | None = None, workers: int = 0,
                 scoring: str | None = None) -> list[QueryResult]:
    """Top-k indexed images for each query image; unreadable queries carry their error.

    `scoring`: "copy" (the default where the index's model has a copy score) or "cosine".
    """
    if k < 1:
        raise MgdedupError("-k must be at least 1")
    with IndexDir(index_dir).open_store() as store:
        meta = store.meta
        scorer = None
        if scoring in (None, "copy"):
            from mgdedup.model.registry import copy_scorer_for

            scorer = copy_scorer_for(meta.model_name, meta.resolution, meta.whitening_id)
            if scoring == "copy" and scorer is None:
                raise MgdedupError("this index's model has no copy score at its resolution; "
                                   "use --score cosine")
        index = ensure_index(Path(index_dir), store)
        paths = [str(p) for p in store.absolute_paths()]
        hashes = store.read("phash") if scorer is not None else None
        results: list[QueryResult] = [QueryResult(str(q), []) for q in queries]

        known = None  # evidence_cache.CachedEvidence of dedup's verified pairs
        digests = None

        def answer(positions: list[int], vectors: np.ndarray, phashes: Sequence[int],
                   query_digests: Sequence[str] | None = None) -> None:
            if scorer is not None:
                for row, position in enumerate(positions):
                    results[position] = _copy_results(
                        store, index, scorer, paths, hashes, Path(queries[position]),
                        vectors[row], int(phashes[row]), k, known,
                        None if query_digests is None else query_digests[row], digests)
                return
            scores, ids = knn(index, vectors, k)
            if is_lossy(index):  # 8-bit codes: scores as the rows say
                scores, ids = rescored_neighbours(
                    vectors, ids, lambda rows: store.read("embeddings", rows))
            for row, position in enumerate(positions):
                found = [(paths[i], float(s)) for s, i in zip(scores[row], ids[row]) if i >= 0]
                results[position].results = found
                results[position].cosines = [s for _, s in found]

        stored = _indexed_rows(store, paths, queries)
        if stored:
            positions = sorted(stored)
            rows = np.array([stored[p] for p in positions], np.int64)
            order = np.argsort(rows)  # rows are read in increasing order
            vectors = np.empty((len(rows), meta.dim), np.float32)
            vectors[order] = np.asarray(store.read("embeddings", rows[order]), np.float32)
            phashes = np.asarray(store.read("phash"))[rows] if scorer is not None else \
                np.zeros(len(rows), np.int64)
            if scorer is not None:  # dedup's verified pairs of these files are reused
                from mgdedup.duplicates import evidence_cache

                known = evidence_cache.load(IndexDir(index_dir).verified)
                digests = np.asarray(store.read("digest"))
            answer(positions, vectors, phashes,
                   None if digests is None else [str(digests[r]) for r in rows])
        todo = [position for position in range(len(queries)) if position not in stored]
        if todo:
            for batch in _embedded_queries(meta, model_spec, [queries[p] for p in todo],
                                           workers):
                for position, reason in batch.errors:
                    results[todo[position]].error = reason
                if batch.positions:
                    answer([todo[p] for p in batch.positions],
                           np.asarray(batch.descriptors.descriptors, np.float32),
                           batch.phashes)
    return results


def _embedded_queries(meta, model_spec: str | None, paths: list[Path], workers: int | None
                      ) -> list:
    """EmbeddedBatches of query files not in the index, as its rows were computed: without
    PyTorch when the index's model is cached for the light path (and is the index's model),
    else with it (which caches it for the next time)."""
    from mgdedup.embedding.light import LightModel, NotCached, remember_arrays
    from mgdedup.model.registry import canonical_spec

    spec = model_spec if model_spec is not None else meta.model_name
    try:
        spec = canonical_spec(spec)
        light = LightModel.load(spec, meta.resolution)
        if light.fingerprint != meta.model_id or light.whitening_id != meta.whitening_id:
            raise NotCached("the cached arrays are of another model than the index's")
        light.p = meta.p  # as the rows were computed, even if the p* table changed since
        return list(light.embed_files(paths, precision=meta.precision))
    except (NotCached, MgdedupError) as why:
        log.debug("embedding the queries with PyTorch: %s", why)
    from mgdedup.embedding.embedder import Embedder
    from mgdedup.index.model_check import model_for_index

    model = model_for_index(meta, model_spec)
    # p as the rows were computed, even if the model's p* table changed since
    embedder = Embedder(model, meta.resolution, workers=workers, p=meta.p,
                        precision=meta.precision)
    batches = list(embedder.embed_files(paths, digest=False))
    remember_arrays(spec, model, meta.resolution)
    return batches


def _indexed_rows(store, paths: list[str], queries: Sequence[Path]) -> dict[int, int]:
    """Query position -> index row, for queries that are indexed files unchanged since
    (same resolved path, size and modification time as their row)."""
    row_of = {os.path.abspath(p): row for row, p in enumerate(paths)}  # no syscall per row
    found = {}
    sizes = mtimes = None
    for position, query in enumerate(queries):
        try:
            given = Path(query).expanduser()
            row = row_of.get(os.path.abspath(given))
            if row is None:
                row = row_of.get(os.path.realpath(given))
            if row is None:
                continue
            st = os.stat(given)
        except OSError:
            continue
        if sizes is None:
            sizes, mtimes = store.read("size"), store.read("mtime_ns")
        if int(sizes[row]) == st.st_size and int(mtimes[row]) == st.st_mtime_ns:
            found[position] = row
    return found


def _copy_results(store, index, scorer, paths: list[str], hashes: np.ndarray, query: Path,
                  vector: np.ndarray, query_hash: int, k: int, known=None,
                  query_digest: str | None = None, digests: np.ndarray | None = None
                  ) -> QueryResult:
    """One query's results by copy score: its candidates verified against it and scored.
    For an indexed query, pairs that `dedup` verified (`known`, by the two files' digests:
    `evidence_cache`) are not verified again."""
    from mgdedup.duplicates.candidates import query_candidates
    from mgdedup.duplicates.copy_score import features
    from mgdedup.duplicates.local_match import verify_pairs

    found = query_candidates(index, vector, query_hash, hashes,
                             lambda rows: np.asarray(store.read("embeddings", rows)))
    evidence: list = [None] * len(found.rows)
    if known and query_digest and digests is not None:
        from mgdedup.duplicates.evidence_cache import pair_keys

        both = np.array([query_digest, *digests[found.rows]], dtype=object)
        keys = pair_keys(both, np.zeros(len(found.rows), np.int64),
                         np.arange(1, len(found.rows) + 1))
        evidence = [known.get(key) for key in keys.tolist()]
    todo = [position for position, e in enumerate(evidence) if e is None]
    if todo:
        # candidate (row 1..) against the query (row 0), as before; every image's features
        # extracted once, on every core (a new query's candidates are ~all of the time)
        checked = verify_pairs([str(query), *(paths[int(found.rows[p])] for p in todo)],
                               np.arange(1, len(todo) + 1), np.zeros(len(todo), np.int64))
        for position, found_evidence in zip(todo, checked, strict=True):
            evidence[position] = found_evidence
    probability = scorer.probability(features(
        found.cosine, found.background_rows, np.full(len(found.rows), found.background_query),
        found.rank, found.hash_distance, evidence)) if len(found.rows) else np.zeros(0)
    if query_digest and digests is not None and len(found.rows):
        # the same bytes are a copy whatever the pixels show, as dedup scores them
        same = np.asarray(digests[found.rows] == query_digest, bool)
        probability = np.where(same, 1.0, probability)
    order = np.lexsort((-found.cosine, -probability))[:k]
    return QueryResult(str(query), [(paths[int(found.rows[o])], float(probability[o]))
                                    for o in order], None,
                       [float(found.cosine[o]) for o in order], "copy")

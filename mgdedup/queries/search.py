"""Nearest indexed images for query images, embedded exactly as the index was."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mgdedup.embedding.embedder import Embedder
from mgdedup.errors import MgdedupError
from mgdedup.index.faiss_index import ensure_index, knn
from mgdedup.index.layout import IndexDir
from mgdedup.index.model_check import model_for_index


@dataclass
class QueryResult:
    query: str
    results: list[tuple[str, float]]  # (absolute path, cosine similarity), best first
    error: str | None = None


def search_index(index_dir: Path, queries: Sequence[Path], k: int = 10,
                 model_spec: str | None = None, workers: int = 0) -> list[QueryResult]:
    """Top-k neighbours of each query image; unreadable queries carry their error."""
    if k < 1:
        raise MgdedupError("-k must be at least 1")
    with IndexDir(index_dir).open_store() as store:
        meta = store.meta
        model = model_for_index(meta, model_spec)
        # p as the rows were computed, even if the model's p* table changed since
        embedder = Embedder(model, meta.resolution, workers=workers, p=meta.p)
        index = ensure_index(Path(index_dir), store)
        paths = [str(p) for p in store.absolute_paths()]
        results: list[QueryResult] = [QueryResult(str(q), []) for q in queries]
        for batch in embedder.embed_files(list(queries), digest=False):
            for position, reason in batch.errors:
                results[position].error = reason
            if not batch.positions:
                continue
            scores, ids = knn(index, batch.descriptors.descriptors, k)
            for row, position in enumerate(batch.positions):
                results[position].results = [(paths[i], float(s))
                                             for s, i in zip(scores[row], ids[row]) if i >= 0]
    return results

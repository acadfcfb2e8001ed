"""Duplicate groups of an index: blocked range search, then stars around keepers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mgdedup.decisions import apply_decisions, load_decisions
from mgdedup.grouping import Group, keeper_order, star_groups
from mgdedup.locate import H5_NAME
from mgdedup.model import DEFAULT_THRESHOLD
from mgdedup.report import FileFacts
from mgdedup.search import ensure_index, range_pairs
from mgdedup.store import IndexStore


@dataclass
class DedupResult:
    threshold: float
    groups: list[Group]
    facts: list[FileFacts]  # per index row

    @property
    def duplicate_count(self) -> int:
        return sum(len(group.members) for group in self.groups)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(self.facts[row].size for group in self.groups for row, _ in group.members)


def file_facts(store: IndexStore) -> list[FileFacts]:
    paths = store.absolute_paths()
    widths, heights, sizes = store.read("width"), store.read("height"), store.read("size")
    return [FileFacts(str(path), int(w), int(h), int(s))
            for path, w, h, s in zip(paths, widths, heights, sizes)]


def find_duplicates(index_dir: Path, threshold: float | None = None,
                    block_rows: int = 16384) -> DedupResult:
    """Every member of a group has cosine similarity >= threshold to its group's keeper,
    except pairs a person marked as duplicates; pairs marked "not-duplicate" never group.

    Without a threshold, the one measured for the index's descriptors is used.
    """
    with IndexStore.open(Path(index_dir) / H5_NAME) as store:
        if threshold is None:
            threshold = store.meta.threshold if store.meta.threshold is not None else \
                DEFAULT_THRESHOLD
        index = ensure_index(Path(index_dir), store)
        i, j, scores = range_pairs(index, store.iter_embeddings(block_rows), threshold)
        facts = file_facts(store)

        def similarity(a: int, b: int) -> float:
            rows = store.embeddings(a, a + 1), store.embeddings(b, b + 1)
            return float(rows[0][0] @ rows[1][0])

        i, j, scores = apply_decisions(load_decisions(index_dir), [f.path for f in facts],
                                       i, j, scores, similarity)
    order = keeper_order(pixels=[f.width * f.height for f in facts],
                         sizes=[f.size for f in facts], paths=[f.path for f in facts])
    groups = star_groups(len(facts), i, j, scores, order)
    return DedupResult(threshold=threshold, groups=groups, facts=facts)

"""Duplicate groups of an index: copy scores and components by default, or cosines and stars."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgdedup.duplicates.actions.file_ops import file_identity
from mgdedup.duplicates.copy_score import CopyScorer
from mgdedup.duplicates.decisions import apply_decisions, load_decisions
from mgdedup.duplicates.grouping import Group, star_groups
from mgdedup.duplicates.keepers import KeeperRule, Traits, collect_traits, is_framed_copy
from mgdedup.duplicates.report_text import FileFacts
from mgdedup.duplicates.score_norm import ScoreNorm, collection_background, normalise
from mgdedup.errors import MgdedupError
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexStore
from mgdedup.model.thresholds import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

#: precision meant when normalised scores need a threshold and none was asked for: the
#: measured cosine default is the p99 threshold too (BENCHMARKS.md)
DEFAULT_TARGET_PRECISION = 0.99


#: how a threshold was chosen (`DedupResult.threshold_source`), in words; "precision" is said
#: with its target by each report
THRESHOLD_ORIGINS = {"threshold": "given", "measured": "measured for the model",
                     "default": "generic default"}


@dataclass
class DedupResult:
    threshold: float
    groups: list[Group]
    facts: list[FileFacts]  # per index row
    #: "threshold" (given), "measured" (stored with the index's model), "default" (generic),
    #: "precision" (calibrated for `target_precision`)
    threshold_source: str = "threshold"
    target_precision: float | None = None
    score_norm: ScoreNorm | None = None  # scores are SSCD-normalised when set
    #: what a member's score is: "copy" (P(copy), in [0, 1]), "cosine", "sscd-normalised"
    score_kind: str = "cosine"
    keep_rule: str = "original"  # the keeper rule (`mgdedup.duplicates.keepers`)
    #: files an applied action moved, trashed or deleted (and undo did not put back), left out
    gone: int = 0
    #: what the keeper rule saw of each file with a pair (row -> Traits)
    traits: dict[int, Traits] = field(default_factory=dict)

    @property
    def duplicate_count(self) -> int:
        return sum(len(group.members) for group in self.groups)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(self.facts[row].size for group in self.groups for row, _ in group.members)


def file_facts(store: IndexStore) -> list[FileFacts]:
    paths = store.absolute_paths()
    widths, heights, sizes = store.read("width"), store.read("height"), store.read("size")
    mtimes = store.read("mtime_ns")
    return [FileFacts(str(path), int(w), int(h), int(s), int(m))
            for path, w, h, s, m in zip(paths, widths, heights, sizes, mtimes)]


def choose_threshold(index_dir: Path, threshold: float | None, precision: float | None,
                     score_norm: ScoreNorm | None,
                     on_calibrate: Callable[[str], None] | None = None,
                     **calibrate_options: object) -> tuple[float, str, float | None]:
    """(threshold, source, target precision) for a dedup run.

    --threshold wins; --precision reads the stored calibration of the scoring mode (running
    it when missing or stale); otherwise cosine scores use the threshold measured for the
    model, and normalised scores (another scale) the calibrated one at precision 0.99.
    """
    if threshold is not None and precision is not None:
        raise MgdedupError("give --threshold or --precision, not both")
    if threshold is not None:
        return float(threshold), "threshold", None
    if precision is None and score_norm is None:
        with IndexDir(index_dir).open_store() as store:
            measured = store.meta.threshold
        if measured is not None:
            return float(measured), "measured", None
        return DEFAULT_THRESHOLD, "default", None
    from mgdedup.duplicates.precision import ensure_calibration

    target = DEFAULT_TARGET_PRECISION if precision is None else float(precision)
    if not 0.0 < target < 1.0:
        raise MgdedupError(f"--precision must be between 0 and 1 (exclusive), got {target:g}")
    calibration = ensure_calibration(Path(index_dir), score_norm, on_calibrate=on_calibrate,
                                     **calibrate_options)
    found = calibration.threshold_for(target)
    if found is None:
        best = max((p for _, p, r in calibration.curve if r > 0), default=0.0)
        raise MgdedupError(f"precision {target:g} is not reached on this collection (at best "
                           f"{best:.3f} estimated); ask for less, or pass --threshold")
    return found[0], "precision", target


def find_duplicates(index_dir: Path, threshold: float | None = None,
                    block_rows: int = 16384, *, precision: float | None = None,
                    score_norm: ScoreNorm | None = None, scoring: str | None = None,
                    workers: int | None = None, keep: KeeperRule | None = None,
                    on_calibrate: Callable[[str], None] | None = None,
                    on_verify: Callable[[int], None] | None = None,
                    on_verified: Callable[[int], None] | None = None,
                    **calibrate_options: object) -> DedupResult:
    """Duplicate groups of an index; pairs a person marked "not-duplicate" never group, pairs
    marked "duplicate" always do.

    `scoring` "copy" (the default where the index's model has a copy score): candidates are
    verified and scored by `mgdedup.duplicates.copy_score`, the score is P(copy) in [0, 1],
    groups are connected components (`mgdedup.duplicates.copy_search`); `on_verify(pairs)` and
    `on_verified(count)` follow the verification. "cosine": the cosine similarity to the
    keeper, star groups; with `score_norm` ("normalised") the SSCD-normalised one. The
    threshold is chosen by `choose_threshold` (given, measured, or calibrated for `precision`;
    extra keyword options go to `mgdedup.duplicates.precision.calibrate_index`).

    The keeper of each group is chosen by `keep` (default: the original where it can be
    told, `mgdedup.duplicates.keepers`), with the files a person chose as keepers first.
    Files an applied action moved away (and `undo` did not put back) are left out and
    counted in `gone`.
    """
    decisions = load_decisions(index_dir)
    keep = _with_choices(keep, decisions.keepers)
    scorer = _copy_scorer(index_dir) if scoring in (None, "copy") and score_norm is None \
        else None
    if scoring == "copy" and scorer is None:
        raise MgdedupError("this index's model has no copy score at its resolution; use "
                           "--score cosine")
    if scorer is not None:
        return _find_copies(index_dir, scorer, threshold, precision, block_rows, workers,
                            keep, on_verify, on_verified)
    threshold, source, target = choose_threshold(index_dir, threshold, precision, score_norm,
                                                 on_calibrate, **calibrate_options)
    from mgdedup.index.faiss_index import ensure_index, range_pairs  # FAISS: when searching

    with IndexDir(index_dir).open_store() as store:
        index = ensure_index(Path(index_dir), store)
        if score_norm is None:
            background = None
            i, j, scores = range_pairs(index, store.iter_embeddings(block_rows), threshold)
        else:
            background = collection_background(index, store.iter_embeddings(block_rows),
                                               score_norm)
            i, j, scores = _normalised_pairs(index, store, background, score_norm, threshold,
                                             block_rows)
        # scores as the rows say, never as the search structure (a cache) says
        i, j, scores = _rescored(store, i, j, background, score_norm, threshold)
        facts = file_facts(store)
        i, j, scores = _without_same_files(facts, i, j, scores)

        def similarity(a: int, b: int) -> float:
            rows = store.embeddings(a, a + 1), store.embeddings(b, b + 1)
            score = float(rows[0][0] @ rows[1][0])
            if background is not None and score_norm is not None:
                score = float(normalise(np.float32(score), background[a], background[b],
                                        score_norm))
            return score

        i, j, scores = apply_decisions(decisions, [f.path for f in facts],
                                       i, j, scores, similarity)
        i, j, scores, gone = _without_gone_files(index_dir, facts, i, j, scores)
        traits = _traits(facts, i, j, keep)
        groups = star_groups(len(facts), i, j, scores, keep.order(len(facts), traits))
        _explain_keepers(groups, traits, keep)
        _add_cosines(store, groups)
    return DedupResult(threshold=threshold, groups=groups, facts=facts, threshold_source=source,
                       target_precision=target, score_norm=score_norm,
                       score_kind="sscd-normalised" if score_norm is not None else "cosine",
                       keep_rule=keep.rule, gone=gone, traits=traits)


def _with_choices(keep: KeeperRule | None, chosen: set[str]) -> KeeperRule:
    """The keeper rule asked for (default: original), with the files a person chose."""
    keep = keep or KeeperRule()
    return KeeperRule(keep.rule, keep.prefer, frozenset(keep.chosen) | frozenset(chosen))


def _traits(facts: list[FileFacts], i: np.ndarray, j: np.ndarray, keep: KeeperRule,
            framed: set[int] | None = None) -> dict[int, Traits]:
    rows = np.unique(np.concatenate([i, j])).tolist() if len(i) else []
    return collect_traits(rows, facts, keep, framed or set())


def _explain_keepers(groups: list[Group], traits: dict[int, Traits], keep: KeeperRule) -> None:
    for group in groups:
        group.keeper_reason = keep.reason(traits[group.keeper],
                                          [traits[row] for row, _ in group.members])


def _acted_on(index_dir: Path) -> set[str]:
    """Absolute paths of the files that applied actions of this index moved, trashed or
    replaced (every step not recorded as failed; `undo` may have put some back)."""
    from mgdedup.duplicates.actions.manifest import manifests_of, read_manifest

    sources: set[str] = set()
    for manifest in manifests_of(IndexDir(index_dir).actions):
        try:
            read = read_manifest(manifest)
        except MgdedupError as error:
            log.warning("%s", error)
            continue
        sources.update(os.path.abspath(step.source) for step in read.steps
                       if step.state != "failed")
    return sources


def _without_gone_files(index_dir: Path, facts: list[FileFacts], i: np.ndarray, j: np.ndarray,
                        scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Drop pairs with a file an applied action moved or deleted and `undo` has not put
    back: a group never lists it again (`gone` counts them; `mgdedup index` refreshes the
    index). Only files named in the index's action manifests are looked at."""
    if not len(i):
        return i, j, scores, 0
    acted = _acted_on(index_dir)
    if not acted:
        return i, j, scores, 0
    rows = np.unique(np.concatenate([i, j]))
    missing = np.array([os.path.abspath(facts[row].path) in acted
                        and not os.path.lexists(facts[row].path) for row in rows.tolist()],
                       bool)
    if not missing.any():
        return i, j, scores, 0
    gone = rows[missing]
    keep = ~(np.isin(i, gone) | np.isin(j, gone))
    return i[keep], j[keep], scores[keep], int(missing.sum())


def has_copy_score(index_dir: Path) -> bool:
    """Whether the index's model, whitening and resolution have a copy score (`dedup`'s
    default scoring where they do)."""
    return _copy_scorer(index_dir) is not None


def _copy_scorer(index_dir: Path) -> CopyScorer | None:
    from mgdedup.model.registry import copy_scorer_for

    with IndexDir(index_dir).open_store() as store:
        meta = store.meta
    return copy_scorer_for(meta.model_name, meta.resolution, meta.whitening_id)


def _find_copies(index_dir: Path, scorer: CopyScorer, threshold: float | None,
                 precision: float | None, block_rows: int, workers: int | None,
                 keep: KeeperRule, on_verify: Callable[[int], None] | None,
                 on_verified: Callable[[int], None] | None) -> DedupResult:
    """Copy scoring (see `find_duplicates`)."""
    if threshold is not None and precision is not None:
        raise MgdedupError("give --threshold or --precision, not both")
    target = None
    if threshold is not None:
        source = "threshold"
    elif precision is not None:
        found = scorer.threshold_for(float(precision))
        if found is None:
            raise MgdedupError(f"precision {precision:g} was not reached on the copies the "
                               "copy score was fitted on; ask for less, or pass --threshold")
        threshold, source, target = found[0], "precision", float(precision)
    else:
        threshold, source = scorer.default_threshold, "measured"
    from mgdedup.duplicates.copy_search import component_groups, score_collection

    where = IndexDir(index_dir)
    with where.open_store() as store:
        facts = file_facts(store)
        scored = score_collection(store, lambda: _search_index(Path(index_dir), store), scorer,
                                  [f.path for f in facts], block_rows=block_rows,
                                  workers=workers, cache=where.verified,
                                  pairs_cache=where.candidates, search_file=where.faiss,
                                  on_start=on_verify, on_progress=on_verified)
        kept = np.flatnonzero(scored.probability >= np.float32(threshold))
        framed = _framed_copies(scored, kept, facts)
        i, j, scores = scored.i[kept], scored.j[kept], scored.probability[kept]
        i, j, scores = _without_same_files(facts, i, j, scores)
        i, j, scores = apply_decisions(load_decisions(index_dir), [f.path for f in facts],
                                       i, j, scores, lambda a, b: 1.0)  # a person said so
        i, j, scores, gone = _without_gone_files(index_dir, facts, i, j, scores)
        traits = _traits(facts, i, j, keep, framed)
        groups = _one_path_per_file(facts, component_groups(len(facts), i, j, scores,
                                                            keep.order(len(facts), traits)))
        _explain_keepers(groups, traits, keep)
        _add_cosines(store, groups)
    return DedupResult(threshold=float(threshold), groups=groups, facts=facts,
                       threshold_source=source, target_precision=target, score_kind="copy",
                       keep_rule=keep.rule, gone=gone, traits=traits)


def _search_index(index_dir: Path, store: IndexStore):
    """The up-to-date search index (FAISS imported only when candidates are searched)."""
    from mgdedup.index.faiss_index import ensure_index

    return ensure_index(index_dir, store)


def _framed_copies(scored, kept: np.ndarray, facts: list[FileFacts]) -> set[int]:
    """Rows that a kept pair's verified match shows to be a screenshot or paste of the
    pair's other file (`keepers.is_framed_copy`)."""
    framed: set[int] = set()
    for k in kept.tolist():
        evidence = scored.evidence[k]
        if evidence.inliers <= 0:
            continue
        a, b = int(scored.i[k]), int(scored.j[k])
        pixels_a = facts[a].width * facts[a].height
        pixels_b = facts[b].width * facts[b].height
        if is_framed_copy(evidence.cover_a, pixels_a, evidence.cover_b, pixels_b):
            framed.add(a)
        if is_framed_copy(evidence.cover_b, pixels_b, evidence.cover_a, pixels_a):
            framed.add(b)
    return framed


def _add_cosines(store: IndexStore, groups: list[Group]) -> None:
    """Each member's raw cosine to its keeper, from the rows (reported beside the score)."""
    rows = sorted({row for g in groups for row in (g.keeper, *(m for m, _ in g.members))})
    if not rows:
        return
    vectors = np.asarray(store.read("embeddings", np.array(rows)), np.float32)
    at = {row: k for k, row in enumerate(rows)}
    for group in groups:
        keeper = vectors[at[group.keeper]]
        group.cosines = {m: float(vectors[at[m]] @ keeper) for m, _ in group.members}


def _normalised_pairs(index, store: IndexStore, background: np.ndarray, norm: ScoreNorm,
                      threshold: float, block_rows: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs whose normalised score is >= threshold.

    s' >= t needs s >= t + beta (bg_i + bg_j) / 2 >= t + beta min(bg): one exact range search
    at that cosine, then the exact filter. A few images with an unusually low background
    make the search radius (and the candidate pairs) larger, never the result wrong.
    """
    if not len(background):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    radius = float(threshold) + norm.beta * float(background.min()) if norm.beta >= 0 else \
        float(threshold) + norm.beta * float(background.max())
    radius = min(radius, 1.0)
    from mgdedup.index.faiss_index import range_pairs

    i, j, raw = range_pairs(index, store.iter_embeddings(block_rows), radius)
    scores = normalise(raw, background[i], background[j], norm)
    keep = scores >= np.float32(threshold)
    return i[keep], j[keep], scores[keep]


def _rescored(store: IndexStore, i: np.ndarray, j: np.ndarray, background: np.ndarray | None,
              norm: ScoreNorm | None, threshold: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, score) with every score recomputed from the HDF5 rows (the source of truth),
    keeping the pairs that still reach the threshold: a damaged or altered faiss.index can
    then cost candidates, never report a pair at a score it does not have."""
    if not len(i):
        return i, j, np.zeros(0, np.float32)
    rows = np.unique(np.concatenate([i, j]))
    vectors = np.asarray(store.read("embeddings", rows), np.float32)
    position = {int(r): k for k, r in enumerate(rows.tolist())}
    a = vectors[[position[int(r)] for r in i.tolist()]]
    b = vectors[[position[int(r)] for r in j.tolist()]]
    scores = np.einsum("ij,ij->i", a, b).astype(np.float32)
    if background is not None and norm is not None:
        scores = normalise(scores, background[i], background[j], norm)
    keep = scores >= np.float32(threshold)
    return i[keep], j[keep], scores[keep]


def _one_path_per_file(facts: list[FileFacts], groups: list[Group]) -> list[Group]:
    """Groups with one path per file: a connected group can reach a hard link of its keeper
    through a third copy, although no pair of the two was kept; acting on it would act on
    the keeper. Members that are the same file as the keeper or as an earlier member go."""
    out = []
    for group in groups:
        seen = {file_identity(facts[group.keeper].path)}
        members = []
        for row, score in group.members:
            identity = file_identity(facts[row].path)
            if identity is not None and identity in seen:
                continue
            seen.add(identity)
            members.append((row, score))
        if members:
            group.members = members
            out.append(group)
    return out


def _without_same_files(facts: list[FileFacts], i: np.ndarray, j: np.ndarray,
                        scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop pairs of two paths to ONE file (same device and inode: a hard link, a folder
    indexed twice through a bind mount): deleting one as the other's duplicate would delete
    both. Only the rows of pairs are stat'ed."""
    if not len(i):
        return i, j, scores
    identity = {row: file_identity(facts[row].path)
                for row in np.unique(np.concatenate([i, j])).tolist()}
    keep = np.array([identity[a] is None or identity[a] != identity[b]
                     for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
    if not keep.all():
        log.info("%d pairs of paths to the same file left out", int((~keep).sum()))
    return i[keep], j[keep], scores[keep]

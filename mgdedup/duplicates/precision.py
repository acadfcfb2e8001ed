"""Which similarity threshold reaches a target precision on THIS collection, without labels.

`mgdedup calibrate` (and `dedup --precision P`, which runs it when needed) estimates, for the
index's own model, resolution and images, the precision of "flag every pair scoring >= t":

Positives. `sample` indexed images (seeded, capped by the collection size; unreadable ones
are skipped with their reason) each get synthetic copies: the five planted edits of
`mgdedup.imaging.edits` (crop, JPEG 30, 1/3 size, mirror, brightness: what users' copies
look like) and `aug_copies` copies by the "full" augmentation of IN-aug
(`mgdedup.imaging.augment.augmented_copy` at the index resolution). Copies are saved as JPEG q92,
embedded with the index's model and resolution (`Embedder`), and scored against the
original's STORED descriptor (not re-embedded: that is the vector dedup compares). Their
scores give TPR(t), the fraction of copies an image's copy would score >= t.

Negatives. For every indexed image (a seeded sample of `probe_rows` in larger collections),
its `neighbours` nearest OTHER indexed images (FAISS). F(t) = mean number of them scoring
>= t per image is exactly "how many files dedup flags with an image at threshold t" wherever
t is above every probed image's last neighbour (`exact_from`; below it F is only a lower
bound, so no threshold below it is offered). F can only resolve rates of 1/n false pairs per
image for n probed images: small collections give coarse estimates at high targets. Those
neighbours are not all negatives: the collection's real copies are among them, and without
labels they cannot be told apart. Counting them all as false alarms would make calibration
refuse every high target exactly on collections that have copies (the ones dedup is run on).
Excluding neighbours above the current threshold would be circular (the estimate could never
go above it). So F(t) is split by a mixture argument:

    F(t) = c * TPR(t) + N(t),   c = real copies per image,  N(t) = non-copies per image >= t

N >= 0 gives c <= F(t) / TPR(t) for every t; the estimate is the tightest such bound,
c_hat = min F(t)/TPR(t) over thresholds where TPR >= 0.25 (enough copies to be stable). It is
exact when some threshold has copies above it and no non-copy (near-duplicates), and
otherwise errs HIGH, i.e. optimistic; its other assumption is that synthetic copies score
like the collection's real ones (if real copies are harder, c_hat is too low: conservative).

Prior. A collection with no copies has c_hat = 0 and no precision to speak of; the copy rate
used is max(c_hat, `prior_copy_rate`) (default 0.1 copies per image, `--copy-rate`), so there
the target bounds false alarms per image instead: N(t) <= rate * TPR(t) * (1 - p) / p.

    precision(t) = rate * TPR(t) / (rate * TPR(t) + max(F(t) - c_hat * TPR(t), 0))

The threshold for a target p is the lowest candidate score (>= exact_from) whose precision
is >= p, the convention of `mgdedup.evaluation.metrics.threshold_at_precision`.

How close the estimate comes is measured in BENCHMARKS.md ("Calibration"). Precision at a
high target hinges on c_hat being right within (1 - p) c, which no unlabelled estimate
promises: on collections of look-alike shots c_hat comes out high (pairs of different photos
of the same things look like copies) and the precision reached is lower than the target.
Without the full-augmentation copies c_hat comes out low and the thresholds conservative.
The whole curve is stored in IDX/calibration.json (per scoring mode: cosine, or
SSCD-normalised which is on another
scale), so any target is answered without re-embedding. It is stale when the model,
whitening or resolution differ, or the row count changed by more than 20 %.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mgdedup.duplicates.calibration_defaults import (
    DEFAULT_AUG_COPIES,
    DEFAULT_COPY_RATE,
    DEFAULT_NEIGHBOURS,
    DEFAULT_PROBE_ROWS,
    DEFAULT_SAMPLE,
)
from mgdedup.duplicates.score_norm import ScoreNorm
from mgdedup.errors import MgdedupError, one_line
from mgdedup.files.atomic import write_text
from mgdedup.files.names import json_text
from mgdedup.files.scratch import scratch_folder
from mgdedup.index.layout import IndexDir

if TYPE_CHECKING:  # heavy (torch, faiss, h5py): imported where used, the CLI starts fast
    from mgdedup.index.store import IndexMeta, IndexStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: the copy rate is bounded where at least this fraction of synthetic copies is flagged
MIN_TPR_FOR_RATE = 0.25
#: a calibration is stale once the collection grew or shrank by more than this fraction
STALE_ROW_CHANGE = 0.2
#: curve points kept in calibration.json (thinned evenly beyond)
MAX_CURVE_POINTS = 4000


def mode_key(norm: ScoreNorm | None) -> str:
    """Name of a scoring mode in calibration.json."""
    if norm is None:
        return "cosine"
    return f"sscd(skip={norm.skip},k={norm.k},beta={norm.beta:g})"


@dataclass
class PrecisionCurve:
    """Estimated precision and recall of thresholds, from the highest threshold down."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    estimated_copy_rate: float
    copy_rate: float

    def threshold_for(self, target: float) -> tuple[float, float, float] | None:
        """(threshold, precision, recall) of the lowest threshold reaching `target`."""
        reached = np.nonzero((self.precision >= target) & (self.recall > 0))[0]
        if not len(reached):
            return None
        last = int(reached.max())
        return (float(self.thresholds[last]), float(self.precision[last]),
                float(self.recall[last]))


def precision_curve(positive: np.ndarray, neighbours: np.ndarray, exact_from: float = -math.inf,
                    prior_copy_rate: float = DEFAULT_COPY_RATE) -> PrecisionCurve:
    """The estimator of the module docstring.

    `positive`: scores of (original, synthetic copy) pairs; `neighbours`: (n, k) scores of
    each sampled image with its nearest other indexed images (-inf where missing);
    thresholds below `exact_from` are not offered (F would be a lower bound there).
    """
    positive = np.sort(np.asarray(positive, np.float64))
    neighbours = np.asarray(neighbours, np.float64)
    rows = max(len(neighbours), 1)
    flat = np.sort(neighbours[np.isfinite(neighbours)])
    if not len(positive):
        raise MgdedupError("calibration needs at least one readable image")
    candidates = np.unique(np.concatenate([positive, flat]))[::-1]
    candidates = candidates[candidates >= exact_from]
    tpr = (len(positive) - np.searchsorted(positive, candidates, side="left")) / len(positive)
    flagged = (len(flat) - np.searchsorted(flat, candidates, side="left")) / rows
    usable = tpr >= MIN_TPR_FOR_RATE
    estimated = float(np.min(flagged[usable] / tpr[usable])) if usable.any() else 0.0
    rate = max(estimated, float(prior_copy_rate))
    copies = rate * tpr
    false_alarms = np.maximum(flagged - estimated * tpr, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(copies + false_alarms > 0, copies / (copies + false_alarms), 1.0)
    return PrecisionCurve(candidates.astype(np.float32), precision, tpr, estimated, rate)


@dataclass
class Calibration:
    """What calibration.json stores for one scoring mode."""

    mode: str
    model_id: str
    whitening_id: str
    resolution: int
    rows: int  # index rows when calibrated
    date: str
    seed: int
    sampled: int  # images whose copies were made (readable)
    positives: int
    neighbours: int  # per probed image
    estimated_copy_rate: float
    prior_copy_rate: float
    copy_rate: float
    exact_from: float
    curve: list[tuple[float, float, float]]  # (threshold, precision, recall), high to low
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    score_norm: dict[str, float] | None = None
    probed: int = 0  # images whose neighbours gave F(t)

    def threshold_for(self, target: float) -> tuple[float, float, float] | None:
        """(threshold, estimated precision, recall) of the lowest threshold reaching target."""
        if not self.curve:
            return None
        data = np.asarray(self.curve, dtype=np.float64)
        curve = PrecisionCurve(data[:, 0], data[:, 1], data[:, 2], self.estimated_copy_rate,
                               self.copy_rate)
        return curve.threshold_for(target)

    def stale_reason(self, meta: IndexMeta, rows: int) -> str | None:
        """Why this calibration no longer describes the index (None: it still does)."""
        if (self.model_id, self.whitening_id, self.resolution) != \
                (meta.model_id, meta.whitening_id, meta.resolution):
            return "the index was rebuilt with another model or resolution"
        if abs(rows - self.rows) > STALE_ROW_CHANGE * max(self.rows, 1):
            return f"the index has {rows} images, {self.rows} when calibrated"
        return None


def load_calibration(index_dir: Path, mode: str) -> Calibration | None:
    """The stored calibration of a scoring mode, or None (missing or unreadable file)."""
    path = IndexDir(index_dir).calibration
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entry = data["modes"][mode]
        if data.get("version") != FORMAT_VERSION:
            return None
        entry["curve"] = [tuple(point) for point in entry["curve"]]
        entry["skipped"] = [tuple(item) for item in entry.get("skipped", [])]
        return _checked(Calibration(**entry))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("ignoring %s (%s): it will be estimated again", path, one_line(error))
        return None


_NUMBER_FIELDS = ("estimated_copy_rate", "prior_copy_rate", "copy_rate", "exact_from")
_COUNT_FIELDS = ("resolution", "rows", "seed", "sampled", "positives", "neighbours", "probed")


def _checked(calibration: Calibration) -> Calibration:
    """A stored calibration whose every field has the type and range it is used with
    (ValueError otherwise: the file is then ignored and calibration runs again)."""
    for name in _COUNT_FIELDS:
        value = getattr(calibration, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} is not a count")
    for name in _NUMBER_FIELDS:
        value = getattr(calibration, name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} is not a finite number")
    for name in ("mode", "model_id", "whitening_id", "date"):
        if not isinstance(getattr(calibration, name), str):
            raise ValueError(f"{name} is not text")
    for point in calibration.curve:
        if len(point) != 3 or not all(isinstance(v, int | float) and math.isfinite(v)
                                      for v in point):
            raise ValueError("a curve point is not three finite numbers")
    return calibration


def save_calibration(index_dir: Path, calibration: Calibration) -> Path:
    """Add or replace this mode's entry in calibration.json, atomically."""
    path = IndexDir(index_dir).calibration
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != FORMAT_VERSION or not isinstance(data.get("modes"), dict):
            raise ValueError("old format")
    except (OSError, ValueError):
        data = {"version": FORMAT_VERSION, "modes": {}}
    data["modes"][calibration.mode] = asdict(calibration)
    write_text(path, json_text(data, indent=1) + "\n", "calibration")
    return path


def _rows_of(store: IndexStore, rows: np.ndarray) -> np.ndarray:
    """Stored descriptors of sorted `rows`, read in one streaming pass."""
    out = np.zeros((len(rows), store.meta.dim), np.float32)
    for start, block in store.iter_embeddings():
        lo, hi = np.searchsorted(rows, [start, start + len(block)])
        out[lo:hi] = block[rows[lo:hi] - start]
    return out


def calibrate_index(index_dir: Path, *, sample: int = DEFAULT_SAMPLE,
                    aug_copies: int = DEFAULT_AUG_COPIES,
                    neighbours: int = DEFAULT_NEIGHBOURS,
                    probe_rows: int = DEFAULT_PROBE_ROWS,
                    prior_copy_rate: float = DEFAULT_COPY_RATE,
                    score_norm: ScoreNorm | None = None, seed: int = 0,
                    model_spec: str | None = None, workers: int | None = None,
                    device: str = "cpu",
                    on_start: Callable[[int], None] | None = None,
                    on_progress: Callable[[int], None] | None = None) -> Calibration:
    """Estimate the precision curve of an index (module docstring); nothing is saved."""
    from mgdedup.duplicates.score_norm import (
        background_scores,
        collection_background,
        drop_self,
        normalise,
    )
    from mgdedup.embedding.embedder import Embedder
    from mgdedup.imaging.edits import write_copies
    from mgdedup.index.faiss_index import ensure_index, knn
    from mgdedup.index.model_check import model_for_index

    index_dir = Path(index_dir)
    if sample < 1 or aug_copies < 0 or neighbours < 1:
        raise MgdedupError("calibration needs --sample >= 1, --neighbours >= 1")
    with IndexDir(index_dir).open_store() as store:
        meta, total = store.meta, len(store)
        if total < 2:
            raise MgdedupError(f"the index has {total} image(s); calibration needs at least 2")
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=min(sample, total), replace=False))
        probe = np.arange(total) if total <= probe_rows else \
            np.sort(rng.choice(total, size=probe_rows, replace=False))
        paths = store.absolute_paths()
        index = ensure_index(index_dir, store)
        originals_all = _rows_of(store, chosen)
        probed = _rows_of(store, probe)
        background = (collection_background(index, store.iter_embeddings(), score_norm)
                      if score_norm is not None else None)
    model = model_for_index(meta, model_spec)

    # the synthetic copies are embedded as the index's rows were (its precision)
    embedder = Embedder(model, meta.resolution, device=device, workers=workers,
                        precision=meta.precision)
    with scratch_folder(IndexDir(index_dir).scratch, "calibrate") as tmp:
        copy_paths, positions, unreadable = write_copies(
            [paths[row] for row in chosen], tmp, resolution=meta.resolution,
            aug_copies=aug_copies, seed=seed)
        skipped = [(str(path), reason) for path, reason in unreadable]
        kept = sorted(set(positions))
        if not kept:
            raise MgdedupError(f"none of the {len(chosen)} sampled images could be read "
                               f"(first: {skipped[0][0]}: {skipped[0][1]})")
        rank = {position: k for k, position in enumerate(kept)}
        family = [rank[position] for position in positions]
        if on_start is not None:
            on_start(len(copy_paths))
        copies = np.zeros((len(copy_paths), meta.dim), np.float32)
        ok = np.zeros(len(copy_paths), bool)
        for batch in embedder.embed_files(copy_paths, digest=False, on_progress=on_progress):
            copies[batch.positions] = batch.descriptors.descriptors
            ok[batch.positions] = True
    rows = chosen[kept]
    originals = originals_all[kept]
    family_arr = np.asarray(family)[ok]
    copies = copies[ok]
    positive = np.einsum("ij,ij->i", originals[family_arr], copies)

    k = min(neighbours, total - 1)
    raw_scores, ids = drop_self(*knn(index, probed, k + 1), probe)
    complete = k >= total - 1
    if score_norm is None:
        neighbour_scores = raw_scores
        exact_from = -math.inf if complete or not raw_scores.shape[1] else \
            float(np.max(raw_scores[:, -1]))
    else:
        assert background is not None
        copy_bg = background_scores(index, copies, score_norm)
        positive = normalise(positive, background[rows][family_arr], copy_bg, score_norm)
        neighbour_scores = normalise(raw_scores, background[probe][:, None],
                                     background[np.maximum(ids, 0)], score_norm)
        neighbour_scores[ids < 0] = -np.inf
        exact_from = -math.inf
        if not complete and raw_scores.shape[1]:
            # a row beyond the list scores at most (its raw score) - beta (bg_i + min bg) / 2
            bound = raw_scores[:, -1] - score_norm.beta * (background[probe]
                                                            + background.min()) / 2
            exact_from = float(np.max(bound))
    curve = precision_curve(positive, neighbour_scores, exact_from, prior_copy_rate)
    points = np.stack([curve.thresholds, curve.precision, curve.recall], axis=1)
    if len(points) > MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, len(points) - 1, MAX_CURVE_POINTS).round().astype(int))
        points = points[keep]
    for path, reason in skipped:
        log.warning("calibration skipped %s: %s", path, reason)
    return Calibration(
        mode=mode_key(score_norm), model_id=meta.model_id, whitening_id=meta.whitening_id,
        resolution=meta.resolution, rows=total,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), seed=seed,
        sampled=len(rows), positives=len(positive), neighbours=k,
        estimated_copy_rate=round(curve.estimated_copy_rate, 6),
        prior_copy_rate=float(prior_copy_rate), copy_rate=round(curve.copy_rate, 6),
        exact_from=exact_from if math.isfinite(exact_from) else -1e9,
        curve=[(round(float(t), 6), round(float(p), 6), round(float(r), 6))
               for t, p, r in points],
        skipped=[(str(p), r) for p, r in skipped],
        score_norm=score_norm.as_dict() if score_norm is not None else None,
        probed=len(probe))


def ensure_calibration(index_dir: Path, score_norm: ScoreNorm | None = None, *,
                       on_calibrate: Callable[[str], None] | None = None,
                       **options: object) -> Calibration:
    """The stored calibration of this mode, re-estimated (and saved) when missing or stale.

    `on_calibrate(reason)` is called before a (slow: it embeds images) re-estimation.
    """

    index_dir = Path(index_dir)
    mode = mode_key(score_norm)
    stored = load_calibration(index_dir, mode)
    with IndexDir(index_dir).open_store() as store:
        meta, rows = store.meta, len(store)
    reason = "no calibration yet" if stored is None else stored.stale_reason(meta, rows)
    if stored is not None and reason is None:
        return stored
    if on_calibrate is not None:
        on_calibrate(reason or "")
    calibration = calibrate_index(index_dir, score_norm=score_norm, **options)  # type: ignore[arg-type]
    save_calibration(index_dir, calibration)
    return calibration

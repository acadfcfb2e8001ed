"""What a similarity threshold means: precision and recall on synthetic copies.

Positives are an image and its planted edits (mgdedup.imaging.synthetic.EDITS: the edits users meet
in real collections), negatives every other pair. The threshold reported is the lowest
cosine at which precision over all pairs is still >= the target: "0.56" then means "at most
1 in 100 flagged pairs is not a copy" on that data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.synthetic import EDITS


@dataclass
class PairMetrics:
    micro_ap: float  # average precision of all pairs ranked by score
    threshold: float | None  # lowest score with precision >= target (None: never reached)
    recall_at_threshold: float
    target_precision: float


def write_edited_copies(paths: Sequence[Path], folder: Path, seed: int = 0
                        ) -> tuple[list[Path], list[int]]:
    """Each edit of each readable image, saved as JPEG; returns (copies, source position)."""
    rng = np.random.default_rng(seed)
    copies, family = [], []
    for position, path in enumerate(paths):
        try:
            image, _ = open_rgb(path, None)
        except ImageReadError:
            continue
        for name, edit in EDITS.items():
            target = Path(folder) / f"{position:05d}_{name}.jpg"
            edit(image, rng).save(target, quality=92)
            copies.append(target)
            family.append(position)
    return copies, family


def pair_metrics(x: np.ndarray, family: np.ndarray, target_precision: float = 0.99
                 ) -> PairMetrics:
    """Micro-AP and the target-precision threshold over all pairs of the rows of x.

    O(n^2) pairs: meant for calibration sets of a few thousand images, not for collections.
    """
    sim = x @ x.T
    upper = np.triu_indices(len(x), k=1)
    scores = sim[upper]
    positive = family[upper[0]] == family[upper[1]]
    if not positive.any():
        return PairMetrics(0.0, None, 0.0, target_precision)
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / positive.sum()
    micro_ap = float((precision * hits).sum() / positive.sum())
    reached = np.nonzero((precision >= target_precision) & hits)[0]
    if not len(reached):
        return PairMetrics(micro_ap, None, 0.0, target_precision)
    last = reached.max()
    return PairMetrics(micro_ap, float(scores[order][last]), float(recall[last]),
                       target_precision)



"""Images in one frame: tell a shared screenshot template or background from shared content.

Two screenshots of the same app, or two photos pasted onto the same background, match each
other with hundreds of inliers and agree on most of the grid: the frame. What tells a copy
from a stranger is the part where the frame holds its content, and a third image in the same
frame shows where that is: the cells where image A and a third image C disagree are A's own
content. If B is a copy of A it agrees with A there; if B only shares the frame it does not.

`frame_agreement` measures that for every pair in the same frame (`Evidence.cells`), over
each third image found in the same frame as either of them among the candidate pairs: the
fraction of the own-content cells where the pair agrees, averaged; NOT_MEASURED where no
third image, or no own-content cell, is there to tell (the copy score then decides without).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from mgdedup.duplicates.local_match import (
    CELL_AGREE,
    CELL_DISAGREE,
    CELL_UNKNOWN,
    Evidence,
    EvidenceRows,
)

NOT_MEASURED = -1.0
#: own-content cells needed for a third image to say anything
MIN_CELLS = 2


def frame_agreement(i: np.ndarray, j: np.ndarray, evidence: Sequence[Evidence]
                    ) -> np.ndarray:
    """Per pair (i[k], j[k]): the frame agreement (see the module docstring), in [0, 1] or
    NOT_MEASURED."""
    out = np.full(len(i), NOT_MEASURED)
    framed = {k: np.frombuffer(cells, np.uint8)
              for k, cells in sorted(EvidenceRows.of(evidence).cells.items())}
    if len(framed) < 2:
        return out
    mates: dict[int, list[tuple[int, int]]] = defaultdict(list)  # row -> (other row, pair)
    for k in framed:
        a, b = int(i[k]), int(j[k])
        mates[a].append((b, k))
        mates[b].append((a, k))
    for k, states in framed.items():
        a, b = int(i[k]), int(j[k])
        known = states != CELL_UNKNOWN
        with_b = {third: pair for third, pair in mates[b] if third != a}
        values = []
        for third, pair in mates[a]:
            if third == b or third not in with_b:
                continue
            # where the third image differs from both: content, not frame
            own = (framed[pair] == CELL_DISAGREE) & (framed[with_b[third]] == CELL_DISAGREE) \
                & known
            if own.sum() >= MIN_CELLS:
                values.append(float((states[own] == CELL_AGREE).mean()))
        if values:
            out[k] = float(np.mean(values))
    return out

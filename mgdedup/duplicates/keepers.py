"""Which file of a duplicate group is kept: the original the others are copies of, where that
can be told, and why, in words.

A rule is a list of criteria compared in turn (the first that tells two files apart
decides). The default, "original", asks in order:

1. a person chose this file as the keeper (`mgdedup review`, stored with the decisions);
2. it is below a folder given with `--prefer` (the first such folder wins);
3. it carries camera EXIF (a make, model or capture time): exports, screenshots and
   re-encodes by most tools lose it;
4. it is not a frame around a smaller copy of another file of its group: a screenshot, or
   a copy pasted onto a larger canvas, has more pixels than the photo it shows, but the
   verified match spans little of it, much of the other file, and the matched part has
   fewer pixels there (by 1.5x) than in the other file (`is_framed_copy`). A crop is the
   reverse case (the original frames it at the same scale), so it is never taken for one;
5. it was modified first (to the second): a copy is written after what it copies;
6. most pixels, largest file, shortest path, the path itself (deterministic).

The other rules (`--keep`) put one criterion first: most-pixels (the first version's rule),
largest, oldest, newest, exif; the person's choice and `--prefer` always come before them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mgdedup.duplicates.report_text import FileFacts

KEEP_RULES = ("original", "most-pixels", "largest", "oldest", "newest", "exif")
DEFAULT_KEEP_RULE = "original"

#: EXIF tags that a camera (or phone) writes and a re-encode usually drops: Make, Model, and
#: DateTimeOriginal in the Exif sub-IFD
_MAKE, _MODEL, _EXIF_IFD, _DATETIME_ORIGINAL = 0x010F, 0x0110, 0x8769, 0x9003
#: a frame shows the other file at least this much smaller (in pixels) than it is
FRAME_SHRINK = 1.5
#: ... and the match spans at least this share of the other file, and at most this share
#: of that share in the frame
FRAME_MIN_COVER, FRAME_COVER_RATIO = 0.3, 0.6


@dataclass(frozen=True)
class Traits:
    """What the keeper rules look at for one file."""

    path: str
    pixels: int
    size: int
    mtime_ns: int
    camera_exif: bool = False
    framed_copy: bool = False  # a screenshot or paste of another file of its group
    chosen: bool = False  # a person chose it as the keeper
    preferred: int = -1  # position of the first --prefer folder it is in, -1: none


def is_framed_copy(cover: float, pixels: int, other_cover: float, other_pixels: int) -> bool:
    """Whether an image shows another one smaller inside a frame (a screenshot, a paste on a
    canvas), from their verified match: `cover` and `other_cover` are the shares of each
    image the matched points span, `pixels` their sizes. The matched part must span much
    of the other image, little of this one, and have fewer pixels here by FRAME_SHRINK."""
    if other_cover < FRAME_MIN_COVER or cover > FRAME_COVER_RATIO * other_cover:
        return False
    return cover * pixels * FRAME_SHRINK <= other_cover * other_pixels


def has_camera_exif(path: str | Path) -> bool:
    """Whether a file's header carries a camera make, model or capture time (no pixels are
    decoded; an unreadable file, or a FIFO or device where a file was, has none)."""
    from PIL import Image

    from mgdedup.files.regular import open_regular

    try:
        with open_regular(path) as handle, Image.open(handle) as image:
            exif = image.getexif()
            if exif.get(_MAKE) or exif.get(_MODEL):
                return True
            return bool(exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL))
    except Exception:  # noqa: BLE001 - an untrusted header (a decompression bomb, a
        return False  # malformed IFD) is a file without camera EXIF, never a crash


@dataclass(frozen=True)
class Criterion:
    name: str
    key: Callable[[Traits], float]  # smaller is better
    reason: Callable[[Traits, Traits], str]  # keeper, runner-up -> why the keeper won


def _when(ns: int) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("chosen", lambda t: 0 if t.chosen else 1, lambda k, r: "chosen in review"),
    Criterion("prefer", lambda t: t.preferred if t.preferred >= 0 else math.inf,
              lambda k, r: "in a --prefer folder"),
    Criterion("exif", lambda t: 0 if t.camera_exif else 1, lambda k, r: "has camera EXIF"),
    Criterion("not-framed", lambda t: 1 if t.framed_copy else 0,
              lambda k, r: "the other shows it smaller, inside a screenshot or paste"),
    Criterion("oldest", lambda t: t.mtime_ns // 1_000_000_000,
              lambda k, r: f"oldest ({_when(k.mtime_ns)} vs {_when(r.mtime_ns)})"),
    Criterion("newest", lambda t: -(t.mtime_ns // 1_000_000_000),
              lambda k, r: f"newest ({_when(k.mtime_ns)} vs {_when(r.mtime_ns)})"),
    Criterion("most-pixels", lambda t: -t.pixels, lambda k, r: "most pixels"),
    Criterion("largest", lambda t: -t.size, lambda k, r: "largest file"),
    Criterion("shortest-path", lambda t: len(t.path), lambda k, r: "shortest path"),
)}

_TAIL = ("most-pixels", "largest", "shortest-path")
_ORDERS: dict[str, tuple[str, ...]] = {
    "original": ("exif", "not-framed", "oldest", *_TAIL),
    "most-pixels": _TAIL,
    "largest": ("largest", "most-pixels", "shortest-path"),
    "oldest": ("oldest", *_TAIL),
    "newest": ("newest", *_TAIL),
    "exif": ("exif", *_TAIL),
}


@dataclass
class KeeperRule:
    """A keeper rule (`KEEP_RULES`), the `--prefer` folders, and the files a person chose."""

    rule: str = DEFAULT_KEEP_RULE
    prefer: Sequence[Path] = ()
    chosen: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.rule not in _ORDERS:
            raise ValueError(f"unknown keeper rule {self.rule!r} (use {', '.join(KEEP_RULES)})")
        self.prefer = [Path(os.path.realpath(Path(p).expanduser())) for p in self.prefer]

    @property
    def criteria(self) -> list[Criterion]:
        return [CRITERIA[name] for name in ("chosen", "prefer", *_ORDERS[self.rule])]

    @property
    def reads_exif(self) -> bool:
        return "exif" in _ORDERS[self.rule]

    def preferred_position(self, path: str) -> int:
        """Position of the first --prefer folder holding `path` (symlinks resolved), -1."""
        if not self.prefer:
            return -1
        real = Path(os.path.realpath(path))
        for position, folder in enumerate(self.prefer):
            if real == folder or folder in real.parents:
                return position
        return -1

    def key(self, traits: Traits) -> tuple:
        return (*(c.key(traits) for c in self.criteria), traits.path)

    def order(self, n: int, traits: dict[int, Traits]) -> np.ndarray:
        """Rows 0..n-1 from most to least worth keeping: rows with traits by `key`, then
        the others (they have no pair, so they are never compared)."""
        ranked = sorted(traits, key=lambda row: self.key(traits[row]))
        rest = np.setdiff1d(np.arange(n, dtype=np.int64), np.asarray(ranked, np.int64))
        return np.concatenate([np.asarray(ranked, np.int64), rest])

    def reason(self, keeper: Traits, others: Sequence[Traits]) -> str:
        """Why `keeper` beat the best of `others`: the criterion that decided, then the
        next one it also wins on, as "has camera EXIF, oldest"."""
        if not others:
            return "only file"
        runner_up = min(others, key=self.key)
        reasons = []
        decided = False
        for criterion in self.criteria:
            mine, theirs = criterion.key(keeper), criterion.key(runner_up)
            if mine < theirs:
                reasons.append(criterion.reason(keeper, runner_up))
                decided = True
            elif mine > theirs and not decided:
                break  # cannot happen for the true keeper; kept safe for hand-built groups
            if len(reasons) == 2:
                break
        return ", ".join(reasons) if reasons else "first by path"


def collect_traits(rows: Sequence[int], facts: Sequence[FileFacts], rule: KeeperRule,
                   framed: set[int] | frozenset[int] = frozenset()) -> dict[int, Traits]:
    """Traits of the rows that have a pair (the only ones a rule compares), from what the
    index says of each file (`facts`, one per row); EXIF is read from the file header only
    where the rule looks at it; `framed`: the rows found to be screenshots or pastes of
    another row (`is_framed_copy`)."""
    out = {}
    for row in rows:
        fact = facts[row]
        out[row] = Traits(path=fact.path, pixels=fact.width * fact.height, size=fact.size,
                          mtime_ns=fact.mtime_ns,
                          camera_exif=rule.reads_exif and has_camera_exif(fact.path),
                          framed_copy=row in framed, chosen=fact.path in rule.chosen,
                          preferred=rule.preferred_position(fact.path))
    return out

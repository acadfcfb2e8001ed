"""Local features with geometric verification: does one image contain the other?

The global descriptor ranks copies well but cannot tell a copy from a look-alike (two photos
of mangoes) and misses copies that fill only part of an image (a screenshot of it, the image
pasted onto another photo). Local features can: RootSIFT keypoints of both images, matched
with Lowe's ratio test, and a homography fitted by MAGSAC. What comes out is evidence, not a
decision (`mgdedup.duplicates.copy_score` weighs it with the other signals):

- inliers: matches consistent with one homography (a copy: tens to hundreds; look-alikes:
  a handful, often collapsed onto one line);
- cover_a, cover_b: the area of each image spanned by the inliers (a screenshot covers a
  small part of itself, but all of its original);
- angle, log_scale, mirrored: what the homography does (a turn, a thumbnail, a mirror image:
  SIFT is invariant to the first two; mirrored keypoints are tried when direct ones fail);
- agree, disagree: after warping one image onto the other, cells of a 12 x 12 grid where both
  are textured and the pixels correlate (NCC > 0.5) or do not: two screenshots of the same app
  match on its frame, and disagree where their photos differ;
- cells, for pairs in the same frame (same size, identity homography: two screenshots of one
  app, two photos pasted on one background, an image and its overlaid copy): the state of
  each cell, which `frame_agreement` compares across the images sharing that frame.

Images are read at most LOCAL_SIDE pixels on their long side (JPEGs decoded at that size by
DCT scaling), in grey. Needs OpenCV (opencv-python-headless).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

from mgdedup.cpus import available_cpus
from mgdedup.imaging.reading import ImageReadError, open_rgb

log = logging.getLogger(__name__)

LOCAL_SIDE = 512
LOCAL_FEATURES = 800
RATIO = 0.8
MIN_MATCHES = 6
RANSAC_PIXELS = 6.0
RANSAC_ITERATIONS = 2000
#: direct matching below this many inliers also tries the mirrored keypoints
MIRROR_BELOW = 30
GRID = 12
TEXTURE_STD = 8.0
AGREE_NCC = 0.5
#: cells not textured in both disagree when their mean grey levels differ by more than this,
#: after the global gain and offset between the two images is taken out (a screenshot of a
#: smooth blue photo and one of a smooth dark photo in the same app differ only so)
FLAT_DIFF = 32.0
#: a homography scaling by more than this (either way) is a chance fit folding one image onto
#: a point, not a copy (thumbnails, screenshots and pastes scale by 1/6 to 6)
MAX_SCALE = 16.0
#: bumped whenever what the evidence means changes, so cached evidence is not reused
EVIDENCE_VERSION = 3
CELL_UNKNOWN, CELL_DISAGREE, CELL_AGREE = 0, 1, 2
#: how far from the identity a homography of two same-size images may be and still be "the
#: same frame": its linear part per entry, its translation as a fraction of the size
FRAME_LINEAR = 0.01
FRAME_SHIFT = 0.01


def _cv2():
    try:
        import cv2
    except ImportError as error:  # a declared dependency: an installation problem
        raise ImportError("copy verification needs OpenCV: pip install "
                          "opencv-python-headless") from error
    cv2.setNumThreads(1)  # callers run one verification per core
    return cv2


@dataclass
class Keypoints:
    points: np.ndarray  # (K, 2) float32, (x, y) in the grey image
    descriptors: np.ndarray | None  # (K, 128) float32 RootSIFT, None when there are none


@dataclass
class LocalFeatures:
    """One image's grey pixels and keypoints (mirrored ones made on first use)."""

    grey: np.ndarray  # (H, W) uint8
    direct: Keypoints
    _mirrored: Keypoints | None = field(default=None, repr=False)

    @property
    def mirrored(self) -> Keypoints:
        if self._mirrored is None:
            self._mirrored = _keypoints(np.ascontiguousarray(self.grey[:, ::-1]))
        return self._mirrored

    @property
    def nbytes(self) -> int:
        sizes = [self.grey.nbytes, self.direct.points.nbytes]
        for keypoints in (self.direct, self._mirrored):
            if keypoints is not None and keypoints.descriptors is not None:
                sizes.append(keypoints.descriptors.nbytes + keypoints.points.nbytes)
        return sum(sizes)


@dataclass(frozen=True)
class Evidence:
    """What geometric verification found between two images (zeros: nothing)."""

    inliers: int = 0
    cover_a: float = 0.0
    cover_b: float = 0.0
    angle: float = 0.0  # degrees, 0-180
    log_scale: float = 0.0  # |log| of the homography's linear scale
    mirrored: bool = False
    agree: int = 0
    disagree: int = 0
    ratio: float = 0.0  # inliers / keypoints of the image with fewer
    #: same frame only: per cell of the grid, row-major, CELL_AGREE / CELL_DISAGREE /
    #: CELL_UNKNOWN (not textured in both, or outside the other image)
    cells: bytes | None = None

    def as_row(self) -> list[float]:
        return [self.inliers, self.cover_a, self.cover_b, self.angle, self.log_scale,
                float(self.mirrored), self.agree, self.disagree, self.ratio]

    @classmethod
    def from_row(cls, row: Sequence[float], cells: bytes | None = None) -> Evidence:
        return cls(inliers=int(row[0]), cover_a=float(row[1]), cover_b=float(row[2]),
                   angle=float(row[3]), log_scale=float(row[4]), mirrored=bool(row[5]),
                   agree=int(row[6]), disagree=int(row[7]), ratio=float(row[8]), cells=cells)


#: columns of `Evidence.as_row`
EVIDENCE_COLUMNS = 9


class EvidenceRows(Sequence[Evidence]):
    """The evidence of many pairs as one array (a row per pair, as `Evidence.as_row`) and
    the cell states of the framed ones: what scoring reads, without an object per pair (a
    10,000-image collection has ~10^5 candidate pairs). Indexing gives an Evidence."""

    def __init__(self, values: np.ndarray, cells: dict[int, bytes] | None = None) -> None:
        self.values = np.asarray(values, np.float64).reshape(-1, EVIDENCE_COLUMNS)
        self.cells = dict(cells or {})

    @classmethod
    def of(cls, evidence: Sequence[Evidence]) -> EvidenceRows:
        if isinstance(evidence, EvidenceRows):
            return evidence
        return cls(np.array([e.as_row() for e in evidence], np.float64),
                   {k: e.cells for k, e in enumerate(evidence) if e.cells is not None})

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, k: int) -> Evidence: ...

    @overload
    def __getitem__(self, k: slice) -> list[Evidence]: ...

    def __getitem__(self, k: int | slice) -> Evidence | list[Evidence]:
        if isinstance(k, slice):
            return [self[n] for n in range(*k.indices(len(self)))]
        k = range(len(self))[k]  # negative positions, and IndexError past the end
        return Evidence.from_row(self.values[k], self.cells.get(k))


def _keypoints(grey: np.ndarray) -> Keypoints:
    cv2 = _cv2()
    sift = cv2.SIFT_create(nfeatures=LOCAL_FEATURES)
    found, descriptors = sift.detectAndCompute(grey, None)
    points = np.array([k.pt for k in found], np.float32).reshape(-1, 2)
    if descriptors is not None:  # RootSIFT: L1-normalise, square root (Arandjelovic 2012)
        descriptors = np.sqrt(descriptors / (descriptors.sum(axis=1, keepdims=True) + 1e-7))
        descriptors = descriptors.astype(np.float32)
    return Keypoints(points, descriptors)


def grey_for_matching(image: Image.Image) -> np.ndarray:
    image = image.convert("L")
    if max(image.size) > LOCAL_SIDE:
        image = image.copy()
        image.thumbnail((LOCAL_SIDE, LOCAL_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)


def extract(image: Image.Image) -> LocalFeatures:
    grey = grey_for_matching(image)
    return LocalFeatures(grey, _keypoints(grey))


def extract_file(path: str | os.PathLike[str]) -> LocalFeatures:
    """Features of an image file (ImageReadError when it cannot be read)."""
    image, _ = open_rgb(Path(path), (LOCAL_SIDE, LOCAL_SIDE))
    return extract(image)


def _cover(points: np.ndarray, shape: tuple[int, ...]) -> float:
    cv2 = _cv2()
    if len(points) < 3:
        return 0.0
    hull = cv2.convexHull(points.reshape(-1, 1, 2))
    return float(cv2.contourArea(hull)) / float(shape[0] * shape[1])


def _agreement(grey_a: np.ndarray, grey_b: np.ndarray, homography: np.ndarray
               ) -> np.ndarray:
    """The state of each cell of `grey_a` (a GRID x GRID grid, row-major): CELL_AGREE where
    both images are textured and the pixels of `grey_b` warped onto `grey_a` correlate,
    CELL_DISAGREE where they are textured and do not, or where the cell's mean grey levels
    differ by more than FLAT_DIFF once the images' global gain and offset is taken out,
    CELL_UNKNOWN elsewhere (outside `grey_b`, or flat and alike)."""
    cv2 = _cv2()
    height, width = grey_a.shape
    flags = cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR
    warped = cv2.warpPerspective(grey_b, homography, (width, height), flags=flags,
                                 borderValue=0).astype(np.float32)
    valid = cv2.warpPerspective(np.full(grey_b.shape, 255, np.uint8), homography,
                                (width, height), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST,
                                borderValue=0) > 0
    a = grey_a.astype(np.float32)
    ys = np.linspace(0, height, GRID + 1).astype(int)
    xs = np.linspace(0, width, GRID + 1).astype(int)
    states = np.full(GRID * GRID, CELL_UNKNOWN, np.uint8)
    means: list[tuple[int, float, float, int]] = []  # cell, mean a, mean b, state
    for row, (y0, y1) in enumerate(zip(ys[:-1], ys[1:])):
        for column, (x0, x1) in enumerate(zip(xs[:-1], xs[1:])):
            inside = valid[y0:y1, x0:x1]
            if inside.size == 0 or inside.mean() < 0.8:
                continue
            pa, pb = a[y0:y1, x0:x1][inside], warped[y0:y1, x0:x1][inside]
            sa, sb = float(pa.std()), float(pb.std())
            cell = row * GRID + column
            if sa >= TEXTURE_STD and sb >= TEXTURE_STD:
                ncc = float(((pa - pa.mean()) * (pb - pb.mean())).mean()) / (sa * sb)
                states[cell] = CELL_AGREE if ncc > AGREE_NCC else CELL_DISAGREE
            means.append((cell, float(pa.mean()), float(pb.mean()), int(states[cell])))
    if means:
        cells = np.array([m[0] for m in means])
        mean_a = np.array([m[1] for m in means])
        mean_b = np.array([m[2] for m in means])
        state = np.array([m[3] for m in means])
        to_a = _gain_offset(mean_b[state == CELL_AGREE], mean_a[state == CELL_AGREE])
        flat = state == CELL_UNKNOWN
        states[cells[flat & (np.abs(mean_a - to_a(mean_b)) > FLAT_DIFF)]] = CELL_DISAGREE
    return states


#: the spread of grey levels the agreeing cells need for a gain to be fitted, and its range
GAIN_SPREAD = 32.0
GAIN_RANGE = (0.5, 2.0)


def _gain_offset(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """y ~ gain * x + offset from the mean grey levels of cells known to show the same
    content (textured and correlated): a brightness or contrast edit of a copy. Fitted only
    from those cells, since a frame and a photo slot alone (two levels) fit any gain; with a
    narrow spread of levels only the offset; with no such cell the identity."""
    if len(x) == 0:
        return lambda values: values
    if len(x) < 3 or float(np.ptp(x)) < GAIN_SPREAD:
        offset = float(np.median(y - x))
        return lambda values: values + offset
    gain, offset = (float(v) for v in np.polyfit(x, y, 1))
    gain = min(max(gain, GAIN_RANGE[0]), GAIN_RANGE[1])
    offset = float(np.median(y - gain * x))
    return lambda values: gain * values + offset


def same_frame(shape_a: tuple[int, ...], shape_b: tuple[int, ...], homography: np.ndarray
               ) -> bool:
    """Whether two images are in the same frame: the same size, and matched by (nearly) the
    identity, so their grids' cells cover the same pixels."""
    if tuple(shape_a) != tuple(shape_b):
        return False
    h = homography / homography[2, 2]
    size = max(shape_a)
    return bool(np.abs(h[:2, :2] - np.eye(2)).max() <= FRAME_LINEAR
                and np.abs(h[:2, 2]).max() <= FRAME_SHIFT * size
                and np.abs(h[2, :2]).max() * size <= FRAME_LINEAR)


def _verify_one(a: LocalFeatures, b_grey: np.ndarray, b: Keypoints, mirrored: bool
                ) -> Evidence:
    cv2 = _cv2()
    if a.direct.descriptors is None or b.descriptors is None \
            or len(a.direct.descriptors) < 5 or len(b.descriptors) < 5:
        return Evidence()
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    pairs = matcher.knnMatch(a.direct.descriptors, b.descriptors, k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < RATIO * n.distance]
    if len(good) < MIN_MATCHES:
        return Evidence()
    source = a.direct.points[[m.queryIdx for m in good]]
    target = b.points[[m.trainIdx for m in good]]
    homography, mask = cv2.findHomography(source, target, cv2.USAC_MAGSAC, RANSAC_PIXELS,
                                          maxIters=RANSAC_ITERATIONS)
    if homography is None or mask is None:
        return Evidence()
    mask = mask.ravel().astype(bool)
    inliers = int(mask.sum())
    linear = homography[:2, :2] / homography[2, 2]
    det = float(np.linalg.det(linear))
    scale = np.sqrt(abs(det)) if det != 0 else 1e-6
    angle = abs(float(np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))))
    if not 1.0 / MAX_SCALE <= scale <= MAX_SCALE:
        return Evidence()
    try:
        states = _agreement(a.grey, b_grey, homography) if inliers >= 8 else None
    except cv2.error:
        states = None
    agree = int((states == CELL_AGREE).sum()) if states is not None else 0
    disagree = int((states == CELL_DISAGREE).sum()) if states is not None else 0
    framed = states is not None and not mirrored and \
        same_frame(a.grey.shape, b_grey.shape, homography)
    return Evidence(inliers=inliers, cover_a=_cover(source[mask], a.grey.shape),
                    cover_b=_cover(target[mask], b_grey.shape), angle=angle,
                    log_scale=abs(float(np.log(max(scale, 1e-6)))), mirrored=mirrored,
                    agree=agree, disagree=disagree,
                    ratio=inliers / max(1, min(len(a.direct.points), len(b.points))),
                    cells=states.tobytes() if framed else None)


def verify(a: LocalFeatures, b: LocalFeatures) -> Evidence:
    """The evidence that `a` and `b` show the same image (best of direct and mirrored)."""
    best = _verify_one(a, b.grey, b.direct, mirrored=False)
    if best.inliers < MIRROR_BELOW:
        flipped = _verify_one(a, np.ascontiguousarray(b.grey[:, ::-1]), b.mirrored,
                              mirrored=True)
        if flipped.inliers > best.inliers:
            best = flipped
    return best


#: memory for decoded features of images waiting for their next pair (~0.5 MB per image)
FEATURE_CACHE_BYTES = 768 * 1024 * 1024


class FeatureCache:
    """Features of the images of a run, extracted once while memory lasts (the least
    recently used are dropped beyond `budget` bytes, and extracted again if needed)."""

    def __init__(self, paths: list[str], budget: int = FEATURE_CACHE_BYTES) -> None:
        self.paths, self.budget = paths, budget
        self._items: OrderedDict[int, LocalFeatures | None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.extracted = 0

    def get(self, row: int) -> LocalFeatures | None:
        """Features of row `row`, None when its file cannot be read."""
        with self._lock:
            if row in self._items:
                self._items.move_to_end(row)
                return self._items[row]
        try:
            features: LocalFeatures | None = extract_file(self.paths[row])
        except (ImageReadError, OSError) as error:
            log.debug("no local features for %s: %s", self.paths[row], error)
            features = None
        with self._lock:
            self.extracted += 1
            if row not in self._items:
                self._items[row] = features
                self._bytes += features.nbytes if features is not None else 0
                while self._bytes > self.budget and len(self._items) > 1:
                    _, dropped = self._items.popitem(last=False)
                    self._bytes -= dropped.nbytes if dropped is not None else 0
            return self._items[row]


def verify_pairs(paths: list[str], i: np.ndarray, j: np.ndarray, *,
                 workers: int | None = None,
                 on_progress: Callable[[int], None] | None = None) -> list[Evidence]:
    """Evidence for each pair (paths[i[k]], paths[j[k]]), in order, on `workers` threads
    (OpenCV releases the GIL). Pairs are visited by first row, so each image's features are
    mostly extracted once."""
    workers = workers or available_cpus()
    cache = FeatureCache(paths)
    order = np.lexsort((j, i))
    out: list[Evidence] = [Evidence()] * len(i)

    def one(k: int) -> None:
        a, b = cache.get(int(i[k])), cache.get(int(j[k]))
        if a is not None and b is not None:
            out[k] = verify(a, b)

    chunk = 64
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            rows = np.unique(np.concatenate([i[part], j[part]])).tolist()
            list(pool.map(cache.get, rows))  # each image extracted by one thread
            list(pool.map(one, part.tolist()))
            if on_progress is not None:
                on_progress(min(chunk, len(order) - start))
    log.info("verified %d pairs (%d feature extractions)", len(i), cache.extracted)
    return out

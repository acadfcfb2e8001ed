"""The IN-aug surrogate retrieval set (paper section 4.2), built from any image folder.

The paper picks 2 images per class of ImageNet train and makes 5 "full"-augmented copies of
each; every copy queries all copies and the score is the mean number of its own group among
the top 5 (the query itself included, so 1-5). It is the set p* is tuned on.

Decisions (so that any folder works and the numbers are reproducible):

* Sources. An ImageFolder layout (``root/<class>/<image>``, or ``root/train/<class>/...``,
  no loose image at the top) gives ``per_class`` picks per class, the classes (when ``k``
  limits them) and the images of each class chosen by the seed. Any other folder is "flat":
  every image below it (recursively, hidden names skipped, sorted by relative path) is a
  candidate and ``k`` of them are chosen by the seed. Only the originals are chosen; they are
  never in the set themselves.
* Copies. Copy j of source i is ``augmented_copy(image, copy_size, seed=h(seed, rel, j))``,
  rel the source's path relative to the root: a source gets the same copies whatever ``k`` or
  the other files are, so caches stay valid when a set grows.
* Copy size: ``copy_size_for(s*)``, the size the normal s* pipeline resizes to before any
  crop: s* itself for s* > 224 (largest side to s*: a no-op on the square copy), and the
  shorter-side size round(s* * 256 / 224) for s* <= 224 (256 at 224), which the pipeline then
  centre-crops to s* exactly as for any image. The copy is therefore embedded by the very same
  pipeline as a user's image and never resampled twice; p* is tuned at the scale objects have
  at s*, which is the point of tuning it per resolution.
* Descriptors for the score are whatever the caller passes (tune-p uses l2n(g): a whitening is
  fitted at one p*, so it cannot judge other exponents fairly).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mgdedup.errors import MgdedupError
from mgdedup.evaluation.datasets import IMAGE_SUFFIXES
from mgdedup.evaluation.metrics import holidays_map, micro_ap
from mgdedup.imaging.augment import augmented_copy
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.transforms import CROP_RESOLUTION_MAX, resize_for_resolution, to_tensor

log = logging.getLogger(__name__)

COPIES = 5  # augmented copies per source image (paper)
DEFAULT_K = 2000  # source images (paper: 2 per class of the 1000 ImageNet classes)
DEFAULT_PER_CLASS = 2
LAYOUTS = ("auto", "flat", "classes")


def copy_size_for(resolution: int) -> int:
    """Side of the square augmented copy made for test resolution s* (module docstring)."""
    resolution = int(resolution)
    if resolution <= CROP_RESOLUTION_MAX:
        return round(resolution * 256 / 224)
    return resolution


def copy_seed(seed: int, rel: str, j: int) -> int:
    """Seed of copy j of the source at relative path `rel` (63 bits, from blake2b)."""
    digest = hashlib.blake2b(f"{int(seed)}:{rel}:{int(j)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class InaugSet:
    """k source images x COPIES copies; row r of the set is copy r % COPIES of source
    r // COPIES."""

    root: Path
    sources: list[Path]  # absolute, in set order
    seed: int
    copies: int = COPIES

    def __len__(self) -> int:
        return len(self.sources) * self.copies

    @property
    def groups(self) -> np.ndarray:
        """(k * copies,) source index of each row."""
        return np.repeat(np.arange(len(self.sources)), self.copies)

    def rel(self, i: int) -> str:
        return self.sources[i].relative_to(self.root).as_posix()

    def row_keys(self, resolution: int) -> list[str]:
        """A name per row that identifies the copy's pixels (cache key, relative path)."""
        size = copy_size_for(resolution)
        return [f"{self.rel(i)}#inaug-{size}-{self.seed}-{j}"
                for i in range(len(self.sources)) for j in range(self.copies)]

    def make_copies(self, i: int, resolution: int) -> list[Image.Image]:
        """The copies of source i for s* (ImageReadError if the source cannot be read)."""
        image, _ = open_rgb(self.sources[i], None)
        size = copy_size_for(resolution)
        rel = self.rel(i)
        return [augmented_copy(image, size, copy_seed(self.seed, rel, j))
                for j in range(self.copies)]

    def write_copies(self, folder: Path, resolution: int) -> list[Path]:
        """Save every copy as PNG (lossless: the files embed exactly as the in-memory copies);
        returns the files in row order, named ``SSSSS_J.png``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(len(self.sources)):
            for j, copy in enumerate(self.make_copies(i, resolution)):
                path = folder / f"{i:05d}_{j}.png"
                copy.save(path)
                paths.append(path)
        return paths


class InaugTensors(Dataset):
    """Source i -> its copies as (3, H, W) tensors ready for the trunk at s* (one per item so
    DataLoader workers overlap the decoding and augmentation with the forward pass)."""

    def __init__(self, inaug: InaugSet, resolution: int, indices: list[int] | None = None
                 ) -> None:
        self.inaug = inaug
        self.resolution = int(resolution)
        self.indices = list(range(len(inaug.sources))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[int, list[torch.Tensor]]:
        i = self.indices[item]
        copies = self.inaug.make_copies(i, self.resolution)
        return i, [to_tensor(resize_for_resolution(c, self.resolution)) for c in copies]


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).as_posix())


def _class_folders(root: Path) -> list[Path] | None:
    """The class folders if `root` is in ImageFolder layout (no loose image), else None."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return None
    classes = sorted((p for p in entries if p.is_dir() and _images_in(p, False)),
                     key=lambda p: p.name)
    return classes or None


def select_sources(root: Path | str, k: int | None = DEFAULT_K, seed: int = 0, *,
                   layout: str = "auto", per_class: int = DEFAULT_PER_CLASS,
                   exclude: tuple[str, ...] = ()) -> tuple[Path, list[Path]]:
    """(root actually used, chosen source images): see the module docstring.

    `exclude`: folder or file names; a file with such a name anywhere in its relative path is
    never chosen (e.g. material reserved for an independent evaluation).
    """
    root = Path(root)
    if not root.is_dir():
        raise MgdedupError(f"{root} is not a folder; expected a folder of images "
                           "(or root/<class>/<image>)")
    if layout not in LAYOUTS:
        raise MgdedupError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if k is not None and k < 2:
        raise MgdedupError(f"IN-aug needs at least 2 source images, got k={k}")
    if per_class < 1:
        raise MgdedupError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)

    def allowed(path: Path) -> bool:
        return not any(part in exclude for part in path.relative_to(root).parts)

    classes = None
    if layout in ("auto", "classes"):
        base = root / "train" if (root / "train").is_dir() and _class_folders(root / "train") \
            else root
        classes = _class_folders(base)
        if classes is not None:
            classes = [c for c in classes if allowed(c)]
        if classes is None and layout == "classes":
            raise MgdedupError(f"{root} is not in ImageFolder layout; expected "
                               "root/<class>/<image> (or root/train/<class>/<image>)")
        if classes is not None:
            root = base
    if classes:
        wanted = len(classes) if k is None else -(-k // per_class)
        chosen_classes = sorted(rng.permutation(len(classes))[:wanted])
        sources = []
        for c in chosen_classes:
            images = [p for p in _images_in(classes[c], False) if allowed(p)]
            picks = sorted(rng.permutation(len(images))[:per_class])
            sources += [images[i] for i in picks]
        if k is not None:
            sources = sources[:k]
    else:
        images = [p for p in _images_in(root, True) if allowed(p)]
        count = len(images) if k is None else min(k, len(images))
        sources = [images[i] for i in sorted(rng.permutation(len(images))[:count])]
    if len(sources) < 2:
        raise MgdedupError(f"{root}: {len(sources)} usable image(s), IN-aug needs at least 2")
    return root, sources


def build_inaug(root: Path | str, k: int | None = DEFAULT_K, seed: int = 0, *,
                layout: str = "auto", per_class: int = DEFAULT_PER_CLASS,
                exclude: tuple[str, ...] = ()) -> InaugSet:
    """An IN-aug set from a folder (nothing is decoded yet; copies are made on demand)."""
    base, sources = select_sources(root, k, seed, layout=layout, per_class=per_class,
                                   exclude=exclude)
    return InaugSet(base.resolve(), [p.resolve() for p in sources], int(seed))


def readable(inaug: InaugSet) -> InaugSet:
    """The set without sources that cannot be decoded (logged), so groups stay complete."""
    keep = []
    for path in inaug.sources:
        try:
            open_rgb(path, (1, 1))
            keep.append(path)
        except ImageReadError as error:
            log.warning("IN-aug: skipping %s (%s)", path, error)
    return InaugSet(inaug.root, keep, inaug.seed, inaug.copies)


def group_topk_score(similarity: np.ndarray, groups: np.ndarray, k: int = COPIES) -> float:
    """UKB-style score: mean number of same-group rows among the top k of each row, the query
    included (not excluded); ties broken by column index. IN-aug: k = 5, range 1-5."""
    groups = np.asarray(groups).ravel()
    similarity = np.asarray(similarity)
    if similarity.shape != (len(groups), len(groups)):
        raise ValueError(f"similarity must be {len(groups)} x {len(groups)}, "
                         f"got {similarity.shape}")
    counts = []
    for start in range(0, len(groups), 256):
        rows = slice(start, start + 256)
        top = np.argsort(-similarity[rows], axis=1, kind="stable")[:, :k]
        counts.append((groups[top] == groups[rows][:, None]).sum(axis=1))
    return float(np.concatenate(counts).mean()) if counts else 0.0


def inaug_metrics(descriptors: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Score out of 5, mAP (every row a query, itself excluded, relevant = its group's other
    copies) and micro-AP (all unordered pairs ranked together by cosine, positive = same
    group) of L2-normalised descriptors (N, D)."""
    x = np.asarray(descriptors, dtype=np.float32)
    groups = np.asarray(groups).ravel()
    similarity = x @ x.T
    upper = np.triu_indices(len(x), k=1)
    same = groups[upper[0]] == groups[upper[1]]
    return {
        "score": group_topk_score(similarity, groups, COPIES),
        "map": holidays_map(similarity, np.arange(len(x)), groups),
        "micro_ap": micro_ap(similarity[upper], same),
    }

"""Training data: ImageNet-layout folders, unlabelled photo folders, and RA batches of them.

Every sample a batch asks for is an (index, augmentation seed) pair: the seed is a hash of
(run seed, epoch, iteration, rank, position in the batch), and the augmentation of that sample
runs under a torch RNG seeded with it. So the m copies of one image in a repeated-augmentation
group get independent augmentations, and a batch's pixels depend neither on how many DataLoader
workers decode it nor on whether the run was interrupted and resumed: resuming is exact.

A file that cannot be decoded never stops a run: the sample is replaced by the next readable
file of the dataset (deterministically), and the file is reported once in the log.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from mgdedup.cpus import die_with_parent
from mgdedup.errors import MgdedupError
from mgdedup.imaging.augment import FullAugmentation
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.scan import IMAGE_EXTENSIONS, scan_images
from mgdedup.imaging.transforms import (
    CROP_RESOLUTION_MAX,
    crop_offset,
    load_for_embedding,
    resize_for_resolution,
    to_tensor,
)
from mgdedup.training.sampler import RepeatedAugmentationSampler

log = logging.getLogger(__name__)

#: ImageNet synset ids ("n01440764"): a folder of exactly these gets the readable class names
WNID = re.compile(r"^n\d{8}$")
#: decode JPEGs (DCT draft) at no less than this multiple of the training crop: crops of 8 % of
#: the area are still upsampled from real pixels, but a 15 MP photo is not decoded in full
DECODE_MARGIN = 2


# --- augmentations -----------------------------------------------------------------------
class AutoAugmentation(FullAugmentation):
    """`--augment autoaugment`: crop and flip as "full", torchvision's ImageNet AutoAugment
    policy instead of colour jitter, then PCA lighting (the reference's "3BAA" recipe)."""

    def __init__(self, size: int = 224) -> None:
        from torchvision.transforms import v2

        super().__init__(size, colour=v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))


def build_augmentation(name: str, size: int) -> nn.Module:
    if name == "full":
        return FullAugmentation(size)
    if name == "autoaugment":
        return AutoAugmentation(size)
    raise MgdedupError(f"unknown augmentation '{name}' (known: full, autoaugment)")


# --- file lists ------------------------------------------------------------------------------
@dataclass
class FileList:
    """Image paths with a class label each (-1 when unlabelled) and the class names."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]


def _list_class_folder(folder: Path) -> list[Path]:
    """Image files below one class folder by extension (as torchvision's ImageFolder: sniffing
    1.3M ImageNet files would take longer than an epoch), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in sorted(filenames)
                     if Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def imagefolder_split(root: Path, split: str, classes: list[str] | None = None) -> FileList:
    """ROOT/SPLIT/<class>/* as a labelled file list; one-line MgdedupError on a wrong layout.

    `classes` (the train split's) fixes the label order of the val split: a val class folder
    unknown to train is an error, a train class missing from val is fine.
    """
    folder = root / split
    layout = f"expected ROOT/{split}/<class>/<image> (ImageNet layout)"
    if not folder.is_dir():
        raise MgdedupError(f"{root} has no {split}/ folder: {layout}")
    subdirs = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not subdirs:
        loose = any(entry.is_file() for entry in os.scandir(folder))
        hint = " (its images are not sorted into class folders)" if loose else ""
        raise MgdedupError(f"{folder} has no class folders{hint}: {layout}")
    if classes is None:
        classes = subdirs
    else:
        unknown = sorted(set(subdirs) - set(classes))
        if unknown:
            raise MgdedupError(f"{folder} has class folders missing from train/: "
                               f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for name in subdirs:
        files = _list_class_folder(folder / name)
        if not files and split == "train":
            raise MgdedupError(f"class folder {folder / name} holds no images: {layout}")
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    if not paths:
        raise MgdedupError(f"{folder} holds no images: {layout}")
    return FileList(paths, labels, list(classes))


def unlabelled_files(root: Path) -> FileList:
    """Every image below root, recognised by content (mgdedup.imaging.scan); problems are logged."""
    files, problems = scan_images([root])
    for path, reason in problems[:20]:
        log.warning("skipping %s: %s", path, reason)
    if len(problems) > 20:
        log.warning("skipping %d more files that are not readable images", len(problems) - 20)
    if len(files) < 2:
        raise MgdedupError(f"{root} holds {len(files)} readable image(s): fine-tuning needs "
                           f"at least 2")
    paths = [f.path for f in files]
    return FileList(paths, [-1] * len(paths), [])


def class_names_for(classes: list[str]) -> list[str]:
    """Readable names: ImageNet's when the folders are its 1000 synsets, else the folder names."""
    if len(classes) == 1000 and all(WNID.match(c) for c in classes):
        from mgdedup.model.model_file import imagenet_class_names

        return imagenet_class_names()
    return list(classes)


# --- datasets --------------------------------------------------------------------------------
def _decode_min_size(resolution: int) -> Callable[[tuple[int, int]], tuple[int, int]]:
    side = resolution * DECODE_MARGIN

    def min_size(size: tuple[int, int]) -> tuple[int, int]:
        return (min(side, size[0]), min(side, size[1]))

    return min_size


class AugmentedImages(Dataset):
    """dataset[(index, seed)] -> (augmented image (3, s, s) in [0, 1], label, index).

    The augmentation runs under the torch RNG seeded with `seed` (and the global RNG is
    restored after), so a sample is a pure function of (index, seed). dataset[(index, seed,
    True)] is the image unaugmented, as `index` sees it (see `original_view`).
    """

    def __init__(self, files: FileList, augmentation: nn.Module, resolution: int) -> None:
        self.files = files
        self.augmentation = augmentation
        self.resolution = int(resolution)
        self.min_size = _decode_min_size(resolution)
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.files.paths)

    def load(self, index: int) -> Image.Image:
        """The image at `index`, or the next readable one when it cannot be decoded."""
        n = len(self.files.paths)
        for step in range(n):
            position = (index + step) % n
            try:
                image, _ = open_rgb(self.files.paths[position], self.min_size)
                return image
            except ImageReadError as error:
                if position not in self._reported:
                    self._reported.add(position)
                    log.warning("skipping %s: %s", self.files.paths[position], error.reason)
        raise MgdedupError("no image of the training set can be decoded")

    def __getitem__(self, item: tuple[int, ...]) -> tuple[Tensor, int, int]:
        index, seed, *view = item
        image = self.load(index)
        if view and view[0]:
            return original_view(image, self.resolution), self.files.labels[index], index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.augmentation(image)
        return pixels, self.files.labels[index], index


def original_view(image: Image.Image, resolution: int) -> Tensor:
    """(3, s, s) in [0, 1]: the test protocol's view of `image` at s* = s <= 224 (resize to
    256/224 s, centre crop s); above 224, where `index` keeps the whole image, the shorter
    side resized to s and a centred s x s crop, since a batch needs square images."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if resolution > CROP_RESOLUTION_MAX:
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)),
                max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = crop_offset(size, resolution)
        image = image.crop((left, top, left + resolution, top + resolution))
    else:
        image = resize_for_resolution(image, resolution)
    return to_tensor(image)


class EvalImages(Dataset):
    """dataset[i] -> (image at the test protocol for `resolution`, label); None if unreadable."""

    def __init__(self, files: FileList, resolution: int) -> None:
        self.files = files
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        try:
            pixels, _ = load_for_embedding(self.files.paths[index], self.resolution)
        except ImageReadError as error:
            log.warning("skipping %s: %s", self.files.paths[index], error.reason)
            return None, self.files.labels[index]
        return pixels, self.files.labels[index]


def collate_eval(batch: list[tuple[Tensor | None, int]]) -> tuple[Tensor, Tensor]:
    kept = [(x, y) for x, y in batch if x is not None]
    if not kept:
        return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept])


# --- batches ---------------------------------------------------------------------------------
def augmentation_seed(seed: int, epoch: int, iteration: int, rank: int, position: int) -> int:
    """A well-mixed 63-bit seed from the coordinates of one sample of one batch."""
    state = np.random.SeedSequence([seed, epoch, iteration, rank, position]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class SeededBatches(Sampler[list[tuple[int, ...]]]):
    """The RA batch sampler's index lists, each index paired with its augmentation seed.

    With `original_views` the first of the m copies of each image (positions 0, m, 2m, ...:
    the sampler repeats an image consecutively) is (index, seed, True), the unaugmented view:
    the margin loss then also pulls augmented copies towards the image as `index` sees it.
    """

    def __init__(self, sampler: RepeatedAugmentationSampler, seed: int,
                 original_views: bool = False) -> None:
        super().__init__()
        self.sampler = sampler
        self.seed = seed
        self.original_views = original_views

    def __len__(self) -> int:
        return self.sampler.num_remaining

    def marks(self, position: int) -> bool:
        """Whether batch position `position` is an original view (never with m = 1: an image
        alone in its group stays augmented)."""
        repeats = self.sampler.repeats
        return self.original_views and repeats > 1 and position % repeats == 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        for iteration, batch in enumerate(iter(s), start=s.start_iteration):
            yield [(index, augmentation_seed(self.seed, s.epoch, iteration, s.rank, position))
                   + ((True,) if self.marks(position) else ())
                   for position, index in enumerate(batch)]


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and `random` follow the worker's torch seed (which the
    DataLoader derives from the main RNG), so library code using them is not cloned across
    workers. The augmentations themselves are seeded per sample (see SeededBatches)."""
    die_with_parent()
    seed = torch.initial_seed() % (2 ** 32)
    np.random.seed(seed)
    random.seed(seed)
    del worker_id

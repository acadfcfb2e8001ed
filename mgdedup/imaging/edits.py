"""Edited copies of an image: the one definition of "a copy" that thresholds, calibration,
training validation and the benchmarks share.

Two kinds, both seeded so that a copy set can be made again bit for bit:

- the planted edits (`EDITS`): a crop to 80 %, JPEG quality 30, a third of the size, a
  mirror image, 30 % brighter: what users' copies most often are;
- full-augmentation copies (`mgdedup.imaging.augment.augmented_copy`): the paper's
  RandomResizedCrop + flip + colour jitter + lighting, much harder (crops down to 8 % of the
  area).

`make_copies` gives the planted edits then `aug_copies` augmented copies of one image;
`write_copies` saves them for the images of a list, as JPEG quality 92 (what copies met in
collections look like), and returns which original each copy belongs to.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mgdedup.imaging.reading import ImageReadError, open_rgb

#: JPEG quality copies are saved at
COPY_QUALITY = 92


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    keep = 0.8
    left = int(rng.integers(0, int(width * (1 - keep)) + 1))
    top = int(rng.integers(0, int(height * (1 - keep)) + 1))
    return image.crop((left, top, left + int(width * keep), top + int(height * keep)))


def _jpeg30(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=30)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _third(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.resize((max(1, image.width // 3), max(1, image.height // 3)), Image.BILINEAR)


def _mirror(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(image)


def _brighter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.3)


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": _crop, "jpeg30": _jpeg30, "third": _third, "mirror": _mirror, "bright": _brighter,
}


Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def shrunk(image: Image.Image, resolution: int) -> Image.Image:
    """At most 3 x s* (and 3 x 224) on the long side: a 1/3 copy still has s* pixels, and the
    edits of a 12 MP photo stay fast."""
    limit = 3 * max(int(resolution), 224)
    if max(image.size) > limit:
        image = image.copy()
        image.thumbnail((limit, limit), Image.Resampling.LANCZOS)
    return image


#: augmented copies per image that get distinct seeds
MAX_AUG_COPIES = 64


def augmented_seed(seed: int, position: int, copy: int) -> int:
    """Seed of augmented copy `copy` (< MAX_AUG_COPIES) of the image at `position` of a set
    made with `seed`."""
    return seed * 1_000_003 + position * 64 + copy


def make_copies(image: Image.Image, rng: np.random.Generator, *, resolution: int,
                aug_copies: int = 0, seed: int = 0, position: int = 0
                ) -> list[tuple[str, Image.Image]]:
    """(name, copy) for every planted edit (drawing from `rng`), then `aug_copies`
    full-augmentation copies of size s* x s* ("aug0", "aug1", ...) seeded by
    `augmented_seed(seed, position, c)`. The image is `shrunk` first."""
    from mgdedup.imaging.augment import augmented_copy  # torch: only when copies are made

    if not 0 <= aug_copies <= MAX_AUG_COPIES:
        raise ValueError(f"aug_copies must be between 0 and {MAX_AUG_COPIES}")
    image = shrunk(image.convert("RGB"), resolution)
    made = [(name, edit(image, rng).convert("RGB")) for name, edit in EDITS.items()]
    made += [(f"aug{c}", augmented_copy(image, resolution, augmented_seed(seed, position, c)))
             for c in range(aug_copies)]
    return made


def write_copies(paths: Sequence[Path], folder: Path, *, resolution: int, aug_copies: int = 0,
                 seed: int = 0) -> tuple[list[Path], list[int], list[tuple[Path, str]]]:
    """`make_copies` of each readable image of `paths`, saved in `folder` as
    ``PPPPP_NAME.jpg``; returns (copies, position in `paths` of each copy's original,
    (path, reason) of the images that could not be read). One image in memory at a time."""
    rng = np.random.default_rng(seed)
    copies: list[Path] = []
    family: list[int] = []
    skipped: list[tuple[Path, str]] = []
    for position, path in enumerate(paths):
        try:
            image, _ = open_rgb(path, None)
        except ImageReadError as error:
            skipped.append((Path(path), error.reason))
            continue
        except OSError as error:
            skipped.append((Path(path), f"cannot read file: {error.strerror}"))
            continue
        for name, copy in make_copies(image, rng, resolution=resolution,
                                      aug_copies=aug_copies, seed=seed, position=position):
            target = Path(folder) / f"{position:05d}_{name}.jpg"
            copy.save(target, quality=COPY_QUALITY)
            copies.append(target)
            family.append(position)
    return copies, family, skipped

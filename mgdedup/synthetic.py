"""Generated images with planted copies: the demo's sample and the tests' fixtures.

Each base image is a random scene (smooth colour field, shapes, a texture patch), so unrelated
images differ in layout, colour and texture; each planted copy is one edit users meet in real
collections: a crop, heavy JPEG compression, a downscale, a mirror image, a brightness change.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps


def random_scene(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A colourful scene with structure at several scales."""
    width, height = size
    # smooth colour field: a small random grid upsampled bicubically
    grid = rng.integers(0, 256, size=(rng.integers(2, 5), rng.integers(2, 5), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        w, h = int(rng.integers(width // 12, width // 2)), int(rng.integers(height // 12, height // 2))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 2:
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(3, 15)))
    # a texture patch: stripes or checks of a random period
    pixels = np.asarray(image).copy()
    px, py = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    pw, ph = int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2))
    period = int(rng.integers(4, 24))
    yy, xx = np.mgrid[0:ph, 0:pw]
    if rng.integers(0, 2):
        mask = ((xx // period + yy // period) % 2).astype(bool)
    else:
        mask = ((xx + yy) // period % 2).astype(bool)
    patch = pixels[py:py + ph, px:px + pw]
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    patch[mask[: patch.shape[0], : patch.shape[1]]] = colour
    noise = rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


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


@dataclass
class PlantedCollection:
    folder: Path
    originals: list[Path]
    copies: list[tuple[Path, Path, str]]  # (original, copy, edit name)


def make_collection(folder: Path, originals: int = 12, copies_per_edit: int = 1,
                    seed: int = 0, size: tuple[int, int] = (640, 480)) -> PlantedCollection:
    """Write `originals` scenes and, for each edit, copies of some of them below `folder`.

    Copies go to a separate sub-folder so paths do not give the answer away.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    (folder / "downloads").mkdir(parents=True, exist_ok=True)
    originals_paths: list[Path] = []
    images: list[Image.Image] = []
    for number in range(originals):
        image = random_scene(rng, size)
        path = folder / "photos" / f"IMG_{number:04d}.png"
        image.save(path)
        originals_paths.append(path)
        images.append(image)
    copies: list[tuple[Path, Path, str]] = []
    source = 0
    for name, edit in EDITS.items():
        for _ in range(copies_per_edit):
            original = images[source % originals]
            path = folder / "downloads" / f"copy_{len(copies):03d}.jpg"
            edit(original, rng).save(path, quality=92)
            copies.append((originals_paths[source % originals], path, name))
            source += 1
    return PlantedCollection(folder, originals_paths, copies)

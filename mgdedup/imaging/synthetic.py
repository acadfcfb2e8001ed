"""Generated images with planted copies: the demo's sample and the tests' fixtures.

Each base image is a random scene (smooth colour field, shapes, a texture patch), so unrelated
images differ in layout, colour and texture; each planted copy is one of the planted edits of
`mgdedup.imaging.edits` (crop, heavy JPEG compression, a downscale, a mirror image, a
brightness change).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mgdedup.imaging.edits import EDITS


def random_scene(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Half shape compositions, half textured colour fields: two kinds of content that an
    ImageNet CNN finds alike within a kind, which makes copy detection on them non-trivial."""
    if rng.random() < 0.5:
        return textured_field(rng, size)
    return shape_composition(rng, size)


def fractal_noise(rng: np.random.Generator, height: int, width: int, octaves: int,
                  persistence: float) -> np.ndarray:
    """(H, W) in [0, 1]: bicubically upsampled random grids summed over octaves."""
    out = np.zeros((height, width), np.float32)
    amplitude, total = 1.0, 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1)
        grid = rng.random((cells + 1, int(cells * width / height) + 2)).astype(np.float32)
        layer = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
        out += amplitude * layer
        total += amplitude
        amplitude *= persistence
    out /= total
    return (out - out.min()) / (out.max() - out.min() + 1e-9)


def textured_field(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Multi-octave noise through a random palette (plain, banded, posterised or modulated)."""
    width, height = size
    style = int(rng.integers(0, 4))
    field = fractal_noise(rng, height, width, int(rng.integers(3, 8)),
                          float(rng.uniform(0.35, 0.8)))
    stops_count = int(rng.integers(2, 6))
    stops = np.sort(rng.random(stops_count))
    stops[0], stops[-1] = 0.0, 1.0
    colours = rng.integers(0, 256, (stops_count, 3)).astype(np.float32)
    if style == 1:
        field = (np.sin(field * rng.uniform(6, 30)) + 1) / 2  # contour bands
    elif style == 2:
        field = np.floor(field * rng.integers(3, 9)) / 8  # posterised
    pixels = np.stack([np.interp(field, stops, colours[:, c]) for c in range(3)], axis=-1)
    if style == 3:
        yy, xx = np.mgrid[0:height, 0:width]
        frequency, angle = rng.uniform(0.01, 0.2), rng.uniform(0, np.pi)
        wave = np.sin(frequency * (xx * np.cos(angle) + yy * np.sin(angle)))
        pixels *= (0.6 + 0.4 * wave)[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 8))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        extent = int(rng.integers(10, width // 3))
        box = (x0, y0, x0 + extent, y0 + int(extent * rng.uniform(0.3, 1.5)))
        (draw.ellipse if rng.integers(0, 2) else draw.rectangle)(box, fill=colour)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2))))
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, float(rng.uniform(2, 10)),
                                                              (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def shape_composition(rng: np.random.Generator, size: tuple[int, int] = (640, 480)
                      ) -> Image.Image:
    """A colourful scene of shapes and a texture patch over a smooth colour field."""
    width, height = size
    # smooth colour field: a small random grid upsampled bicubically
    grid = rng.integers(0, 256, size=(rng.integers(2, 5), rng.integers(2, 5), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        w = int(rng.integers(width // 12, width // 2))
        h = int(rng.integers(height // 12, height // 2))
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


@dataclass
class PlantedCollection:
    folder: Path
    originals: list[Path]
    copies: list[tuple[Path, Path, str]]  # (original, copy, edit name)


def make_collection(folder: Path, originals: int = 12, copies_per_edit: int = 1,
                    seed: int = 0, size: tuple[int, int] = (1536, 1152)) -> PlantedCollection:
    """Write `originals` scenes and, for each edit, copies of some of them below `folder`.

    Copies go to a separate sub-folder so paths do not give the answer away. The default size
    is a small photo's: a 1/3 copy then still has about s* = 500 pixels, as in real
    collections (a 1/3 copy of a 640 px image would be upscaled 2.3x, mostly testing blur).
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

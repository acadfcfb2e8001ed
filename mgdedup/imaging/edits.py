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

from mgdedup.imaging.edit_seeds import MAX_AUG_COPIES, augmented_seed  # noqa: F401
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


# --- the copies people make (DISC2021-style), after AugLy -------------------------------------
#: kinds of hard copies: what screenshots, reposts, memes and thumbnails do to an image
HARD_KINDS = ("screenshot", "pasted", "emoji", "text", "stripes", "tiny_jpeg", "pixel_noise",
              "perspective", "pad_rotate", "crop_grey", "rot90", "rot180", "rot270")

_WORDS = ("look", "sale", "wow", "2024", "summer", "repost", "lol", "share", "best day",
          "follow me", "free", "new", "#photo", "omg", "via @friend", "best", "tbt")


def _augly():
    """AugLy (`pip install mgdedup[copies]`): its screenshot templates, emoji and fonts make
    the copies of DISC2021. Imported only where hard copies are made."""
    try:
        import augly.image as augly_image
        import augly.utils as augly_utils
    except ImportError as error:
        raise ImportError("hard copies need AugLy: pip install 'mgdedup[copies]'") from error
    return augly_image, augly_utils


def _perspective(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The image seen from the side: each corner moved by up to 8-18 % of the size (AugLy's
    own perspective_transform needs numpy < 1.24)."""
    width, height = image.size
    sigma = float(rng.uniform(0.08, 0.18))
    corners = np.array([(0, 0), (width, 0), (width, height), (0, height)], np.float64)
    moved = corners + rng.uniform(-sigma, sigma, (4, 2)) * (width, height)
    moved[:, 0] -= moved[:, 0].min()
    moved[:, 1] -= moved[:, 1].min()
    size = (int(np.ceil(moved[:, 0].max())), int(np.ceil(moved[:, 1].max())))
    # coefficients mapping output pixels back onto the input (PIL's convention)
    rows = []
    for (x, y), (u, v) in zip(moved, corners):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coefficients = np.linalg.solve(np.array(rows), corners.reshape(-1))
    return image.transform(size, Image.Transform.PERSPECTIVE, tuple(coefficients),
                           Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    _, utils = _augly()
    fonts = sorted(Path(utils.FONTS_DIR).glob("*.ttf"))
    latin = [f for f in fonts if not any(s in f.name for s in ("Noto", "Dingbats", "Entypo",
                                                              "Mono", "Symbol"))]
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(1, 4))):
        size = max(10, int(out.height * rng.uniform(0.08, 0.16)))
        font = ImageFont.truetype(str(latin[int(rng.integers(len(latin)))]), size)
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 4))))
        position = (int(rng.uniform(0, 0.6) * out.width), int(rng.uniform(0, 0.85) * out.height))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.text(position, words, font=font, fill=colour, stroke_width=max(1, size // 15),
                  stroke_fill=(0, 0, 0) if sum(colour) > 380 else (255, 255, 255))
    return out


def make_hard_copy(image: Image.Image, kind: str, rng: np.random.Generator,
                   backgrounds: Sequence[Image.Image] = ()) -> Image.Image:
    """One copy of `image` of the given kind (`HARD_KINDS`), its parameters drawn from `rng`.
    "pasted" puts the image onto one of `backgrounds` (photos not otherwise used)."""
    augly, utils = _augly()
    image = image.convert("RGB")
    uniform = rng.uniform
    if kind == "screenshot":
        template = "web.png" if rng.random() < 0.5 else "mobile.png"
        return augly.overlay_onto_screenshot(
            image, template_filepath=str(Path(utils.SCREENSHOT_TEMPLATES_DIR) / template),
            template_bboxes_filepath=utils.BBOXES_PATH).convert("RGB")
    if kind == "pasted":
        if not backgrounds:
            raise ValueError("pasted copies need background photos")
        background = backgrounds[int(rng.integers(len(backgrounds)))].convert("RGB")
        return augly.overlay_onto_background_image(
            image, background_image=background, overlay_size=float(uniform(0.35, 0.65)),
            x_pos=float(uniform(0.0, 0.35)), y_pos=float(uniform(0.0, 0.35)),
            scale_bg=True).convert("RGB")
    if kind == "emoji":
        folder = Path(utils.EMOJI_DIR) / "smileys"
        emojis = sorted(folder.glob("*.png"))
        return augly.overlay_emoji(
            image, emoji_path=str(emojis[int(rng.integers(len(emojis)))]),
            emoji_size=float(uniform(0.2, 0.4)), opacity=float(uniform(0.7, 1.0)),
            x_pos=float(uniform(0.0, 0.6)), y_pos=float(uniform(0.0, 0.6))).convert("RGB")
    if kind == "text":
        return _text(image, rng)
    if kind == "stripes":
        return augly.overlay_stripes(
            image, line_width=float(uniform(0.1, 0.35)), line_density=float(uniform(0.3, 0.7)),
            line_angle=float(uniform(-90, 90)), line_opacity=float(uniform(0.5, 1.0)),
            line_color=tuple(int(c) for c in rng.integers(0, 256, 3))).convert("RGB")
    if kind == "tiny_jpeg":
        side = float(uniform(64, 128))
        small = augly.scale(image, factor=min(1.0, side / max(image.size)))
        return augly.encoding_quality(small, quality=int(rng.integers(8, 21))).convert("RGB")
    if kind == "pixel_noise":
        pixelated = augly.pixelization(image, ratio=float(uniform(0.15, 0.35)))
        return augly.random_noise(pixelated, var=float(uniform(0.01, 0.04)),
                                  seed=int(rng.integers(1 << 30))).convert("RGB")
    if kind == "perspective":
        return _perspective(image, rng)
    if kind == "pad_rotate":
        padded = augly.pad(image, w_factor=float(uniform(0.1, 0.3)),
                           h_factor=float(uniform(0.1, 0.3)),
                           color=tuple(int(c) for c in rng.integers(0, 256, 3)))
        angle = float(uniform(10, 35)) * (1 if rng.random() < 0.5 else -1)
        return augly.rotate(padded, degrees=angle).convert("RGB")
    if kind == "crop_grey":
        width, height = float(uniform(0.5, 0.75)), float(uniform(0.5, 0.75))
        x1, y1 = float(uniform(0, 1 - width)), float(uniform(0, 1 - height))
        cropped = augly.crop(image, x1=x1, y1=y1, x2=x1 + width, y2=y1 + height)
        return augly.grayscale(cropped).convert("RGB")
    turns = {"rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
             "rot270": Image.Transpose.ROTATE_270}
    if kind in turns:
        return image.transpose(turns[kind])
    raise ValueError(f"unknown kind of copy {kind!r} (known: {', '.join(HARD_KINDS)})")

"""Test-time preprocessing for a resolution s* (docs/multigrain.md, section 4).

s* <= 224: shorter side to round(s* * 256 / 224) (256 for 224), centre crop s* x s*, as the
torchvision `Resize` + `CenterCrop` evaluation the paper used (same size and crop arithmetic).
s* > 224: largest side to s*, aspect ratio kept, no crop; small images are upscaled too, so
every image is seen at the scale p* was tuned for.

Resampling is Pillow's antialiased bilinear filter (support widened by the downscale factor,
i.e. torchvision's `antialias=True`, and exactly what torchvision's PIL path computes).
`reducing_gap=3.0` first shrinks large full-size decodes (PNG, WebP, ...) by an integer box
filter while keeping at least a 3x bilinear step after it: 4000x3000 -> 500x375 takes 34 ms
instead of 46 ms and differs from the direct resize by 0.19 grey levels on average (max 1);
2.0 would be faster (16 ms) but less exact (0.29, max 2). JPEGs seldom need it: DCT draft
decoding already brings them to within 2x of the target.

No mean/std normalisation here: the model applies its own input scaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mgdedup.imaging.perceptual_hash import UNKNOWN, phash
from mgdedup.imaging.reading import open_rgb

if TYPE_CHECKING:  # PyTorch only for the tensor the trunk takes (`to_tensor`)
    import torch

CROP_RESOLUTION_MAX = 224
"""Resolutions up to this one use the resize-then-centre-crop protocol."""

REDUCING_GAP = 3.0


def decode_size_for(orig_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Upright (w, h) the image is resized to before any crop: decoding at least this large
    (e.g. by JPEG draft) leaves the resize a pure downscale, as a full decode would."""
    width, height = orig_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution <= CROP_RESOLUTION_MAX:
        short = round(resolution * 256 / 224)
        # torchvision.transforms.Resize(int): the long side is truncated, not rounded
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short
    if width >= height:
        return resolution, max(1, round(resolution * height / width))
    return max(1, round(resolution * width / height)), resolution


def resize_for_resolution(img: Image.Image, resolution: int,
                          orig_size: tuple[int, int] | None = None) -> Image.Image:
    """Resize (and for s* <= 224 centre-crop) an RGB image for test resolution s*.

    `orig_size` is the full upright size when `img` was draft-decoded smaller: the output
    size then follows the original aspect ratio exactly, as if the whole image had been
    decoded (draft sizes are rounded up to whole DCT blocks).
    """
    target = decode_size_for(orig_size or img.size, resolution)
    if resolution > CROP_RESOLUTION_MAX:
        if img.size == target:
            return img
        return img.resize(target, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    # Resample only the source region that lands in the crop: the same pixels as resizing
    # everything then cropping (the filter still reads neighbours outside the box), without
    # allocating the full resized image (256 x 2.5M pixels for a 1 x 10000 strip).
    left, top = crop_offset(target, resolution)
    scale_x, scale_y = img.width / target[0], img.height / target[1]
    box = (left * scale_x, top * scale_y,
           (left + resolution) * scale_x, (top + resolution) * scale_y)
    return img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box,
                      reducing_gap=REDUCING_GAP)


def crop_offset(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(left, top) of a centred crop x crop, rounded as torchvision's CenterCrop."""
    return round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 1], contiguous."""
    import torch

    return torch.from_numpy(to_array(img))


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) in [0, 1], C-contiguous: the trunk's input, the
    same float32 values as `to_tensor` (x / 255 is correctly rounded in both)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = np.array(img, dtype=np.uint8)  # (H, W, 3)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


def load_for_embedding(path: str | Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """File -> (3, H, W) tensor for s* and the original upright (w, h); ImageReadError if bad."""
    tensor, orig_size, _ = load_for_index(path, resolution, with_hash=False)
    return tensor, orig_size


def load_for_index(path: str | Path, resolution: int, with_hash: bool = True
                   ) -> tuple[torch.Tensor, tuple[int, int], np.uint64]:
    """What `index` stores of a file besides its descriptor: the (3, H, W) tensor for s*, the
    original upright (w, h) and the perceptual hash of the whole image (before any crop)."""
    import torch

    pixels, orig_size, hashed = load_array(path, resolution, with_hash)
    return torch.from_numpy(pixels), orig_size, hashed


def load_array(path: str | Path, resolution: int, with_hash: bool = True
               ) -> tuple[np.ndarray, tuple[int, int], np.uint64]:
    """`load_for_index` as a numpy array, for the path that runs without PyTorch."""
    img, orig_size = open_rgb(path, lambda size: decode_size_for(size, resolution))
    hashed = phash(img) if with_hash else UNKNOWN
    img = resize_for_resolution(img, resolution, orig_size)
    return to_array(img), orig_size, hashed

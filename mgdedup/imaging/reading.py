"""Reading image files robustly: format by content, EXIF orientation, any mode to RGB.

A collection of photos holds everything: CMYK scans, 16-bit PNGs, palette GIFs with
transparency, truncated downloads, text files named `.jpg`, decompression bombs. Every such
file either decodes to the RGB image a person sees or raises `ImageReadError` with a short
reason that ends up in the index's error list; nothing else escapes for a bad file.

Pillow's own bomb check (`Image.MAX_IMAGE_PIXELS`, error above 2x ~89 MP) runs inside
`Image.open` before a JPEG can be draft-decoded, so this module opens files through the
registered Pillow plugin directly and applies its own limit, `MAX_PIXELS`, to the size that
will actually be allocated. Global Pillow settings (`MAX_IMAGE_PIXELS`,
`LOAD_TRUNCATED_IMAGES`) are never changed.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from mgdedup.errors import MgdedupError
from mgdedup.files.regular import NotRegularFile, open_regular
from mgdedup.imaging.sniffing import (  # noqa: F401 - sniff_format, probe: for callers
    HEAD_BYTES,
    not_image_reason,
    probe,
    sniff_bytes,
    sniff_format,
)

log = logging.getLogger(__name__)

MAX_PIXELS = 200_000_000
"""Largest image (width x height, as decoded) this module allocates; read at call time."""


MinSize = tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]] | None

# sniff name -> Pillow format id of the plugin that decodes it
_PIL_FORMAT = {
    "jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP",
    "ico": "ICO", "cur": "CUR", "ppm": "PPM", "pgm": "PPM", "pbm": "PPM", "pfm": "PPM",
    "jp2": "JPEG2000", "j2k": "JPEG2000", "heic": "HEIF", "heif": "HEIF", "avif": "AVIF",
}
# EXIF orientation -> the transpose that makes the stored pixels upright (as Pillow's ImageOps)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageReadError(MgdedupError):
    """A file that cannot be turned into pixels; `reason` is short and meant for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Decoding


def open_rgb(path: str | Path, min_size: MinSize = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path` to an upright RGB image; also return its original upright (width, height).

    `min_size` lets a JPEG be decoded at 1/2, 1/4 or 1/8 scale by the DCT (`Image.draft`):
    the decoded image keeps both sides >= min_size (or the full size when smaller). It is
    given in the upright orientation, either as (w, h) or as a function of the original
    upright size (the caller rarely knows the size before the header is read). Other formats
    are always fully decoded. The original size is what a user sees, used to prefer the
    larger copy of a duplicate.
    """
    fmt: str | None = None
    try:
        with open_regular(path) as fp:
            head = fp.read(HEAD_BYTES)
            fmt = sniff_bytes(head)
            if fmt is None:
                raise ImageReadError(not_image_reason(path, head))
            im = _open_plugin(fp, str(path), fmt)
            return _decode(im, fmt, min_size)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file disappeared") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except IsADirectoryError:
        raise ImageReadError("is a directory") from None
    except NotRegularFile as error:  # a FIFO, a device: never read, never waited for
        raise ImageReadError(error.strerror or "not a regular file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # raised by Pillow's plugins for sizes only known while reading (GIF frames, tiles)
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageReadError(f"image too large: {found.group(1)} pixels" if found
                             else "image too large") from None
    except MemoryError:
        raise ImageReadError("image too large to decode in memory") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
            KeyError, ZeroDivisionError, RuntimeError) as error:
        # Pillow's plugins raise all of these on damaged files.
        log.debug("decoding %s failed", path, exc_info=True)
        raise ImageReadError(_decode_reason(fmt, error)) from None


def _open_plugin(fp: IO[bytes], filename: str, fmt: str) -> Image.Image:
    """Header-only open by the plugin for `fmt` (what `Image.open` does, minus its bomb check)."""
    pil_format = _PIL_FORMAT[fmt]
    if pil_format not in Image.OPEN:
        Image.init()
    if pil_format not in Image.OPEN and fmt in ("heic", "heif", "avif"):
        _register_heif()
    if pil_format not in Image.OPEN:
        raise ImageReadError(f"unsupported format {fmt} (install mgdedup[heif])"
                             if fmt in ("heic", "heif", "avif")
                             else f"unsupported format {fmt} (Pillow built without it)")
    factory, _accept = Image.OPEN[pil_format]
    fp.seek(0)
    return factory(fp, filename)


def _register_heif() -> None:
    """Teach Pillow HEIC (and AVIF where Pillow lacks it) when pillow-heif is installed."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()
    if "AVIF" not in Image.OPEN and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()


def _decode(im: Image.Image, fmt: str, min_size: MinSize) -> tuple[Image.Image, tuple[int, int]]:
    stored = im.size
    if stored[0] < 1 or stored[1] < 1:
        raise ImageReadError(f"corrupt {fmt.upper()} (size {stored[0]}x{stored[1]})")
    is_jpeg = fmt == "jpeg"
    # JPEG EXIF sits in the header; other formats may keep it after the pixels (PNG eXIf).
    orientation = _orientation(im) if is_jpeg else 1
    if is_jpeg and min_size is not None:
        upright = _swap(stored, orientation)
        needed = min_size(upright) if callable(min_size) else min_size
        needed = _swap((max(1, int(needed[0])), max(1, int(needed[1]))), orientation)
        im.draft("RGB", needed)
        if im.size != stored:
            log.debug("draft-decoding %dx%d JPEG at %dx%d", *stored, *im.size)
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(f"image too large: {stored[0]}x{stored[1]} pixels")
    im.load()  # truncated data raises here: LOAD_TRUNCATED_IMAGES stays False
    if not is_jpeg:
        orientation = _orientation(im)
    upright_size = _swap(stored, orientation)
    rgb = to_rgb(im)
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return rgb, upright_size


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block must not cost the image
        log.debug("unreadable EXIF", exc_info=True)
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _swap(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """Orientations 5-8 store the image rotated by 90 degrees: width and height trade places."""
    return (size[1], size[0]) if orientation >= 5 else size


def _decode_reason(fmt: str | None, error: BaseException) -> str:
    name = (fmt or "image").upper()
    message = str(error).strip() or type(error).__name__
    lowered = message.lower()
    if isinstance(error, EOFError) or "truncated" in lowered or "premature end" in lowered:
        return f"truncated {name}"
    if len(message) > 80:
        message = message[:77] + "..."
    return f"corrupt {name} ({message})"


# ---------------------------------------------------------------------------------------------
# Pixel modes


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB as a person would see it.

    Transparent pixels become white (their stored colour is often black or garbage), or black
    when what is visible is itself light (a white logo, a light wallpaper overlay: on white
    paper it would vanish, and every such image would look blank and alike); 16/32-bit and
    float greyscale are scaled by their real range instead of clipped at 255.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        try:
            return _flattened(im.convert("RGBA"))
        except ValueError:  # a mode Pillow cannot combine with its transparency key
            log.debug("ignoring transparency of a %s image", mode)
    if mode == "LAB":
        return _lab_to_rgb(im)
    try:
        return im.convert("RGB")
    except ValueError as error:
        raise ImageReadError(f"unsupported pixel mode {mode}") from error


#: mean grey level of the visible pixels above which they are flattened onto black
LIGHT_CONTENT = 192.0
_JUDGE_SIDE = 256


def _flattened(rgba: Image.Image) -> Image.Image:
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return rgba.convert("RGB")
    page = Image.new("RGB", rgba.size, _page_colour(rgba))
    page.paste(rgba.convert("RGB"), mask=alpha)
    return page


def _page_colour(rgba: Image.Image) -> tuple[int, int, int]:
    """White, unless the visible pixels (weighted by their opacity) are light on average."""
    small = rgba
    if max(rgba.size) > _JUDGE_SIDE:
        small = rgba.copy()
        small.thumbnail((_JUDGE_SIDE, _JUDGE_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(small, np.float32).reshape(-1, 4)
    weight = pixels[:, 3] / 255.0
    if float(weight.sum()) < 1.0:
        return (255, 255, 255)
    grey = pixels[:, :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    light = float((grey * weight).sum() / weight.sum()) > LIGHT_CONTENT
    return (0, 0, 0) if light else (255, 255, 255)


def _high_depth_to_l(im: Image.Image, rows_per_block: int = 1024) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8 bits.

    Integers are scaled by the bit depth their data really uses (8, 10, 12, 14, 16, ... bits),
    so that 12-bit scans in 16-bit containers are not near-black and a 16-bit copy of an 8-bit
    photo maps back onto it; floats in [0, 1] are scaled by 255; anything else (negative
    values, other float ranges) by its min..max. Works on row blocks: never a float64 copy of
    a large image.
    """
    data = np.asarray(im)
    if data.ndim != 2:
        raise ImageReadError(f"unsupported pixel mode {im.mode}")
    finite = data if data.dtype.kind in "iu" else np.where(np.isfinite(data), data, 0)
    low, high = float(finite.min()), float(finite.max())
    if data.dtype.kind in "iu" and low >= 0:
        bits = max(8, int(high).bit_length())
        bits += bits % 2
        low, span = 0.0, float(2 ** bits - 1)
    elif data.dtype.kind == "f" and low >= 0 and high <= 1:
        low, span = 0.0, 1.0
    else:
        span = max(high - low, 1e-12)
    out = np.empty(data.shape, dtype=np.uint8)
    scale = np.float32(255.0 / span)
    for start in range(0, data.shape[0], rows_per_block):
        block = finite[start:start + rows_per_block].astype(np.float32)
        block -= np.float32(low)
        block *= scale
        np.clip(np.rint(block, out=block), 0, 255, out=block)
        out[start:start + rows_per_block] = block
    return Image.fromarray(out)


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                        ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(im, transform)

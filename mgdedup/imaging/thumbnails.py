"""Small upright JPEGs of image files, for pages a person looks at (the HTML report, the
review page): decoded at the smallest JPEG draft scale that still covers the size asked for."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image

from mgdedup.imaging.reading import open_rgb


def jpeg_thumbnail(path: str | Path, max_px: int, quality: int, *, optimize: bool = False
                   ) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of `path` upright, its longest side at most `max_px`.
    Raises what `open_rgb` raises for a file that cannot be read."""
    def needed(size: tuple[int, int]) -> tuple[int, int]:  # lets a JPEG draft-decode
        scale = min(1.0, max_px / max(size))
        return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))

    image, _ = open_rgb(path, min_size=needed)
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=optimize)
    return buffer.getvalue(), image.width, image.height

"""A 64-bit perceptual hash (DCT hash, after pHash): the cheap second signal of a copy.

The CNN descriptor misses copies that keep only the coarse image: thumbnails of 64 pixels
recompressed at JPEG quality 10, pixelated and noised images. Their low-frequency structure
survives, and that is what this hash keeps: the image in grey at 32 x 32, its 2-D DCT, and
one bit per coefficient of the top-left 8 x 8 block, set where the coefficient exceeds the
median of the 63 AC coefficients. Copies of that kind differ from their original in a few
bits; unrelated images in about 32. The hash is computed from the decoded image at index time
and stored in the index (`phash`), so candidates can be found by Hamming distance.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 32
LOW = 8
#: the value stored for rows whose hash is not known (indexes written before the hash);
#: never a real hash: at most 33 of 64 bits can exceed the median of the AC coefficients
UNKNOWN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix  # (n, n), orthonormal DCT-II


_DCT = _dct_matrix(SIZE)
_WEIGHTS = (np.uint64(1) << np.arange(LOW * LOW, dtype=np.uint64)[::-1])


def phash(image: Image.Image) -> np.uint64:
    """The hash of an image (any mode, any size): bit 63 is the DC coefficient's."""
    grey = image.convert("L")
    if max(grey.size) > 4 * SIZE:  # an area average first: BOX over a large image is exact
        grey = grey.reduce(max(1, min(grey.size) // (2 * SIZE)))
    pixels = np.asarray(grey.resize((SIZE, SIZE), Image.Resampling.BOX), np.float64)
    coefficients = (_DCT @ pixels @ _DCT.T)[:LOW, :LOW].ravel()  # (64,)
    bits = coefficients > np.median(coefficients[1:])
    return np.uint64(int(np.sum(_WEIGHTS[bits], dtype=np.uint64)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes, elementwise (64 where either is unknown)."""
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    x = np.bitwise_xor(a, b)
    counts = np.zeros(x.shape, np.int64)
    for shift in range(0, 64, 8):
        counts += _POPCOUNT[((x >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.intp)]
    return np.where((a == UNKNOWN) | (b == UNKNOWN), 64, counts)


_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], np.int64)

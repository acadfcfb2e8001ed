"""The "full" augmentation: lighting against the AlexNet formula, determinism, geometry."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mgdedup.imaging.augment import (
    LIGHTING_EIGENVALUES,
    LIGHTING_EIGENVECTORS,
    FullAugmentation,
    Lighting,
    augmented_copy,
)


def _gradient(width: int = 320, height: int = 240) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def test_lighting_shift_matches_the_alexnet_formula() -> None:
    alpha = np.array([0.3, -1.2, 0.7])
    eigvec = np.array(LIGHTING_EIGENVECTORS)
    eigval = np.array(LIGHTING_EIGENVALUES)
    # reference: rgb_c = sum_k eigvec[c, k] * alpha_k * eigval_k
    expected = np.array([sum(eigvec[c, k] * alpha[k] * eigval[k] for k in range(3))
                         for c in range(3)])
    shift = Lighting().shift(torch.tensor(alpha, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(shift, expected, atol=1e-6)


def test_lighting_adds_one_colour_offset_and_stays_in_range() -> None:
    image = torch.full((3, 8, 8), 0.5)
    out = Lighting(std=0.1)(image, torch.Generator().manual_seed(3))
    offset = out - image
    assert torch.allclose(offset, offset[:, :1, :1].expand_as(offset))
    assert offset.abs().max() > 0
    assert Lighting(std=0.0)(image) is image
    assert Lighting(std=50.0)(image, torch.Generator().manual_seed(1)).max() <= 1.0


def test_full_augmentation_gives_square_float_images() -> None:
    torch.manual_seed(0)
    out = FullAugmentation(96)(_gradient())
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_augmented_copy_is_deterministic_in_its_seed_only() -> None:
    image = _gradient()
    torch.manual_seed(123)
    first = np.asarray(augmented_copy(image, 128, seed=5))
    torch.rand(1000)  # whatever else consumed the global RNG must not matter
    again = np.asarray(augmented_copy(image, 128, seed=5))
    other = np.asarray(augmented_copy(image, 128, seed=6))
    assert first.shape == (128, 128, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0
    # the caller's RNG stream is left where it was
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    augmented_copy(image, 64, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_crops_vary_in_area_and_flip_half_the_time() -> None:
    # a horizontal ramp: the mean of the left column tells the crop's x position and flips
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1)), "L").convert("RGB")
    left_minus_right = []
    for seed in range(40):
        pixels = np.asarray(augmented_copy(ramp, 32, seed=seed)).astype(float)[..., 0]
        left_minus_right.append(pixels[:, 0].mean() - pixels[:, -1].mean())
    flipped = sum(d > 0 for d in left_minus_right)
    assert 8 <= flipped <= 32  # about half are mirrored

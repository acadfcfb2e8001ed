"""The paper's "full" data augmentation (docs/multigrain.md, section 2), in one place.

Training draws it for every repeated-augmentation copy; the IN-aug surrogate and the
calibration of thresholds use the very same transformation to make "copies" of an image, so
p*, thresholds and the training objective all see one definition of "the same image".

Two ways in:
- `FullAugmentation(size)`: a torch module for DataLoaders, PIL image -> float (3, size, size)
  in [0, 1] using torch's global RNG (seed it per worker as DataLoader does). Normalisation is
  left to the trunk (`Trunk.normalize`), as everywhere else in mgdedup.
- `augmented_copy(image, size, seed)`: a deterministic uint8 PIL image for evaluation sets,
  reproducible from the seed alone whatever else used the RNG before.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

#: RandomResizedCrop area scale and aspect ratio range ("full" augmentation)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: ColorJitter strengths
JITTER = 0.3
#: PCA lighting noise (AlexNet): std of the per-component factor, eigenvalues, eigenvectors (rows)
LIGHTING_STD = 0.1
LIGHTING_EIGENVALUES = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(nn.Module):
    """AlexNet-style PCA lighting noise on a float (3, H, W) image in [0, 1].

    Adds `V (alpha * lambda)` to every pixel, alpha ~ N(0, std^2) per component, V the
    eigenvectors as given (columns are RGB weights of each component, as in the reference code:
    rgb = V @ (alpha * lambda)). The result is clamped to [0, 1] so it stays an image.
    """

    def __init__(self, std: float = LIGHTING_STD) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigenvalues", torch.tensor(LIGHTING_EIGENVALUES))
        self.register_buffer("eigenvectors", torch.tensor(LIGHTING_EIGENVECTORS))

    def shift(self, alpha: Tensor) -> Tensor:
        """RGB offset (3,) for component factors `alpha` (3,)."""
        return self.eigenvectors @ (alpha * self.eigenvalues)

    def forward(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.std == 0:
            return image
        alpha = torch.randn(3, generator=generator) * self.std
        return (image + self.shift(alpha).view(3, 1, 1).to(image)).clamp_(0.0, 1.0)


class FullAugmentation(nn.Module):
    """PIL image -> float (3, size, size) in [0, 1]: crop, flip, colour jitter, lighting.

    `colour` replaces the colour jitter (e.g. AutoAugment's policy); the rest stays the same.
    """

    def __init__(self, size: int = 224, colour: nn.Module | None = None) -> None:
        super().__init__()
        self.size = int(size)
        self.geometry = v2.Compose([
            v2.RandomResizedCrop(self.size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
        ])
        self.colour = colour if colour is not None else v2.ColorJitter(
            brightness=JITTER, contrast=JITTER, saturation=JITTER)
        self.to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.lighting = Lighting()

    def forward(self, image: Image.Image) -> Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = self.colour(self.geometry(image))
        return self.lighting(self.to_float(image))


def augmented_copy(image: Image.Image, size: int, seed: int) -> Image.Image:
    """One "full"-augmented copy of `image` as an RGB uint8 PIL image of size x size.

    Deterministic in `seed` alone: the global torch RNG is forked, seeded, and restored.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensor = FullAugmentation(size)(image)
    pixels = (tensor.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")

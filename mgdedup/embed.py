"""Turning image files into stored descriptors, batch by batch.

Decoding runs in DataLoader worker processes and overlaps the model's forward pass. At s* > 224
images keep their aspect ratio, so a batch holds tensors of several shapes: those of one shape
are stacked and run together (no padding, which would change the GeM vector), the rest alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mgdedup.cpus import available_cpus
from mgdedup.errors import MgdedupError
from mgdedup.imageio import ImageReadError
from mgdedup.model import Descriptors, MultiGrainModel
from mgdedup.scan import file_digest
from mgdedup.transforms import load_for_embedding

log = logging.getLogger(__name__)


@dataclass
class DecodedImage:
    """One worker result: a tensor ready for the trunk, or the reason it could not be read."""

    position: int
    tensor: Tensor | None
    size: tuple[int, int]  # original (width, height) after EXIF orientation
    digest: str
    error: str | None = None


@dataclass
class EmbeddedBatch:
    """Descriptors for the readable images of one batch, and the reasons for the others."""

    positions: list[int]  # into the input path list
    sizes: list[tuple[int, int]]
    digests: list[str]
    descriptors: Descriptors
    errors: list[tuple[int, str]]
    gem: Tensor | None = None  # (B, C) raw GeM vectors, when asked for (exact classification)


class ImageFiles(Dataset):
    """Decodes files for one test resolution; never raises for a bad file."""

    def __init__(self, paths: Sequence[Path], resolution: int, digest: bool = True) -> None:
        self.paths = list(paths)
        self.resolution = resolution
        self.digest = digest

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> DecodedImage:
        path = self.paths[position]
        try:
            tensor, size = load_for_embedding(path, self.resolution)
            digest = file_digest(path) if self.digest else ""
        except ImageReadError as error:
            return DecodedImage(position, None, (0, 0), "", str(error))
        except OSError as error:
            return DecodedImage(position, None, (0, 0), "", f"cannot read file: {error.strerror}")
        return DecodedImage(position, tensor, size, digest)


def _keep_list(items: list[DecodedImage]) -> list[DecodedImage]:
    return items


def default_workers() -> int:
    """Decoding processes: leave the cores to the forward pass on small machines."""
    return max(1, min(4, available_cpus() - 1))


class Embedder:
    """Model + test resolution + p*: the one place images become descriptors."""

    def __init__(self, model: MultiGrainModel, resolution: int, *, device: str = "cpu",
                 batch_size: int = 16, workers: int | None = None) -> None:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MgdedupError(f"--device {device}: no CUDA GPU is available here")
        self.model = model.eval().to(device)
        self.resolution = int(resolution)
        self.p = model.p_for(self.resolution)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers

    @torch.inference_mode()
    def gem(self, tensors: Sequence[Tensor]) -> Tensor:
        """List of (3, H, W) tensors of any shapes -> (B, C) GeM vectors in input order."""
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, tensor in enumerate(tensors):
            by_shape[tuple(tensor.shape)].append(i)
        output = torch.empty(len(tensors), self.model.feature_dim)
        for indices in by_shape.values():
            batch = torch.stack([tensors[i] for i in indices]).to(self.device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            output[indices] = self.model.gem(batch, self.p).float().cpu()
        return output

    def embed_files(self, paths: Sequence[Path], *, digest: bool = True, keep_gem: bool = False,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[EmbeddedBatch]:
        """Yield one EmbeddedBatch per `batch_size` files, in input order."""
        loader = DataLoader(ImageFiles(paths, self.resolution, digest), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_keep_list,
                            prefetch_factor=4 if self.workers else None)
        for items in loader:
            good = [item for item in items if item.tensor is not None]
            errors = [(item.position, item.error or "unreadable") for item in items
                      if item.tensor is None]
            gem = None
            if good:
                gem = self.gem([item.tensor for item in good])
                descriptors = self.model.describe(gem, self.resolution)
            else:
                dim = self.model.descriptor_dim(self.resolution)
                descriptors = Descriptors(np.zeros((0, dim), np.float32),
                                          np.zeros(0, np.float32), np.zeros(0, np.float32))
            yield EmbeddedBatch(positions=[item.position for item in good],
                                sizes=[item.size for item in good],
                                digests=[item.digest for item in good],
                                descriptors=descriptors, errors=errors,
                                gem=gem if keep_gem else None)
            if on_progress is not None:
                on_progress(len(items))


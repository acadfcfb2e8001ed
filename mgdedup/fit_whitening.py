"""`mgdedup whiten`: learn PCA whitening for one resolution on a folder of unlabelled images."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from mgdedup.embed import Embedder
from mgdedup.errors import MgdedupError
from mgdedup.model import MultiGrainModel
from mgdedup.scan import scan_images
from mgdedup.whitening import Whitening, fit_whitening

log = logging.getLogger(__name__)

#: eigenvalue rank at which `whiten` floors the spectrum (best micro-AP on real photos)
DEFAULT_FLOOR_RANK = 512


@dataclass
class WhiteningReport:
    images: int
    skipped: int
    dim: int
    whitening: Whitening


def whiten_model(model: MultiGrainModel, folders: list[Path], resolution: int,
                 dim: int | None = None, *, workers: int | None = None,
                 on_start: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None
                 ) -> tuple[MultiGrainModel, WhiteningReport]:
    """A copy of `model` carrying a whitening fitted on l2n(g) of the folders' images at
    (s*, p*(s*)); the original model is left untouched."""
    files, _ = scan_images(folders)
    if len(files) < 2:
        raise MgdedupError(f"whitening needs at least 2 readable images; found {len(files)}")
    embedder = Embedder(model, resolution, workers=workers)
    if on_start is not None:
        on_start(len(files))
    vectors, skipped = [], 0
    for batch in embedder.embed_files([f.path for f in files], digest=False, keep_gem=True,
                                      on_progress=on_progress):
        skipped += len(batch.errors)
        if batch.gem is not None:
            vectors.append(F.normalize(batch.gem, dim=1).numpy())
    if not vectors:
        raise MgdedupError("none of the images could be read")
    x = np.concatenate(vectors).astype(np.float32)
    if dim is not None and dim > min(x.shape[0] - 1, x.shape[1]):
        log.warning("only %d images: keeping at most %d whitened dimensions", x.shape[0],
                    min(x.shape[0] - 1, x.shape[1]))
    if dim is None:  # invertible (exact classification), weak directions floored
        whitening = fit_whitening(x, resolution=resolution, p=embedder.p,
                                  floor_rank=DEFAULT_FLOOR_RANK)
    else:
        whitening = fit_whitening(x, resolution=resolution, p=embedder.p, dim=dim)
    whitened = copy.deepcopy(model)
    whitened.whitenings[int(resolution)] = whitening
    return whitened, WhiteningReport(images=x.shape[0], skipped=skipped, dim=whitening.dim,
                                     whitening=whitening)

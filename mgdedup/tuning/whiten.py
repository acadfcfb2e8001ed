"""`mgdedup whiten`: learn PCA whitening for one resolution on a folder of unlabelled images."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mgdedup.embedding.embedder import Embedder
from mgdedup.errors import MgdedupError
from mgdedup.evaluation.metrics import pair_metrics
from mgdedup.imaging.edits import write_copies
from mgdedup.imaging.scan import scan_images
from mgdedup.model.multigrain import MultiGrainModel
from mgdedup.model.whitening import Whitening, fit_whitening

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
                 dim: int | None = None, *, calibration_images: int = 100,
                 workers: int | None = None, device: str = "cpu",
                 on_start: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None
                 ) -> tuple[MultiGrainModel, WhiteningReport]:
    """A copy of `model` carrying a whitening fitted on l2n(g) of the folders' images at
    (s*, p*(s*)); the original model is left untouched."""
    files, _ = scan_images(folders)
    if len(files) < 2:
        raise MgdedupError(f"whitening needs at least 2 readable images; found {len(files)}")
    embedder = Embedder(model, resolution, device=device, workers=workers)
    if on_start is not None:
        on_start(len(files))
    vectors, readable, skipped = [], [], 0
    paths = [f.path for f in files]
    for batch in embedder.embed_files(paths, digest=False, keep_gem=True,
                                      on_progress=on_progress):
        skipped += len(batch.errors)
        if batch.gem is not None:
            vectors.append(F.normalize(batch.gem, dim=1).numpy())
            readable.extend(paths[i] for i in batch.positions)
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
    if calibration_images > 0:
        chosen = np.linspace(0, len(readable) - 1, min(calibration_images, len(readable)))
        chosen = np.unique(chosen.round().astype(int))
        whitening.threshold = calibrate_threshold(embedder, whitening, x[chosen],
                                                  [readable[i] for i in chosen])
    whitened = copy.deepcopy(model)
    whitened.whitenings[int(resolution)] = whitening
    return whitened, WhiteningReport(images=x.shape[0], skipped=skipped, dim=whitening.dim,
                                     whitening=whitening)


def calibrate_threshold(embedder: Embedder, whitening: Whitening, originals: np.ndarray,
                        paths: list[Path], target_precision: float = 0.99) -> float | None:
    """The cosine reaching `target_precision` on the planted edits (`mgdedup.imaging.edits`)
    of some fitting images. Optimistic since these images also fitted the whitening; None when
    the target is never reached."""
    with tempfile.TemporaryDirectory(prefix="mgdedup-calibrate-") as tmp:
        copies, family, _ = write_copies(paths, Path(tmp), resolution=embedder.resolution)
        gem = [batch.gem for batch in embedder.embed_files(copies, digest=False, keep_gem=True)
               if batch.gem is not None]
    if not gem:
        return None
    x = torch.cat([torch.from_numpy(originals), F.normalize(torch.cat(gem), dim=1)])
    descriptors = F.normalize(whitening.apply(x), dim=1).numpy()
    families = np.concatenate([np.arange(len(paths)), np.array(family)])
    metrics = pair_metrics(descriptors, families, target_precision)
    log.info("calibration: micro-AP %.4f, threshold %s for precision %.2f (recall %.3f)",
             metrics.micro_ap, metrics.threshold, target_precision, metrics.recall_at_threshold)
    return None if metrics.threshold is None else round(metrics.threshold, 4)

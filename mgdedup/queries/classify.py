"""Top-k ImageNet classes from the GeM vector, from images or from an index's stored rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgdedup.errors import MgdedupError
from mgdedup.index.layout import IndexDir

if TYPE_CHECKING:  # PyTorch is imported only when something is classified

    from mgdedup.model.multigrain import MultiGrainModel


log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    top: list[tuple[int, str, float]]  # (class index, label, probability)
    error: str | None = None


def top_k(logits: Any, class_names: Sequence[str], k: int
          ) -> list[list[tuple[int, str, float]]]:
    """The k most probable classes per row of `logits` (numpy or torch), best first."""
    import numpy as np  # here: the command line reports unreadable files without it

    z = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits,
                   np.float64)
    z = z - z.max(axis=1, keepdims=True)
    probabilities = np.exp(z)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = min(k, probabilities.shape[1])
    names = list(class_names)
    out = []
    for row in probabilities:
        best = np.argsort(-row, kind="stable")[:k]
        out.append([(int(i), names[int(i)] if int(i) < len(names) else str(int(i)),
                     float(row[i])) for i in best])
    return out


def classify_files(canonical: str, paths: Sequence[Path], resolution: int, k: int = 5
                   ) -> list[Prediction]:
    """Classify image files with the model named `canonical`: without PyTorch when its
    arrays and graphs are cached (`mgdedup.embedding.light`), else with it (which caches
    them for the next time)."""
    from mgdedup.embedding.light import LightModel, NotCached

    if k < 1:
        raise MgdedupError("-k must be at least 1")
    try:
        light = LightModel.load(canonical, resolution)
        predictions = [Prediction(str(p), []) for p in paths]
        for batch in list(light.embed_files(list(paths), with_hash=False, keep_gem=True)):
            for position, reason in batch.errors:
                predictions[position].error = reason
            if batch.gem is not None:
                tops = top_k(light.logits(batch.gem), light.class_names, k)
                for position, top in zip(batch.positions, tops):
                    predictions[position].top = top
        return predictions
    except NotCached as why:
        log.debug("classifying with PyTorch: %s", why)
    from mgdedup.embedding.light import remember_arrays
    from mgdedup.model.registry import load_model

    model = load_model(canonical)
    predictions = classify_images(model, paths, resolution, k=k)
    remember_arrays(canonical, model, resolution)
    return predictions


def classify_images(model: MultiGrainModel, paths: Sequence[Path], resolution: int, k: int = 5,
                    workers: int = 0) -> list[Prediction]:
    """Classify image files with the classifier applied to the GeM vector at p*(s*)."""
    import torch

    from mgdedup.embedding.embedder import Embedder

    if k < 1:
        raise MgdedupError("-k must be at least 1")
    embedder = Embedder(model, resolution, workers=workers)
    predictions = [Prediction(str(p), []) for p in paths]
    for batch in embedder.embed_files(list(paths), digest=False, keep_gem=True):
        for position, reason in batch.errors:
            predictions[position].error = reason
        if batch.gem is None:
            continue
        with torch.inference_mode():
            logits = model.logits(batch.gem)
        for position, top in zip(batch.positions, top_k(logits, model.class_names, k)):
            predictions[position].top = top
    return predictions


def classify_index(index_dir: Path, k: int = 5, model_spec: str | None = None,
                   block_rows: int = 8192) -> list[Prediction]:
    """Classify every indexed image from its stored descriptor and norms (no image read)."""
    import numpy as np
    import torch

    from mgdedup.index.model_check import model_for_index
    from mgdedup.model.multigrain import Descriptors

    if k < 1:
        raise MgdedupError("-k must be at least 1")
    with IndexDir(index_dir).open_store() as store:
        meta = store.meta
        model = model_for_index(meta, model_spec)
        paths = [str(p) for p in store.absolute_paths()]
        gem_norm, white_norm = store.read("gem_norm"), store.read("white_norm")
        predictions: list[Prediction] = []
        for start, block in store.iter_embeddings(block_rows):
            stop = start + len(block)
            stored = Descriptors(np.asarray(block, np.float32), gem_norm[start:stop],
                                 white_norm[start:stop])
            with torch.inference_mode():
                logits = model.logits_from_descriptors(stored, meta.resolution)
            for offset, top in enumerate(top_k(logits, model.class_names, k)):
                predictions.append(Prediction(paths[start + offset], top))
    return predictions

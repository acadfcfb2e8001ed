"""One function per benchmark: loader -> cached GeM vectors -> metric, as a flat result dict.

Every function takes a model and a resolution, gets its GeM vectors from the evaluation cache
(mgdedup.evaluation.cache: embedded once per model, s*, p*) and returns a dict of plain
numbers (JSON-ready): the metrics, then what they were measured with (model, fingerprint,
resolution, p, whitening, images, images embedded by this run, cache file). Retrieval uses the
model's stored descriptors l2n(Phi(l2n(g))) (the whitening of that resolution, as `index`
does); classification uses the classifier on g. IN-aug reports both the model's descriptors
and plain l2n(g) (what tune-p scores).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mgdedup.errors import MgdedupError
from mgdedup.evaluation import datasets, metrics
from mgdedup.evaluation.cache import EmbeddingCache, Item
from mgdedup.evaluation.inaug import (
    DEFAULT_K,
    DEFAULT_PER_CLASS,
    build_inaug,
    copy_seed,
    copy_size_for,
    inaug_metrics,
)
from mgdedup.model.multigrain import MultiGrainModel

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None


def _gem(cache: EmbeddingCache, items: Sequence[Item], what: str, on_progress: Progress
         ) -> np.ndarray:
    g, ok = cache.gem(items, on_progress)
    if not ok.all():
        bad = items[int(np.flatnonzero(~ok)[0])].source
        raise MgdedupError(f"{int((~ok).sum())} {what} image(s) could not be read (first: "
                           f"{bad}); every image of a benchmark must be readable")
    return g


def _descriptors(model: MultiGrainModel, g: np.ndarray, resolution: int) -> np.ndarray:
    return model.describe(torch.from_numpy(g), resolution).descriptors


def _context(model: MultiGrainModel, cache: EmbeddingCache, benchmark: str, images: int
             ) -> dict[str, Any]:
    whitening = model.whitening_for(cache.resolution)
    return {"benchmark": benchmark, "model": model.info.name, "fingerprint": model.fingerprint(),
            "resolution": cache.resolution, "p": cache.p,
            "whitening": whitening.identifier if whitening is not None else None,
            "images": images, "embedded": cache.embedded, "cache": str(cache.path)}


def holidays(model: MultiGrainModel, root: Path, resolution: int, *,
             rotate_file: Path | None = None, on_progress: Progress = None,
             **cache_options: Any) -> dict[str, Any]:
    """INRIA Holidays mAP (plain AP and the official script's trapezoid variant).

    Images of the rotation list are turned by their angle (degrees counter-clockwise, PIL's
    convention) before embedding; they are cached under their own name (``NAME#rotA``)."""
    data = datasets.load_holidays(root, rotate_file)
    items = []
    for path in data.paths:
        angle = data.rotation.get(path, 0) % 360
        plain = Item.file(path)
        items.append(Item(plain.source, plain.root, f"{plain.rel}#rot{angle}", rotate=angle)
                     if angle else plain)
    cache = EmbeddingCache(model, resolution, **cache_options)
    x = _descriptors(model, _gem(cache, items, "Holidays", on_progress), resolution)
    similarity = x[data.query_rows] @ x.T
    return {"map": metrics.holidays_map(similarity, data.query_rows, data.groups),
            "map_trapezoid": metrics.holidays_map(similarity, data.query_rows, data.groups,
                                                  trapezoid=True),
            "queries": len(data.query_rows), "rotated": len(data.rotation),
            **_context(model, cache, "holidays", len(items))}


def ukb(model: MultiGrainModel, root: Path, resolution: int, *, on_progress: Progress = None,
        **cache_options: Any) -> dict[str, Any]:
    """UKBench N-S score (0-4)."""
    data = datasets.load_ukb(root)
    cache = EmbeddingCache(model, resolution, **cache_options)
    items = [Item.file(p) for p in data.paths]
    x = _descriptors(model, _gem(cache, items, "UKBench", on_progress), resolution)
    return {"score": metrics.ukb_score(x @ x.T, data.groups),
            **_context(model, cache, "ukb", len(items))}


def copydays(model: MultiGrainModel, root: Path, resolution: int, *,
             distractors: Path | None = None, on_progress: Progress = None,
             **cache_options: Any) -> dict[str, Any]:
    """Copydays strong edits against originals (+ distractors): mAP, one positive per query."""
    data = datasets.load_copydays(root, distractors)
    cache = EmbeddingCache(model, resolution, **cache_options)
    items = [Item.file(p) for p in data.database + data.queries]
    x = _descriptors(model, _gem(cache, items, "Copydays", on_progress), resolution)
    database, queries = x[:len(data.database)], x[len(data.database):]
    return {"map": metrics.copydays_map(queries @ database.T, data.positive_of_query),
            "queries": len(data.queries), "distractors": len(data.database) - data.n_originals,
            **_context(model, cache, "copydays", len(items))}


def imagenet(model: MultiGrainModel, root: Path, resolution: int, *,
             on_progress: Progress = None, **cache_options: Any) -> dict[str, Any]:
    """ImageNet validation top-1 / top-5 accuracy of the classifier on g (ImageFolder layout;
    class index = position of the folder in sorted order, as the model's classes)."""
    data = datasets.load_imagenet_val(root)
    classes = int(model.trunk.classifier.out_features)
    if len(data.classes) != classes:
        raise MgdedupError(f"{len(data.classes)} class folders in {root}, the model has "
                           f"{classes} classes; expected one folder per class")
    cache = EmbeddingCache(model, resolution, **cache_options)
    items = [Item.file(p) for p in data.paths]
    g = _gem(cache, items, "ImageNet", on_progress)
    with torch.inference_mode():
        logits = model.logits(torch.from_numpy(g)).float().numpy()
    return {"top1": metrics.topk_accuracy(logits, data.labels, 1),
            "top5": metrics.topk_accuracy(logits, data.labels, min(5, classes)),
            **_context(model, cache, "imagenet", len(items))}


def inaug(model: MultiGrainModel, root: Path, resolution: int, *, k: int | None = DEFAULT_K,
          seed: int = 0, layout: str = "auto", per_class: int = DEFAULT_PER_CLASS,
          exclude: tuple[str, ...] = (), on_progress: Progress = None,
          **cache_options: Any) -> dict[str, Any]:
    """IN-aug surrogate (mgdedup.evaluation.inaug): score /5, mAP and micro-AP, of the model's
    descriptors and of plain l2n(g) (``raw_*``)."""
    data = build_inaug(root, k, seed, layout=layout, per_class=per_class, exclude=exclude)
    size = copy_size_for(resolution)
    keys = data.row_keys(resolution)
    items = []
    for row, key in enumerate(keys):
        i, j = divmod(row, data.copies)
        items.append(Item(data.sources[i], data.root, key, copy_size=size,
                          copy_seed=copy_seed(seed, data.rel(i), j)))
    cache = EmbeddingCache(model, resolution, **cache_options)
    g, ok = cache.gem(items, on_progress)
    # a source that cannot be read drops its whole group, so every group keeps its 5 copies
    keep = np.repeat(ok.reshape(-1, data.copies).all(axis=1), data.copies)
    if keep.sum() < 2 * data.copies:
        raise MgdedupError(f"IN-aug: fewer than 2 readable source images in {root}")
    groups = data.groups[keep]
    mine = inaug_metrics(_descriptors(model, g[keep], resolution), groups)
    raw = inaug_metrics(F.normalize(torch.from_numpy(g[keep]), dim=1).numpy(), groups)
    return {**mine, **{f"raw_{name}": value for name, value in raw.items()},
            "sources": int(keep.sum()) // data.copies, "copies": data.copies, "seed": seed,
            "copy_size": size, **_context(model, cache, "inaug", int(keep.sum()))}


def pairs(model: MultiGrainModel, ground_truth: Path, root: Path, resolution: int, *,
          threshold: float | None = None, on_progress: Progress = None,
          **cache_options: Any) -> dict[str, Any]:
    """Copy detection on any folder with a ground truth of copy groups
    (datasets.load_pairs): micro-AP over all pairs, mAP of the grouped images as queries,
    precision / recall at the threshold (default: the model's measured one)."""
    data = datasets.load_pairs(ground_truth, root)
    cache = EmbeddingCache(model, resolution, **cache_options)
    items = [Item.file(p) for p in data.paths]
    x = _descriptors(model, _gem(cache, items, "pairs", on_progress), resolution)
    similarity = x @ x.T
    upper = np.triu_indices(len(x), k=1)
    scores = similarity[upper]
    positive = data.groups[upper[0]] == data.groups[upper[1]]
    threshold = model.default_threshold(resolution) if threshold is None else float(threshold)
    precision, recall = metrics.precision_recall_at(scores, positive, threshold)
    queries = np.flatnonzero(np.bincount(data.groups)[data.groups] > 1)
    return {"micro_ap": metrics.micro_ap(scores, positive),
            "map": metrics.holidays_map(similarity[queries], queries, data.groups),
            "threshold": threshold, "precision": precision, "recall": recall,
            "positive_pairs": int(positive.sum()), "pairs": len(scores),
            **_context(model, cache, "pairs", len(items))}

"""Choosing the test-time GeM exponent p* per resolution on IN-aug (paper section 4.2).

For each resolution s*, every copy of the IN-aug set goes through the trunk once; GeM is then
applied for every p of the grid to the same feature maps (no re-embedding per p), and the p
with the best IN-aug score of l2n(g) wins (ties: the p closest to the model's current p* at
that resolution, so p* only moves on evidence). Unwhitened l2n(g) is scored because a
whitening is fitted at one (s*, p*) and would favour the p it was fitted at.

Whitening policy when p* changes: a whitening fitted at that exact resolution with another p
is dropped (descriptors would otherwise be whitened with statistics of another exponent, and
its measured threshold would no longer hold). Refitting needs a few hundred unrelated images
and a copy benchmark to recalibrate the threshold, which tune-p does not have; the caller
prints what was dropped and how to refit (`mgdedup whiten` on the written model).
Note that the model then uses its nearest remaining whitening at that resolution
(`MultiGrainModel.whitening_for`). A whitening "for any resolution" (converted published
checkpoints) is kept, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mgdedup.cpus import die_with_parent
from mgdedup.embedding.batching import as_list, shape_groups
from mgdedup.embedding.embedder import default_workers
from mgdedup.errors import MgdedupError
from mgdedup.evaluation.inaug import InaugSet, InaugTensors, inaug_metrics
from mgdedup.imaging.reading import ImageReadError
from mgdedup.model.model_file import save_model
from mgdedup.model.multigrain import MultiGrainModel, for_inference
from mgdedup.model.pooling import gem
from mgdedup.model.whitening import ANY_RESOLUTION

log = logging.getLogger(__name__)

#: the paper's grid: p* in {1, ..., 10}
DEFAULT_GRID: tuple[float, ...] = tuple(float(p) for p in range(1, 11))


@dataclass
class ResolutionResult:
    resolution: int
    metrics: dict[float, dict[str, float]]  # p -> {"score", "map", "micro_ap"}
    best: float
    previous: float  # p* the model used before tuning
    images: int  # rows scored (sources x copies)


@dataclass
class TuneResult:
    per_resolution: dict[int, ResolutionResult] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def table(self) -> dict[int, float]:
        return {res: r.best for res, r in self.per_resolution.items()}


class _SafeTensors(InaugTensors):
    """InaugTensors that yields None for a source that cannot be decoded."""

    def __getitem__(self, item: int):  # type: ignore[override]
        try:
            return super().__getitem__(item)
        except ImageReadError as error:
            i = self.indices[item]
            log.warning("IN-aug: skipping %s (%s)", self.inaug.sources[i], error)
            return i, None


@torch.inference_mode()
def gem_grid(model: MultiGrainModel, inaug: InaugSet, resolution: int, grid: Sequence[float],
             *, batch_size: int = 16, workers: int | None = None, device: str = "cpu",
             on_progress: Callable[[int], None] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """GeM vectors of every IN-aug row for every p of the grid: ((P, N, C) float32, (k,) bool
    mask of the sources that could be read; rows of unread sources are zero)."""
    model = for_inference(model, device)
    n_sources = len(inaug.sources)
    out = np.zeros((len(grid), len(inaug), model.feature_dim), np.float32)
    ok = np.zeros(n_sources, bool)
    workers = default_workers() if workers is None else workers
    per_batch = max(1, batch_size // inaug.copies)
    loader = DataLoader(_SafeTensors(inaug, resolution), batch_size=per_batch,
                        num_workers=workers, collate_fn=as_list, worker_init_fn=die_with_parent,
                        prefetch_factor=2 if workers else None)
    for items in loader:
        rows, tensors = [], []
        for i, copies in items:
            if copies is not None:
                ok[i] = True
                rows += [i * inaug.copies + j for j in range(len(copies))]
                tensors += list(copies)
        for positions in shape_groups([tuple(t.shape) for t in tensors]):
            batch = torch.stack([tensors[k] for k in positions]).to(device)
            features = model.trunk.forward_features(
                batch.contiguous(memory_format=torch.channels_last)).float()
            chosen = [rows[k] for k in positions]
            for index, p in enumerate(grid):
                out[index, chosen] = gem(features, float(p)).cpu().numpy()
        if on_progress is not None:
            on_progress(len(items))
    return out, ok


def score_grid(model: MultiGrainModel, inaug: InaugSet, resolution: int,
               grid: Sequence[float] = DEFAULT_GRID, **kwargs: object
               ) -> tuple[dict[float, dict[str, float]], int]:
    """({p: IN-aug metrics of l2n(g)}, rows scored) at one resolution."""
    vectors, ok = gem_grid(model, inaug, resolution, grid, **kwargs)  # type: ignore[arg-type]
    if ok.sum() < 2:
        raise MgdedupError(f"IN-aug: only {int(ok.sum())} readable source image(s), need 2")
    rows = np.repeat(ok, inaug.copies)
    groups = inaug.groups[rows]
    metrics = {}
    for index, p in enumerate(grid):
        x = F.normalize(torch.from_numpy(vectors[index][rows]), dim=1).numpy()
        metrics[float(p)] = inaug_metrics(x, groups)
    return metrics, int(rows.sum())


def best_p(metrics: dict[float, dict[str, float]], current: float) -> float:
    """Highest IN-aug score; ties go to the p closest to the current p* (then the smaller)."""
    return max(metrics, key=lambda p: (round(metrics[p]["score"], 9), -abs(p - current), -p))


def tune(model: MultiGrainModel, inaug: InaugSet, resolutions: Sequence[int],
         grid: Sequence[float] = DEFAULT_GRID, *,
         on_resolution: Callable[[int], Callable[[int], None] | None] | None = None,
         **kwargs: object) -> TuneResult:
    """Score the grid at each resolution and pick p* (nothing is written)."""
    if not grid:
        raise MgdedupError("the p grid is empty")
    if any(p <= 0 for p in grid):
        raise MgdedupError(f"GeM exponents must be positive, got {list(grid)}")
    result = TuneResult()
    for resolution in resolutions:
        progress = on_resolution(resolution) if on_resolution is not None else None
        metrics, rows = score_grid(model, inaug, resolution, grid, on_progress=progress,
                                   **kwargs)
        current = model.p_for(resolution)
        result.per_resolution[int(resolution)] = ResolutionResult(
            int(resolution), metrics, best_p(metrics, current), current, rows)
        log.info("s*=%d: p*=%g (was %g)", resolution, result.per_resolution[resolution].best,
                 current)
    return result


def with_p_star(model: MultiGrainModel, table: dict[int, float]
                ) -> tuple[MultiGrainModel, list[str]]:
    """A model sharing `model`'s trunk with `table` merged into info.p_star, and whitenings
    made consistent (module docstring); returns it and what was changed, for the user."""
    info = dataclasses.replace(model.info, p_star={**model.info.p_star,
                                                   **{int(k): float(v) for k, v in table.items()}})
    whitenings = dict(model.whitenings)
    messages = []
    for resolution, p in sorted(table.items()):
        messages.append(f"s*={resolution}: p*={p:g} (was {model.p_for(resolution):g})")
        fitted = whitenings.get(int(resolution))
        if fitted is not None and abs(fitted.p - p) > 1e-9:
            del whitenings[int(resolution)]
            messages.append(f"s*={resolution}: dropped its whitening (fitted at p={fitted.p:g}, "
                            f"p* is now {p:g}); refit it at the new p* "
                            f"(mgdedup whiten FOLDER --model OUT --resolution {resolution} "
                            "--out NEW)")
        elif ANY_RESOLUTION in whitenings and abs(whitenings[ANY_RESOLUTION].p - p) > 1e-9:
            messages.append(f"s*={resolution}: kept the all-resolution whitening fitted at "
                            f"p={whitenings[ANY_RESOLUTION].p:g} although p* is {p:g}")
    tuned = MultiGrainModel(model.trunk, info, whitenings).eval()
    return tuned, messages


def write_tuned(model: MultiGrainModel, table: dict[int, float], out: Path
                ) -> list[str]:
    """Save the model with the new p* table to `out` (never overwritten); returns messages."""
    out = Path(out)
    if out.exists():
        raise MgdedupError(f"{out} already exists; choose another --out (it is never "
                           "overwritten)")
    tuned, messages = with_p_star(model, table)
    save_model(tuned, out)
    messages.append(f"wrote {out} (p* table {dict(sorted(tuned.info.p_star.items()))})")
    return messages

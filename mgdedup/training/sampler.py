"""Repeated-augmentation (RA) batch sampler (paper section 3.3, docs/multigrain.md, section 2).

A batch holds few distinct images, each repeated m times, so that the m augmented copies of
one image are the positives of the margin loss. The dataset index doubles as the instance id.

Layout of one iteration (global batch B, world size W, repeats m):
- every rank yields b = B / W indices made of g = ceil(b / m) groups; a group is one dataset
  index repeated m times consecutively, the last group truncated so the rank batch is exactly b
  (with `drop_last_group`, an incomplete last group is dropped instead: g = b // m groups,
  batches of g * m <= b indices);
- the iteration draws W * g images from a stream of seeded permutations of the dataset; rank r
  takes draws [r * g, (r + 1) * g). Groups never straddle ranks, ranks draw disjoint images,
  and all ranks compute the same stream from (seed + epoch) with no communication.
  When m divides b, the concatenation of the rank batches is exactly the W = 1 batch.
- the stream walks through a permutation and reshuffles (next permutation of the same epoch
  generator) when exhausted; on a reshuffle, images already drawn in the current iteration go
  to the end of the new permutation, so an iteration's images are distinct whenever the
  dataset holds at least W * g images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

#: paper: T = 5005 iterations at |B| = 512 on ImageNet (N = 1281167), "two passes of draws"
PAPER_LEN_FACTOR = 2.0


def default_iters_per_epoch(dataset_size: int, global_batch_size: int,
                            len_factor: float = PAPER_LEN_FACTOR) -> int:
    """ceil(len_factor * N / B): the reference RASampler's epoch length (5005 for ImageNet)."""
    if dataset_size < 1 or global_batch_size < 1 or len_factor <= 0:
        raise ValueError(f"need dataset_size >= 1, global_batch_size >= 1 and len_factor > 0, "
                         f"got {dataset_size}, {global_batch_size}, {len_factor}")
    return max(1, math.ceil(len_factor * dataset_size / global_batch_size))


class RepeatedAugmentationSampler(Sampler[list[int]]):
    """Batch sampler (`DataLoader(batch_sampler=...)`) yielding this rank's RA batches.

    `batch_size` is the global batch size over all ranks. `len()` is the number of iterations
    of a full epoch; with `start_iteration = k` an epoch yields only its last
    `iters_per_epoch - k` batches, identical to those of an uninterrupted run.
    """

    def __init__(self, dataset_size: int, batch_size: int, repeats: int = 3, *,
                 iters_per_epoch: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last_group: bool = False) -> None:
        super().__init__()
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} must be a positive multiple of "
                             f"world_size {world_size}")
        if iters_per_epoch is not None and iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        local = batch_size // world_size
        if drop_last_group:
            groups = local // repeats
            if groups == 0:
                raise ValueError(f"drop_last_group needs a per-rank batch ({local}) of at least "
                                 f"repeats ({repeats}) indices")
            rank_batch = groups * repeats
        else:
            groups, rank_batch = math.ceil(local / repeats), local
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.repeats = repeats
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last_group = drop_last_group
        self.groups_per_rank = groups  # distinct images per rank batch
        self.rank_batch_size = rank_batch  # indices per yielded list
        self.iters_per_epoch = (iters_per_epoch if iters_per_epoch is not None
                                else default_iters_per_epoch(dataset_size, batch_size))
        self.epoch = 0
        self.start_iteration = 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        """Select the epoch (its permutations come from seed + epoch) and where to start in it."""
        if not 0 <= start_iteration <= self.iters_per_epoch:
            raise ValueError(f"start_iteration must be in [0, {self.iters_per_epoch}], "
                             f"got {start_iteration}")
        self.epoch = epoch
        self.start_iteration = start_iteration

    def __len__(self) -> int:
        return self.iters_per_epoch

    @property
    def num_remaining(self) -> int:
        """Batches the next `__iter__` yields (len minus the skipped start)."""
        return self.iters_per_epoch - self.start_iteration

    def __iter__(self) -> Iterator[list[int]]:
        draws = self._global_draws(self.epoch)
        start, stop = self.start_iteration, self.iters_per_epoch
        for _ in range(start):  # replay the stream: cheap slicing, no batch lists built
            next(draws)
        lo, hi = self.rank * self.groups_per_rank, (self.rank + 1) * self.groups_per_rank
        for _ in range(start, stop):
            mine = next(draws)[lo:hi]
            yield mine.repeat_interleave(self.repeats)[: self.rank_batch_size].tolist()

    def _global_draws(self, epoch: int) -> Iterator[Tensor]:
        """Endless per-iteration draws of W * g dataset indices for all ranks together."""
        n, need = self.dataset_size, self.world_size * self.groups_per_rank
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm, pos = torch.randperm(n, generator=gen), 0
        while True:
            parts: list[Tensor] = []
            taken = 0
            while taken < need:
                if pos == n:
                    perm, pos = torch.randperm(n, generator=gen), 0
                    if parts:  # keep this iteration's images distinct across the reshuffle
                        dup = torch.isin(perm, torch.cat(parts))
                        perm = torch.cat([perm[~dup], perm[dup]])
                take = min(n - pos, need - taken)
                parts.append(perm[pos: pos + take])
                pos += take
                taken += take
            yield torch.cat(parts)

    def state_dict(self, iterations_done: int | None = None) -> dict:
        """Resume point: `iterations_done` = batches of the current epoch already trained on.

        The sampler cannot count them itself (DataLoader prefetches ahead), so the training
        loop passes its own count; None keeps the current start_iteration.
        """
        done = self.start_iteration if iterations_done is None else iterations_done
        if not 0 <= done <= self.iters_per_epoch:
            raise ValueError(f"iterations_done must be in [0, {self.iters_per_epoch}], got {done}")
        epoch = self.epoch
        if done == self.iters_per_epoch:  # epoch finished: resume at the next one
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "start_iteration": done, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and start_iteration; refuses a state made with another draw layout."""
        mismatched = {k: (state.get(k), v) for k, v in self._config().items()
                      if state.get(k) != v}
        if mismatched:
            raise ValueError(f"sampler state does not match this sampler (saved, current): "
                             f"{mismatched}")
        self.set_epoch(int(state["epoch"]), int(state["start_iteration"]))

    def _config(self) -> dict:
        return {"seed": self.seed, "dataset_size": self.dataset_size,
                "batch_size": self.batch_size, "repeats": self.repeats,
                "world_size": self.world_size, "iters_per_epoch": self.iters_per_epoch,
                "drop_last_group": self.drop_last_group}

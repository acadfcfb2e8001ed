"""Margin loss with distance-weighted negative sampling (Wu et al. 2017; docs/multigrain.md,
section 2).

On L2-normalised embeddings with D the Euclidean distance, a positive pair (same instance)
costs max(0, alpha + D - beta) and a negative pair max(0, alpha - (D - beta)); beta is one
learned scalar. Negatives are drawn with probability ~ 1 / q(D), the inverse of the density of
distances between uniform points on the sphere, so that all distances are represented rather
than the (mostly uninformative) typical distance around sqrt(2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: floor of 1 - D^2/4 inside the log: D -> 2 (antipodal points) would give log 0. Only entries
#: with D >= nonzero_loss_cutoff (< 2) can get near it, and those are zeroed afterwards, so the
#: floor only keeps the intermediate values finite.
LOG_FLOOR = 1e-8
#: floor of the squared distance before sqrt: finite gradient (zero, via the clamp) at D = 0
SQ_DIST_FLOOR = 1e-12


@dataclass
class MarginLossOutput:
    loss: Tensor  # scalar: sum of pair terms / number of terms > 0 (0 when none is)
    active_pairs: Tensor  # scalar int64 tensor (no host sync): number of pair terms > 0
    positive_pairs: int
    negative_pairs: int


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """(B, d) -> (B, B) Euclidean distances in float32, clamped so sqrt never sees x <= 0."""
    e = embeddings.float()
    sq = (e * e).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (e @ e.T)
    return d2.clamp(min=SQ_DIST_FLOOR).sqrt()


def pair_distances(embeddings: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Distances of the listed pairs, computed directly (exact, unlike the B x B Gram trick)."""
    diff = embeddings[i] - embeddings[j]
    return (diff * diff).sum(dim=1).clamp(min=SQ_DIST_FLOOR).sqrt()


def sampling_weights(distances: Tensor, same_instance: Tensor, dim: int, cutoff: float = 0.5,
                     nonzero_loss_cutoff: float = 1.4) -> Tensor:
    """(B, B) row-normalised negative-sampling probabilities p(j | i) ~ 1 / q(D_ij).

    D is clamped below at `cutoff` (bounds the weight of near duplicates);
    log w = (2 - dim) log D - ((dim - 3) / 2) log(max(1 - D^2 / 4, LOG_FLOOR)), shifted by its
    max over each row's valid entries before exp (the per-row max avoids underflowing whole
    rows, unlike the reference's global max). Weights are zero for the same instance (self
    included) and for D >= nonzero_loss_cutoff (those negatives give no loss). A row with no
    valid weight falls back to uniform over the other instances; a row with no other instance
    in the batch stays all zero (nothing can be sampled for it).
    """
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be (B, B), got {tuple(distances.shape)}")
    if same_instance.shape != distances.shape:
        raise ValueError(f"same_instance shape {tuple(same_instance.shape)} != distances "
                         f"shape {tuple(distances.shape)}")
    d = distances.float()
    clamped = d.clamp(min=cutoff)
    log_w = ((2.0 - dim) * clamped.log()
             - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * clamped * clamped).clamp(min=LOG_FLOOR).log())
    eye = torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
    other = ~(same_instance.bool() | eye)
    valid = other & (d < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~valid, float("-inf"))
    row_max = log_w.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    w = (log_w - row_max).exp()  # exp(-inf) = 0 on invalid entries
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, other.float())
    total = w.sum(dim=1, keepdim=True)
    return w / total.clamp(min=torch.finfo(w.dtype).tiny)


def distance_weighted_negatives(embeddings: Tensor, instance_ids: Tensor, *, cutoff: float = 0.5,
                                nonzero_loss_cutoff: float = 1.4,
                                generator: torch.Generator | None = None
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """(anchor_idx, positive_idx, negative_idx), one triplet per ordered positive pair.

    An anchor with k same-instance copies in the batch gets its k - 1 positives (row-major
    order) and k - 1 negatives drawn from its row of `sampling_weights` (embeddings are
    L2-normalised here). Draws are without replacement when the row has at least k - 1 nonzero
    weights, else with replacement. Anchors without any other instance in the batch are
    dropped. `generator` must live on the embeddings' device (a torch.multinomial rule).
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (B, d), got {tuple(embeddings.shape)}")
    ids = instance_ids.to(embeddings.device)
    if ids.shape != embeddings.shape[:1]:
        raise ValueError(f"instance_ids must be ({embeddings.shape[0]},), got {tuple(ids.shape)}")
    with torch.no_grad():
        e = F.normalize(embeddings.detach().float(), dim=1)
        same = ids[:, None] == ids[None, :]
        probs = sampling_weights(pairwise_distances(e), same, e.shape[1], cutoff,
                                 nonzero_loss_cutoff)
        positive = same.clone()
        positive.fill_diagonal_(False)
        anchor_idx, positive_idx = positive.nonzero(as_tuple=True)
        need = positive.sum(dim=1)  # k - 1 per anchor
        has = (probs > 0).any(dim=1)
        negative_idx = sample_negatives(probs, torch.where(has, need, 0), generator)
        keep = has[anchor_idx]  # row-major like negative_idx, which skips the rows without
        return anchor_idx[keep], positive_idx[keep], negative_idx


def sample_negatives(probs: Tensor, counts: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """counts[i] column draws from row i of `probs`, concatenated row by row (row-major).

    Without replacement where the row has at least counts[i] nonzero entries, else with.
    One torch.multinomial per distinct (count, replacement) pair: a few calls, no row loop.
    """
    nonzero = (probs > 0).sum(dim=1)
    starts = counts.cumsum(0) - counts  # where each row's draws begin in the output
    out = torch.empty(int(counts.sum()), dtype=torch.long, device=probs.device)
    for s in torch.unique(counts[counts > 0]).tolist():
        for replacement in (False, True):
            rows = ((counts == s) & ((nonzero < s) == replacement)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            draws = torch.multinomial(probs[rows], s, replacement=replacement,
                                      generator=generator)
            slots = starts[rows, None] + torch.arange(s, device=rows.device)
            out[slots.reshape(-1)] = draws.reshape(-1)
    return out


def margin_terms(distances_ap: Tensor, distances_an: Tensor, beta: Tensor,
                 alpha: float) -> tuple[Tensor, Tensor]:
    """Per-pair losses: positives max(0, alpha + D - beta), negatives max(0, alpha - (D - beta))."""
    return F.relu(alpha + distances_ap - beta), F.relu(alpha - (distances_an - beta))


#: the paper's initial beta (training from scratch)
BETA0 = 1.2


def balanced_beta(embeddings: Tensor, instance_ids: Tensor) -> tuple[float, float, float] | None:
    """(beta, mean copy distance, mean other-image distance) of a batch: beta halfway between.

    Why: beta0 = 1.2 suits a network trained from scratch, whose embeddings start spread out.
    A pretrained trunk's l2n(GeM) vectors are all non-negative and close together (default
    model, full-augmentation RA batches: copies 0.66 apart on average, other images 0.96,
    BENCHMARKS.md), so with beta 1.2 and alpha 0.2 a copy pair is active only beyond D = 1.0
    (none was, in a batch of 32 scenes) and every other-image pair below 1.4 (all were): the
    loss only spreads images apart and teaches no invariance. Starting beta between the two
    means makes the hard pairs of both kinds active.
    None when the batch has no copies or no other images.
    """
    e = F.normalize(embeddings.detach().float(), dim=1)
    distances = pairwise_distances(e)
    same = instance_ids[:, None] == instance_ids[None, :]
    off_diagonal = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    positives, negatives = distances[same & off_diagonal], distances[~same]
    if positives.numel() == 0 or negatives.numel() == 0:
        return None
    positive, negative = float(positives.mean()), float(negatives.mean())
    return (positive + negative) / 2.0, positive, negative


class MarginLoss(nn.Module):
    """Margin loss with one learned beta (give it its own learning rate, paper: 0.1 x base)."""

    def __init__(self, alpha: float = 0.2, beta0: float = BETA0, cutoff: float = 0.5,
                 nonzero_loss_cutoff: float = 1.4) -> None:
        super().__init__()
        self.alpha = alpha
        self.cutoff = cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.beta = nn.Parameter(torch.tensor(float(beta0)))

    def forward(self, embeddings: Tensor, instance_ids: Tensor,
                generator: torch.Generator | None = None) -> MarginLossOutput:
        """Loss of a batch; embeddings (B, d) are L2-normalised here, in float32 (autocast off)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            e = F.normalize(embeddings.float(), dim=1)
            a, p, n = distance_weighted_negatives(
                e, instance_ids, cutoff=self.cutoff, nonzero_loss_cutoff=self.nonzero_loss_cutoff,
                generator=generator)
            pos, neg = margin_terms(pair_distances(e, a, p), pair_distances(e, a, n),
                                    self.beta.float(), self.alpha)
            active = (pos > 0).sum() + (neg > 0).sum()
            # all inactive: 0 / 1 = 0, still attached to the graph with zero gradient
            loss = (pos.sum() + neg.sum()) / active.clamp(min=1).to(pos.dtype)
        return MarginLossOutput(loss=loss, active_pairs=active, positive_pairs=int(p.numel()),
                                negative_pairs=int(n.numel()))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={float(self.beta):.4g}, cutoff={self.cutoff}, "
                f"nonzero_loss_cutoff={self.nonzero_loss_cutoff}")

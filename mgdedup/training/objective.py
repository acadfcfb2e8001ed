"""Joint MultiGrain objective (paper eq. 5): lam * classification + (1 - lam) * margin loss.

With labels the classification term is the cross-entropy. Without labels (fine-tuning on an
unlabelled collection) a frozen teacher's soft predictions replace them: the distillation term
KL(softmax(t / T) || softmax(s / T)) * T^2 keeps the classifier from drifting while the margin
loss adapts the embedding. The T^2 factor keeps gradient magnitudes independent of T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mgdedup.training.margin_loss import MarginLoss


@dataclass
class LossTerms:
    total: Tensor
    classification: Tensor | None  # mean cross-entropy (None when not computed)
    margin: Tensor | None  # margin loss (None when lam = 1)
    distillation: Tensor | None  # KL * T^2 (None unless unlabelled with a teacher)
    active_pairs: int  # margin pair terms > 0 (0 when lam = 1)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor,
                      temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, mean over the batch (float32)."""
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def joint_loss(logits: Tensor | None, labels: Tensor | None, embeddings: Tensor,
               instance_ids: Tensor, margin: MarginLoss, lam: float,
               teacher_logits: Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> LossTerms:
    """lam * (CE or distillation) + (1 - lam) * margin; a term with weight 0 is not computed.

    Supervised: pass `labels`. Unlabelled: `labels=None` and `teacher_logits` (detached here).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (B, d), got {tuple(embeddings.shape)}")
    batch = embeddings.shape[0]
    if tuple(instance_ids.shape) != (batch,):
        raise ValueError(f"instance_ids must be ({batch},), got {tuple(instance_ids.shape)}")
    classification = distillation = margin_loss = None
    total = embeddings.new_zeros((), dtype=torch.float32)
    active = 0
    if lam > 0:
        _check_logits(logits, batch)
        if labels is not None and teacher_logits is not None:
            raise ValueError("pass labels (supervised) or teacher_logits (unlabelled), not both")
        if labels is not None:
            if tuple(labels.shape) != (batch,):
                raise ValueError(f"labels must be ({batch},), got {tuple(labels.shape)}")
            classification = F.cross_entropy(logits.float(), labels)
            total = total + lam * classification
        elif teacher_logits is not None:
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != logits "
                                 f"shape {tuple(logits.shape)}")
            distillation = distillation_loss(logits, teacher_logits, temperature)
            total = total + lam * distillation
        else:
            raise ValueError("lam > 0 needs labels or teacher_logits for the classification term")
    if lam < 1:
        out = margin(embeddings, instance_ids, generator=generator)
        margin_loss = out.loss
        active = int(out.active_pairs)
        total = total + (1.0 - lam) * margin_loss
    return LossTerms(total=total, classification=classification, margin=margin_loss,
                     distillation=distillation, active_pairs=active)


def _check_logits(logits: Tensor | None, batch: int) -> None:
    if logits is None:
        raise ValueError("lam > 0 needs logits")
    if logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits must be ({batch}, C), got {tuple(logits.shape)}")

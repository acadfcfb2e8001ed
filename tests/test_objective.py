"""Joint objective: lam * (CE | distillation) + (1 - lam) * margin, checked against numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgdedup.training.margin_loss import MarginLoss, distance_weighted_negatives
from mgdedup.training.objective import joint_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def np_cross_entropy(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


def np_margin(x, ids, seed, alpha=0.2, beta=1.2):
    """Loop margin loss on the triplets the seeded sampler draws (sampling is tested elsewhere)."""
    e = F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)
    a, p, n = (t.numpy() for t in distance_weighted_negatives(
        e, torch.tensor(ids), generator=torch.Generator().manual_seed(seed)))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    terms = [max(0.0, alpha + np.linalg.norm(xn[i] - xn[j]) - beta) for i, j in zip(a, p)]
    terms += [max(0.0, alpha - (np.linalg.norm(xn[i] - xn[k]) - beta)) for i, k in zip(a, n)]
    active = sum(t > 0 for t in terms)
    return sum(terms) / active, active


def batch(seed=0, b=12, dim=16, classes=5):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(b // 3), 3)
    x = rng.normal(size=(b // 3, dim))[ids] + 0.7 * rng.normal(size=(b, dim))
    logits = rng.normal(size=(b, classes)) * 2
    labels = rng.integers(0, classes, size=b)
    return x, ids, logits, labels


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_supervised_total_is_lam_ce_plus_one_minus_lam_margin(lam):
    x, ids, logits, labels = batch()
    t_logits = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    terms = joint_loss(t_logits, torch.tensor(labels), torch.tensor(x, dtype=torch.float32),
                       torch.tensor(ids), MarginLoss(), lam,
                       generator=torch.Generator().manual_seed(3))
    ce = np_cross_entropy(logits, labels)
    margin, active = np_margin(x, ids, seed=3)
    assert terms.classification.item() == pytest.approx(ce, rel=1e-5)
    assert terms.margin.item() == pytest.approx(margin, rel=1e-5)
    assert terms.total.item() == pytest.approx(lam * ce + (1 - lam) * margin, rel=1e-5)
    assert terms.active_pairs == active and terms.distillation is None
    terms.total.backward()
    assert t_logits.grad.abs().sum() > 0


def test_distillation_is_zero_when_student_equals_teacher():
    x, ids, logits, _ = batch(1)
    t_logits = torch.tensor(logits, dtype=torch.float32)
    terms = joint_loss(t_logits, None, torch.tensor(x, dtype=torch.float32), torch.tensor(ids),
                       MarginLoss(), 0.5, teacher_logits=t_logits.clone(), temperature=2.0)
    assert terms.distillation.item() == pytest.approx(0.0, abs=1e-6)
    assert terms.classification is None


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distillation_is_kl_teacher_student_times_t_squared(temperature):
    x, ids, logits, _ = batch(2)
    teacher = np.random.default_rng(5).normal(size=logits.shape) * 2

    def softmax(z):
        z = z / temperature
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    pt, ps = softmax(teacher), softmax(logits)
    kl = (pt * np.log(pt / ps)).sum(1).mean() * temperature ** 2
    terms = joint_loss(torch.tensor(logits, dtype=torch.float32), None,
                       torch.tensor(x, dtype=torch.float32), torch.tensor(ids), MarginLoss(), 0.3,
                       teacher_logits=torch.tensor(teacher, dtype=torch.float32),
                       generator=torch.Generator().manual_seed(0), temperature=temperature)
    margin, _ = np_margin(x, ids, seed=0)
    assert terms.distillation.item() == pytest.approx(kl, rel=1e-5)
    assert terms.total.item() == pytest.approx(0.3 * kl + 0.7 * margin, rel=1e-5)


def test_lam_one_skips_the_margin_loss():
    x, ids, logits, labels = batch(3)
    margin = MarginLoss()
    t_logits = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    terms = joint_loss(t_logits, torch.tensor(labels),
                       torch.tensor(x, dtype=torch.float32), torch.tensor(ids), margin, 1.0)
    assert terms.margin is None and terms.active_pairs == 0
    assert terms.total.item() == pytest.approx(np_cross_entropy(logits, labels), rel=1e-5)
    terms.total.backward()
    assert margin.beta.grad is None


def test_lam_zero_needs_no_logits_and_is_the_margin_loss():
    x, ids, _, _ = batch(4)
    emb = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    terms = joint_loss(None, None, emb, torch.tensor(ids), MarginLoss(), 0.0,
                       generator=torch.Generator().manual_seed(9))
    margin, _ = np_margin(x, ids, seed=9)
    assert terms.classification is None and terms.distillation is None
    assert terms.total.item() == pytest.approx(margin, rel=1e-5)
    terms.total.backward()
    assert math.isfinite(emb.grad.abs().sum().item())


@pytest.mark.parametrize("change,match", [
    ({"lam": 1.5}, "lam"),
    ({"labels": torch.zeros(5, dtype=torch.long)}, "labels"),
    ({"logits": torch.zeros(5, 3)}, "logits"),
    ({"logits": None}, "logits"),
    ({"labels": None}, "labels or teacher_logits"),
    ({"teacher_logits": torch.zeros(12, 5)}, "not both"),
    ({"labels": None, "teacher_logits": torch.zeros(12, 4)}, "teacher_logits shape"),
    ({"instance_ids": torch.zeros(11, dtype=torch.long)}, "instance_ids"),
    ({"embeddings": torch.zeros(12)}, "embeddings"),
])
def test_bad_shapes_and_arguments_raise(change, match):
    x, ids, logits, labels = batch()
    kwargs = {"logits": torch.tensor(logits, dtype=torch.float32),
                  "labels": torch.tensor(labels),
                  "embeddings": torch.tensor(x, dtype=torch.float32),
                  "instance_ids": torch.tensor(ids), "margin": MarginLoss(), "lam": 0.5}
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        joint_loss(**kwargs)

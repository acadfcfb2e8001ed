"""Distance-weighted sampling and margin loss against explicit loop references (numpy, float64)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgdedup.training.margin_loss import (
    MarginLoss,
    balanced_beta,
    distance_weighted_negatives,
    margin_terms,
    sample_negatives,
    sampling_weights,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def ref_weights(dist, ids, dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """p(j|i) by the MULTIGRAIN.md recipe, one row and one entry at a time."""
    b = len(ids)
    out = np.zeros((b, b))
    for i in range(b):
        logs = {}
        for j in range(b):
            if ids[j] == ids[i] or dist[i, j] >= nonzero_loss_cutoff:
                continue
            x = max(dist[i, j], cutoff)
            logs[j] = (2 - dim) * math.log(x) - (dim - 3) / 2 * math.log(1 - x * x / 4)
        if logs:
            top = max(logs.values())
            for j, value in logs.items():
                out[i, j] = math.exp(value - top)
        else:
            for j in range(b):
                out[i, j] = 1.0 if ids[j] != ids[i] else 0.0
        if out[i].sum() > 0:
            out[i] /= out[i].sum()
    return out


def clustered(n_instances, copies, dim, spread, seed):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_instances), copies)
    x = rng.normal(size=(n_instances, dim))[ids] + spread * rng.normal(size=(len(ids), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, ids


def np_dist(x):
    return np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))


@pytest.mark.parametrize("dim", [8, 16, 128])
def test_sampling_weights_match_the_loop_reference(dim):
    x, ids = clustered(6, 3, dim, 0.6, seed=dim)
    dist = np_dist(x)
    got = sampling_weights(torch.tensor(dist, dtype=torch.float32),
                           torch.tensor(ids[:, None] == ids[None, :]), dim).numpy()
    want = ref_weights(dist, ids, dim)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    assert (got[ids[:, None] == ids[None, :]] == 0).all()
    assert (got[dist >= 1.4] == 0).all()


def test_row_with_every_candidate_beyond_the_cutoff_is_uniform_over_other_instances():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(4), 3)
    x = np.zeros((12, 8))
    x[:3, 0] = 1.0  # instance 0 at +e0, the others around -e0: D(0, others) ~ 2
    x[3:, 0] = -1.0
    x[3:, 1:] = 0.3 * rng.normal(size=(9, 7))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = np_dist(x)
    got = sampling_weights(torch.tensor(dist, dtype=torch.float32),
                           torch.tensor(ids[:, None] == ids[None, :]), 8).numpy()
    np.testing.assert_allclose(got[:3, 3:], 1 / 9, rtol=1e-6)
    assert (got[:3, :3] == 0).all()
    np.testing.assert_allclose(got, ref_weights(dist, ids, 8), rtol=2e-3, atol=1e-7)
    assert (got[3:, :3] == 0).all() and (got[3:].sum(1) > 0.999).all()


def test_the_max_is_taken_per_row_so_a_far_row_does_not_underflow():
    # d = 512: row 1's best log-weight (D = 0.5) exceeds row 0's (D ~ 1.3) by ~ 400, so a global
    # max would flush row 0 to zeros and then to the uniform fallback.
    dim = 512
    dist = np.full((4, 4), 1.5)
    np.fill_diagonal(dist, 0.0)
    dist[0, 2], dist[0, 3] = 1.25, 1.3
    dist[1, 2] = dist[2, 1] = 0.5
    ids = np.arange(4)
    got = sampling_weights(torch.tensor(dist, dtype=torch.float32),
                           torch.tensor(ids[:, None] == ids[None, :]), dim).numpy()
    want = ref_weights(dist, ids, dim)
    assert want[0, 2] > 0.99  # far from uniform: the fallback would give 1/3 each
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-6)


def _triplets(x, ids, seed):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)
    return [t.numpy() for t in distance_weighted_negatives(e, torch.tensor(ids), generator=g)]


def test_triplets_pair_every_copy_with_a_negative_of_another_instance():
    ids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 5])  # k = 3, 2 and 1
    rng = np.random.default_rng(1)
    for seed in range(30):
        x = rng.normal(size=(len(ids), 16))
        a, p, n = _triplets(x, ids, seed)
        expected = [(i, j) for i in range(len(ids)) for j in range(len(ids))
                    if i != j and ids[i] == ids[j]]
        assert list(zip(a.tolist(), p.tolist())) == expected
        assert (ids[n] != ids[a]).all()
        candidates = (ref_weights(np_dist(x / np.linalg.norm(x, axis=1, keepdims=True)), ids, 16)
                      > 0).sum(1)
        for anchor in np.unique(a):
            negs = n[a == anchor]
            if candidates[anchor] >= len(negs):  # enough candidates: drawn without replacement
                assert len(set(negs.tolist())) == len(negs)
            else:
                assert candidates[anchor] == 1 and len(set(negs.tolist())) == 1


def test_single_instance_batch_has_no_triplets():
    a, p, n = _triplets(np.random.default_rng(0).normal(size=(3, 8)), np.zeros(3, int), 0)
    assert len(a) == len(p) == len(n) == 0


def _chi2_ok(counts, probs):
    assert (counts[probs == 0] == 0).all()
    live = probs > 0
    expected = counts.sum() * probs[live]
    chi2 = ((counts[live] - expected) ** 2 / expected).sum()
    dof = live.sum() - 1
    return chi2 < dof + 6 * math.sqrt(2 * dof) + 10


def test_sample_negatives_frequencies_follow_the_weights():
    x, ids = clustered(8, 3, 8, 0.5, seed=3)
    want = ref_weights(np_dist(x), ids, 8)
    reps = 3000
    probs = torch.tensor(np.repeat(want, reps, axis=0), dtype=torch.float32)
    draws = sample_negatives(probs, torch.ones(len(probs), dtype=torch.long),
                             torch.Generator().manual_seed(0)).numpy().reshape(len(want), reps)
    for row in range(len(want)):
        counts = np.bincount(draws[row], minlength=len(want))
        assert _chi2_ok(counts, want[row]), row


def test_sample_negatives_layout_and_replacement_rule():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.2, 0.3, 0.0, 0.5],
                          [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([2, 3, 1, 0])
    for seed in range(20):
        out = sample_negatives(probs, counts, torch.Generator().manual_seed(seed)).tolist()
        assert len(out) == 6
        assert sorted(out[:2]) == [1, 2]  # two nonzero entries, two draws: without replacement
        assert out[2:5] == [3, 3, 3]  # one nonzero entry, three draws: with replacement
        assert out[5] in (0, 1, 3)


def test_sampled_negative_frequencies_follow_the_weights_end_to_end():
    x, ids = clustered(8, 2, 8, 0.5, seed=3)  # k = 2: one negative per anchor, one draw
    want = ref_weights(np_dist(x), ids, 8)
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)
    t_ids = torch.tensor(ids)
    counts = np.zeros((len(ids), len(ids)))
    for _ in range(200):
        a, _, n = distance_weighted_negatives(e, t_ids, generator=g)
        np.add.at(counts, (a.numpy(), n.numpy()), 1)
    for row in range(len(ids)):
        assert counts[row].sum() == 200 and _chi2_ok(counts[row], want[row]), row


def ref_loss(x, a, p, n, alpha, beta):
    terms = []
    for i, j, k in zip(a, p, n):
        terms.append(max(0.0, alpha + np.linalg.norm(x[i] - x[j]) - beta))
        terms.append(max(0.0, alpha - (np.linalg.norm(x[i] - x[k]) - beta)))
    active = sum(t > 0 for t in terms)
    return (sum(terms) / active if active else 0.0), active


def test_margin_terms_are_the_hinges():
    pos, neg = margin_terms(torch.tensor([0.5, 1.0, 1.1]), torch.tensor([0.9, 1.5, 1.3]),
                            torch.tensor(1.2), 0.2)
    np.testing.assert_allclose(pos.numpy(), [0.0, 0.0, 0.1], atol=1e-6)
    np.testing.assert_allclose(neg.numpy(), [0.5, 0.0, 0.1], atol=1e-6)


@pytest.mark.parametrize("dim,beta0", [(8, 1.2), (32, 1.0), (128, 1.3)])
def test_loss_matches_the_loop_reference_and_beta_gets_its_gradient(dim, beta0):
    x, ids = clustered(5, 3, dim, 0.7, seed=dim)
    x = x * 3.0  # unnormalised input: forward normalises
    loss_fn = MarginLoss(alpha=0.2, beta0=beta0)
    emb = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = loss_fn(emb, torch.tensor(ids), generator=torch.Generator().manual_seed(7))
    a, p, n = _triplets(x, ids, 7)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    want, active = ref_loss(xn, a, p, n, 0.2, beta0)
    assert active > 0
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert int(out.active_pairs) == active
    assert out.positive_pairs == out.negative_pairs == len(a) == 5 * 3 * 2
    out.loss.backward()
    # d loss / d beta = (#active negatives - #active positives) / #active
    pos_active = int((0.2 + np.linalg.norm(xn[a] - xn[p], axis=1) - beta0 > 0).sum())
    neg_active = active - pos_active
    assert loss_fn.beta.grad.item() == pytest.approx((neg_active - pos_active) / active, abs=1e-6)
    assert neg_active != pos_active and loss_fn.beta.grad.item() != 0
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_nothing_active_gives_exactly_zero_and_a_zero_gradient():
    x = torch.zeros(6, 8)
    x[:3, 0], x[3:, 0] = 1.0, -1.0  # exact duplicates; other instance at D = 2
    x.requires_grad_(True)
    loss_fn = MarginLoss(beta0=1.0)  # positives 0.2 + 0 - 1 < 0, negatives 0.2 - (2 - 1) < 0
    out = loss_fn(x, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert out.loss.item() == 0.0 and int(out.active_pairs) == 0
    out.loss.backward()
    assert (x.grad == 0).all() and loss_fn.beta.grad.item() == 0.0


def test_identical_embeddings_give_finite_loss_and_gradients():
    x = torch.ones(6, 16, requires_grad=True)  # every distance 0, every term active
    loss_fn = MarginLoss(beta0=0.1)
    out = loss_fn(x, torch.tensor([0, 0, 0, 1, 1, 1]))
    # 12 positive terms 0.2 + 0 - 0.1 and 12 negative terms 0.2 - (0 - 0.1), all active
    assert out.loss.item() == pytest.approx((12 * 0.1 + 12 * 0.3) / 24, abs=1e-5)
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.beta.grad).all()


def test_half_precision_input_under_autocast_is_computed_in_float32():
    x, ids = clustered(4, 3, 16, 0.5, seed=0)
    emb = torch.tensor(x, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MarginLoss()(emb, torch.tensor(ids), generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_beta_is_one_learned_scalar():
    loss_fn = MarginLoss(beta0=1.2)
    params = dict(loss_fn.named_parameters())
    assert list(params) == ["beta"] and params["beta"].ndim == 0
    assert params["beta"].item() == pytest.approx(1.2)


def test_balanced_beta_is_halfway_between_the_mean_distances():
    """Reference: a double loop over the pairs of a random RA batch in numpy."""
    rng = np.random.default_rng(4)
    ids = np.repeat(np.arange(5), 3)
    raw = rng.normal(size=(15, 8)).astype(np.float32)
    e = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    positive, negative = [], []
    for i in range(15):
        for j in range(15):
            if i == j:
                continue
            (positive if ids[i] == ids[j] else negative).append(np.linalg.norm(e[i] - e[j]))
    beta, copy_distance, other_distance = balanced_beta(torch.from_numpy(3.0 * raw),
                                                        torch.from_numpy(ids))
    assert copy_distance == pytest.approx(np.mean(positive), rel=1e-5)
    assert other_distance == pytest.approx(np.mean(negative), rel=1e-5)
    assert beta == pytest.approx((np.mean(positive) + np.mean(negative)) / 2, rel=1e-5)


def test_balanced_beta_needs_copies_and_other_images():
    e = torch.randn(4, 8)
    assert balanced_beta(e, torch.arange(4)) is None  # no copies
    assert balanced_beta(e, torch.zeros(4, dtype=torch.long)) is None  # one image only

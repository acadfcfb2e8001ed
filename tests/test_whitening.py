"""PCA whitening and the classifier folded through it (docs/multigrain.md, section 3)."""

import numpy as np
import torch
import torch.nn.functional as F

from mgdedup.model.whitening import fit_whitening


def _gem_vectors(n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    g = np.abs(rng.normal(size=(n, d)) @ mixing) + 0.1  # correlated, positive like GeM output
    return torch.from_numpy(g).float()


def test_whitened_vectors_have_identity_covariance_on_the_fitting_set():
    g = _gem_vectors()
    x = F.normalize(g, dim=1).numpy()
    whitening = fit_whitening(x, resolution=500, p=3.0)
    y = whitening.apply(torch.from_numpy(x)).double().numpy()
    assert np.allclose(y.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(np.cov(y, rowvar=False), np.eye(y.shape[1]), atol=1e-3)


def test_reduced_dim_keeps_the_top_components():
    x = F.normalize(_gem_vectors(), dim=1).numpy()
    whitening = fit_whitening(x, resolution=500, p=3.0, dim=8)
    y = whitening.apply(torch.from_numpy(x)).double().numpy()
    assert y.shape[1] == 8
    assert np.allclose(np.cov(y, rowvar=False), np.eye(8), atol=1e-3)


def test_folded_classifier_reproduces_logits_at_full_rank():
    g = _gem_vectors(seed=1)
    d = g.shape[1]
    weight, bias = torch.randn(10, d), torch.randn(10)
    expected = g @ weight.T + bias  # the classifier on the raw GeM vector
    x = F.normalize(g, dim=1)
    whitening = fit_whitening(x.numpy(), resolution=224, p=3.0)
    y = whitening.apply(x)  # what the stored descriptor and its norm give back
    folded_weight, folded_bias = whitening.fold(weight)
    logits = g.norm(dim=1, keepdim=True) * (y @ folded_weight.T + folded_bias) + bias
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_floored_whitening_is_invertible_and_folds_exactly():
    g = _gem_vectors(n=30, d=24, seed=2)  # fewer images than needed for a full-rank fit
    x = F.normalize(g, dim=1)
    whitening = fit_whitening(x.numpy(), resolution=500, p=3.0, floor_rank=6)
    assert whitening.dim == 24
    y = whitening.apply(x)
    # the strongest directions are whitened: unit variance along the top eigenvectors
    top = np.linalg.eigh(np.cov(y.double().numpy(), rowvar=False))[0][::-1][:6]
    assert np.allclose(top, 1.0, atol=1e-3)
    weight, bias = torch.randn(7, 24), torch.randn(7)
    folded_weight, folded_bias = whitening.fold(weight)
    logits = g.norm(dim=1, keepdim=True) * (y @ folded_weight.T + folded_bias) + bias
    assert torch.allclose(logits, g @ weight.T + bias, atol=1e-4, rtol=1e-4)


def test_compact_floored_form_rebuilds_the_same_map():
    from mgdedup.model.whitening import Whitening, compact_floored

    x = F.normalize(_gem_vectors(n=200, d=24, seed=3), dim=1)
    whitening = fit_whitening(x.numpy(), resolution=224, p=3.0, floor_rank=8)
    data = compact_floored(whitening, floor_rank=8)
    # kept: the directions whose variance lies above the 8th eigenvalue (the floor), whose
    # scale 1/sqrt(eigenvalue) therefore differs from the floor's (by more than 1e-4)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False)))[::-1]
    above = int((eigenvalues > eigenvalues[7] / (1 - 1e-4) ** 2).sum())
    assert data["basis"].shape == (above, 24) and 1 <= above <= 8
    rebuilt = Whitening.from_dict(data)
    assert torch.allclose(rebuilt.apply(x), whitening.apply(x), atol=1e-4)

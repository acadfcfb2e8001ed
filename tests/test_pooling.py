"""GeM against its definition and its two limits."""

import torch

from mgdedup.model.pooling import GeM, gem


def test_p1_is_average_pooling():
    x = torch.rand(3, 7, 5, 9)
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)


def test_large_p_approaches_max_pooling():
    x = torch.rand(2, 4, 6, 6) + 0.5
    assert torch.allclose(gem(x.double(), 200.0), x.double().amax(dim=(-2, -1)), rtol=2e-2)


def test_matches_reference_formula_with_eps_clamp():
    x = torch.randn(2, 5, 4, 3)  # negative values are clamped to eps before the power
    p = 3.0
    reference = torch.stack([
        torch.stack([(x[b, c].clamp(min=1e-6) ** p).mean() ** (1 / p) for c in range(5)])
        for b in range(2)])
    assert torch.allclose(GeM(p=p)(x), reference, atol=1e-6)


def test_p_is_a_zero_dim_buffer_or_parameter():
    fixed, learned = GeM(3.0), GeM(3.0, learn_p=True)
    assert fixed.p.dim() == 0 and "p" in dict(fixed.named_buffers())
    assert learned.p.dim() == 0 and "p" in dict(learned.named_parameters())
    x = torch.rand(1, 2, 3, 3)
    learned(x).sum().backward()
    assert learned.p.grad is not None and learned.p.grad != 0
    fixed.set_p(5.0)
    assert float(fixed.p) == 5.0 and "p" in fixed.state_dict()

"""Foreign checkpoints: random weights in the exact published key layouts, converted and checked
against outputs computed straight from the original module or the reference's maths."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from mgdedup.errors import MgdedupError
from mgdedup.model.foreign import convert_state_dict
from mgdedup.model.trunks.resnet import ResNet50Trunk

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
D = 2048


def gem(features, p):
    """e_c = (mean_hw clamp(x, 1e-6)^p)^(1/p): (B, C, H, W) -> (B, C)."""
    return features.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


@pytest.fixture(scope="module")
def torchvision_net():
    torch.manual_seed(0)
    net = resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong mapping shows
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


@pytest.fixture(scope="module")
def reference_g(torchvision_net, images):
    """Feature map of the original module, (B, 2048, 2, 2)."""
    net = torchvision_net
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1((images - MEAN) / STD))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def multigrain_state(net, p=3.0):
    """The published layout: torchvision names under features., pool.p, classifier.*."""
    state = {f"features.{k}": v.clone() for k, v in net.state_dict().items()
             if not k.startswith("fc.")}
    state["pool.p"] = torch.tensor(p)
    state["classifier.weight"] = net.fc.weight.detach().clone()  # (1000, 2048)
    state["classifier.bias"] = net.fc.bias.detach().clone()  # (1000,)
    return state


_TRUNK: list[ResNet50Trunk] = []


def load_trunk(converted):
    """One trunk for the module (building ResNet-50 costs more than loading it), strict load."""
    if not _TRUNK:
        _TRUNK.append(ResNet50Trunk().eval())
    _TRUNK[0].load_state_dict(converted.trunk_state, strict=True)
    return _TRUNK[0]


def our_logits_and_g(trunk, images, p):
    with torch.no_grad():
        g = gem(trunk.forward_features(images), p)  # (B, 2048) raw GeM vector
        return trunk.classifier(g), g


def test_torchvision_state_dict(torchvision_net, images):
    converted = convert_state_dict(torchvision_net.state_dict())
    assert (converted.trunk_name, converted.source, converted.p) == ("resnet50", "torchvision", 1.0)
    assert converted.whitening_mean is None and converted.whitening_matrix is None
    logits, _ = our_logits_and_g(load_trunk(converted), images, converted.p)
    with torch.no_grad():
        expected = torchvision_net((images - MEAN) / STD)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
def test_multigrain_checkpoint(torchvision_net, images, reference_g, prefix):
    state = {prefix + k: v for k, v in multigrain_state(torchvision_net, p=3.0).items()}
    checkpoint = {"model_state": state, "optimizer_state": {"state": {}}, "extra": {"epoch": 120}}
    converted = convert_state_dict(checkpoint)
    assert (converted.source, converted.p) == ("multigrain", 3.0)
    assert converted.whitening_matrix is None
    logits, g = our_logits_and_g(load_trunk(converted), images, converted.p)
    expected_g = gem(reference_g, 3.0)
    expected = expected_g @ torchvision_net.fc.weight.T + torchvision_net.fc.bias
    assert torch.allclose(g, expected_g, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


def whitened_checkpoint(net, m, big_p, p=3.0):
    """Reproduce the reference's init_whitening + integrate_whitening on random (m, P)."""
    state = multigrain_state(net, p)
    w, b = state["classifier.weight"], state["classifier.bias"]
    folded = torch.cat((w, b.view(-1, 1)), 1)  # W~ = [W | b], (1000, 2049)
    p_inv = big_p.t().double().inverse()  # (P^T)^-1
    state["classifier.bias"] = m.matmul(folded.t())  # b' = W~ m
    state["classifier.weight"] = torch.matmul(folded.double(), p_inv).float()  # W' = W~ P^-T
    state["whitening.pca.pca_P"] = big_p.clone()
    state["whitening.pca.pca_m"] = m.clone()
    return {"model_state": state}


def reference_whitened_forward(g, m, big_p, state):
    """gem(add_bias) -> l2n -> apply_pca -> classifier, as the reference forward does."""
    g1 = torch.cat((g, g.new_ones(g.shape[0], 1)), 1)  # (B, 2049)
    z = g1 / (g1.norm(dim=1, keepdim=True) + 1e-6)
    y = (z - m) @ big_p  # (B, 2049) whitened embedding
    logits = y @ state["classifier.weight"].T + state["classifier.bias"]
    return logits, y, g1.norm(dim=1, keepdim=True) + 1e-6


def random_whitening(generator, d_mean):
    big_p = torch.eye(D + 1) + 0.02 * torch.randn(D + 1, D + 1, generator=generator)
    big_p *= torch.rand(D + 1, generator=generator) + 0.5  # dense, non-symmetric, well conditioned
    m = torch.rand(D + 1, generator=generator) / D ** 0.5
    m[D] = d_mean
    return m, big_p


def test_whitened_multigrain_checkpoint(torchvision_net, images, reference_g):
    generator = torch.Generator().manual_seed(2)
    g = gem(reference_g, 3.0)  # (B, 2048)
    # whitening "fitted" at image 0's norm, where the affine approximation must be exact
    d0 = float(1 / (torch.cat((g[0], torch.ones(1))).norm() + 1e-6))
    m, big_p = random_whitening(generator, d0)
    checkpoint = whitened_checkpoint(torchvision_net, m, big_p)
    converted = convert_state_dict(checkpoint)
    assert converted.p == 3.0
    logits, our_g = our_logits_and_g(load_trunk(converted), images, converted.p)

    expected, y, scale = reference_whitened_forward(our_g, m, big_p, checkpoint["model_state"])
    original = g @ torchvision_net.fc.weight.T + torchvision_net.fc.bias
    assert torch.allclose(logits, original, rtol=1e-3, atol=1e-3)  # the unwhitened classifier
    assert torch.allclose(logits / scale, expected, rtol=1e-3, atol=1e-4)  # reference, rescaled
    assert torch.equal(logits.argmax(1), expected.argmax(1))

    matrix, mean = converted.whitening_matrix, converted.whitening_mean
    assert matrix.shape == (D + 1, D) and mean.shape == (D,)
    phi = (F.normalize(our_g, dim=1) - mean) @ matrix.T  # Phi(l2n(g)), (B, 2049)
    assert torch.allclose(phi[0], y[0], rtol=1e-4, atol=1e-5)


def test_whitened_without_last_channel(torchvision_net, images, reference_g):
    """--no-include-last: P = diag(P0, 1), m = [m0, 0]; Phi = P0^T (x - m0), exact row drop."""
    generator = torch.Generator().manual_seed(3)
    m, big_p = random_whitening(generator, 0.0)
    big_p[D, :] = 0
    big_p[:, D] = 0
    big_p[D, D] = 1
    converted = convert_state_dict(whitened_checkpoint(torchvision_net, m, big_p))
    matrix, mean = converted.whitening_matrix, converted.whitening_mean
    assert matrix.shape == (D, D)
    assert torch.allclose(matrix, big_p[:D, :D].T) and torch.allclose(mean, m[:D])
    logits, _ = our_logits_and_g(load_trunk(converted), images, converted.p)
    original = gem(reference_g, 3.0) @ torchvision_net.fc.weight.T + torchvision_net.fc.bias
    assert torch.allclose(logits, original, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("obj", [
    {"foo.weight": torch.zeros(3)},
    {"model_state": {"backbone.conv.weight": torch.zeros(3)}},
    {"conv1.weight": "not a tensor", "fc.weight": torch.zeros(3)},
    {},
    [torch.zeros(3)],
])
def test_unknown_layout_raises(obj):
    with pytest.raises(MgdedupError, match="expected"):
        convert_state_dict(obj)


def test_folded_classifier_without_whitening_raises(torchvision_net):
    state = multigrain_state(torchvision_net)
    state["classifier.weight"] = torch.zeros(1000, D + 1)
    with pytest.raises(MgdedupError, match="expected"):
        convert_state_dict({"model_state": state})

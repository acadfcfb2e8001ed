"""Our plain-torch EfficientNet-Lite0 against the independent reference package.

The reference (`efficientnet_lite_pytorch`, a test-only dependency) pads dynamically when built
with image_size=None; its default static padding is only right at 224x224.
"""

import pytest
import torch

from mgdedup.model.trunks.efficientnet_lite import (
    EfficientNetLite0,
    efficientnet_lite0,
    load_package_state_dict,
    same_padding,
)

reference_package = pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="efficientnet-lite-pytorch (test-only dependency, pip install '.[test]') is missing")

SIZES = [(224, 224), (225, 301), (97, 130), (33, 31)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = efficientnet_lite0(pretrained=True).eval()
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    reference.load_state_dict(load_package_state_dict(), strict=True)
    return ours, reference.eval()


def _our_logits(model: EfficientNetLite0, images: torch.Tensor) -> torch.Tensor:
    features = model.forward_features(images)  # (B, 1280, h, w)
    return model.classifier(features.mean(dim=(-2, -1)))  # global average pooling + _fc


@pytest.mark.parametrize("height,width", SIZES)
def test_logits_match_reference(models, height, width):
    ours, reference = models
    images = torch.rand(2, 3, height, width)
    with torch.inference_mode():
        expected = reference((images * 255 - 127) / 128)  # the reference does not normalise
        got = _our_logits(ours, images)
        got_cl = _our_logits(ours, images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    assert torch.allclose(got_cl, expected, atol=1e-4, rtol=0)


def test_channels_last_model_matches_reference(models):
    _, reference = models
    ours = efficientnet_lite0(pretrained=True).eval().to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 97, 130)
    with torch.inference_mode():
        expected = reference((images * 255 - 127) / 128)
        got = _our_logits(ours, images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_feature_map_shape_and_range(models):
    ours, _ = models
    with torch.inference_mode():
        features = ours.forward_features(torch.rand(1, 3, 225, 301))
    assert features.shape == (1, ours.feature_dim, 8, 10)  # ceil(225/32), ceil(301/32)
    assert features.min() >= 0 and features.max() <= 6  # ReLU6


def test_training_mode_runs_and_backpropagates():
    model = EfficientNetLite0().train()
    model(torch.rand(2, 3, 64, 48)).sum().backward()
    assert model._conv_stem.weight.grad is not None


@pytest.mark.parametrize("size,kernel,expected", [
    (224, 3, (0, 1)), (225, 3, (1, 1)), (224, 5, (1, 2)), (225, 5, (2, 2)), (1, 3, (1, 1)),
])
def test_tf_same_padding(size, kernel, expected):
    assert same_padding(size, kernel, 2) == expected

"""Model files: round trip, foreign checkpoints through the same loader, p* and thresholds."""

from __future__ import annotations

import pytest
import torch
import torchvision

from mgdedup.errors import MgdedupError
from mgdedup.model.model_file import load_model_file, save_model
from mgdedup.model.multigrain import DEFAULT_P_STAR, DEFAULT_THRESHOLD, ModelInfo, MultiGrainModel
from mgdedup.model.registry import load_model
from mgdedup.model.trunks.resnet import ResNet50Trunk

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def test_default_model_round_trips_through_one_file(tmp_path):
    model = load_model()
    path = tmp_path / "default-copy.pt"
    save_model(model, path)
    loaded = load_model_file(path)
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.class_names == model.class_names and len(loaded.class_names) == 1000
    assert set(loaded.whitenings) == set(model.whitenings)
    images = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        for resolution in (224, 500):
            a = model.describe(model.gem(images, 3.0), resolution)
            b = loaded.describe(loaded.gem(images, 3.0), resolution)
            assert torch.allclose(torch.from_numpy(a.descriptors), torch.from_numpy(b.descriptors),
                                  atol=1e-6)
            assert loaded.default_threshold(resolution) == model.default_threshold(resolution)


def test_torchvision_resnet50_file_loads_and_reproduces_its_logits(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = load_model_file(path)
    assert model.info.trunk == "resnet50" and model.info.training_p == 1.0
    images = torch.rand(2, 3, 64, 80)
    with torch.inference_mode():
        expected = reference((images - IMAGENET_MEAN) / IMAGENET_STD)
        logits = model.logits(model.gem(images, p=1.0))  # GeM p=1 is the average pooling
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_multigrain_layout_file_keeps_its_p(tmp_path):
    torch.manual_seed(1)
    trunk = ResNet50Trunk().eval()
    state = {f"features.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    state.update({"pool.p": torch.tensor(3.0), "classifier.weight": trunk.fc.weight.detach(),
                  "classifier.bias": trunk.fc.bias.detach()})
    path = tmp_path / "joint_3B_0.5.pth"
    torch.save({"model_state": state, "epoch": 120}, path)
    model = load_model_file(path)
    assert model.info.training_p == pytest.approx(3.0)
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        features = trunk.forward_features(images).clamp(min=1e-6)
        expected = trunk.fc(features.pow(3).mean(dim=(-2, -1)).pow(1 / 3))
        assert torch.allclose(model.logits(model.gem(images, 3.0)), expected, atol=1e-4)


def test_garbage_and_missing_files_are_user_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MgdedupError, match="garbage.pt"):
        load_model_file(garbage)
    with pytest.raises(MgdedupError, match="not found"):
        load_model_file(tmp_path / "absent.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(MgdedupError, match="not a model file"):
        load_model_file(tmp_path / "list.pt")


def test_p_star_table_is_interpolated_and_defaults():
    info = ModelInfo(name="t", trunk="resnet50", training_p=3.0, p_star={224: 3.0, 500: 4.0})
    model = MultiGrainModel(ResNet50Trunk(), info)
    assert model.p_for(224) == 3.0 and model.p_for(500) == 4.0
    assert model.p_for(362) == pytest.approx(3.5)
    assert model.p_for(100) == 3.0 and model.p_for(1000) == 4.0  # clamped at the ends
    bare = MultiGrainModel(ResNet50Trunk(), ModelInfo(name="b", trunk="resnet50", training_p=1.0))
    assert bare.p_for(500) == DEFAULT_P_STAR and bare.default_threshold(500) == DEFAULT_THRESHOLD

"""Test-time preprocessing: the paper's resolution policy, shapes, tensor layout, and draft
decoding giving the same input as a full decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image
from torchvision import transforms as tv

from mgdedup.imaging.transforms import (
    decode_size_for,
    load_for_embedding,
    resize_for_resolution,
    to_tensor,
)


@pytest.mark.parametrize("size, resolution, expected", [
    ((640, 480), 224, (341, 256)),
    ((480, 640), 224, (256, 341)),
    ((256, 256), 224, (256, 256)),
    ((100, 50), 224, (512, 256)),  # small images are upscaled too
    ((640, 480), 160, (244, 183)),  # shorter side round(160 * 256 / 224) = 183
    ((4000, 3000), 500, (500, 375)),
    ((3000, 4000), 500, (375, 500)),
    ((100, 80), 500, (500, 400)),
    ((5000, 10), 800, (800, 2)),
    ((10000, 1), 500, (500, 1)),  # never zero
])
def test_decode_size_for(size, resolution, expected):
    assert decode_size_for(size, resolution) == expected


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (1000, 300), (90, 120)])
def test_224_protocol_matches_torchvision(size):
    img = photo(*size)
    ours = resize_for_resolution(img, 224)
    assert ours.size == (224, 224)
    reference = tv.Compose([tv.Resize(256), tv.CenterCrop(224)])(img)
    # same sizes, crop offsets and filter: equal up to float rounding in the crop-box resample
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(reference, np.int16))
    assert difference.max() <= 1 and difference.mean() < 0.01


def test_224_extreme_strip_resamples_only_the_crop():
    # resize-then-crop would first build a 256 x 128000 image
    strip = photo(2, 1000)
    out = resize_for_resolution(strip, 224)
    assert out.size == (224, 224)
    reference = tv.Compose([tv.Resize(256), tv.CenterCrop(224)])(strip)
    difference = np.abs(np.asarray(out, np.int16) - np.asarray(reference, np.int16))
    assert difference.max() <= 1


@pytest.mark.parametrize("size, expected", [
    ((800, 600), (500, 375)), ((600, 800), (375, 500)), ((120, 90), (500, 375)),
    ((500, 200), (500, 200)), ((2000, 1500), (500, 375)),
])
def test_above_224_largest_side_no_crop(size, expected):
    out = resize_for_resolution(photo(*size), 500)
    assert out.size == expected


def test_reducing_gap_close_to_direct_resize():
    img = photo(3200, 2400)  # 6.4x: reduce() by 2, then bilinear
    ours = resize_for_resolution(img, 500)
    direct = img.resize((500, 375), Image.Resampling.BILINEAR)
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(direct, np.int16))
    assert difference.mean() < 1.0


def test_to_tensor_layout_and_range():
    img = photo(40, 30)
    tensor = to_tensor(img)
    assert tensor.shape == (3, 30, 40) and tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    expected = torch.from_numpy(np.asarray(img).transpose(2, 0, 1) / 255.0).float()
    assert torch.allclose(tensor, expected)
    assert torch.allclose(to_tensor(img.convert("L")), to_tensor(img.convert("L").convert("RGB")))


@pytest.mark.parametrize("resolution, shape", [(224, (3, 224, 224)), (500, (3, 375, 500)),
                                               (800, (3, 600, 800))])
def test_load_for_embedding_draft_matches_full_decode(tmp_path, resolution, shape):
    photo(1600, 1200, seed=1).save(tmp_path / "p.jpg", quality=90)
    tensor, size = load_for_embedding(tmp_path / "p.jpg", resolution)
    assert size == (1600, 1200)
    assert tuple(tensor.shape) == shape
    with Image.open(tmp_path / "p.jpg") as full:
        reference = to_tensor(resize_for_resolution(full.convert("RGB"), resolution))
    assert tensor.shape == reference.shape
    assert (tensor - reference).abs().mean() < 3.0 / 255


def test_load_for_embedding_odd_size_keeps_original_aspect(tmp_path):
    # the 1/4 draft of 2000x1001 is 500x251 (blocks rounded up), whose own aspect would give
    # 500x251; the output must follow the original aspect, the shape a full decode gives
    photo(2000, 1001).save(tmp_path / "p.jpg", quality=80)
    tensor, size = load_for_embedding(tmp_path / "p.jpg", 500)
    assert size == (2000, 1001)
    assert tuple(tensor.shape) == (3, 250, 500)


def test_load_for_embedding_exif_portrait(tmp_path):
    upright = photo(600, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "p.jpg", exif=exif, quality=90)
    tensor, size = load_for_embedding(tmp_path / "p.jpg", 500)
    assert size == (600, 800)
    assert tuple(tensor.shape) == (3, 500, 375)
    reference = to_tensor(resize_for_resolution(upright, 500))
    assert (tensor - reference).abs().mean() < 4.0 / 255


def test_load_for_embedding_png_with_alpha(tmp_path):
    img = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    tensor, size = load_for_embedding(tmp_path / "clear.png", 224)
    assert size == (300, 200)
    assert torch.all(tensor == 1.0)  # transparent is white paper

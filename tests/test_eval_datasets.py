"""Dataset loaders on tiny generated layouts (8x8 images), and their errors on wrong ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgdedup.errors import MgdedupError
from mgdedup.evaluation.datasets import load_copydays, load_holidays, load_imagenet_val, load_ukb


def image(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8, 8), (shade, 255 - shade, 40)).save(path, fmt)
    return path


def holidays(root: Path, ids=(100000, 100001, 100002, 100100, 100101, 100200, 100201)) -> Path:
    for i in ids:
        image(root / "jpg" / f"{i:06d}.jpg", i % 256)
    return root


def test_holidays_groups_and_queries(tmp_path):
    # written out of order, plus files that are not Holidays images
    root = holidays(tmp_path, ids=(100101, 100000, 100002, 100100, 100001, 100201, 100200))
    (root / "jpg" / "readme.txt").write_text("x")
    (root / "jpg" / ".hidden.jpg").write_bytes(b"")
    data = load_holidays(root)
    assert [p.name for p in data.paths] == ["100000.jpg", "100001.jpg", "100002.jpg",
                                            "100100.jpg", "100101.jpg", "100200.jpg",
                                            "100201.jpg"]
    assert data.groups.tolist() == [1000, 1000, 1000, 1001, 1001, 1002, 1002]
    assert data.query_rows.tolist() == [0, 3, 5]  # the lowest id of each group
    assert data.rotation == {}


def test_holidays_rotation_list(tmp_path):
    root = holidays(tmp_path)
    rotate = tmp_path / "rotate.txt"
    rotate.write_text("# name angle\n100001.jpg 90\n\njpg/100201.jpg -90\n")
    data = load_holidays(root, rotate)
    assert data.rotation == {root / "jpg" / "100001.jpg": 90, root / "jpg" / "100201.jpg": -90}


@pytest.mark.parametrize("text, message", [
    ("100001.jpg ninety\n", "rotate.txt:1"),
    ("100001.jpg 45\n", "multiple of 90"),
    ("999999.jpg 90\n", "not a Holidays image"),
])
def test_holidays_bad_rotation_list(tmp_path, text, message):
    root = holidays(tmp_path)
    (tmp_path / "rotate.txt").write_text(text)
    with pytest.raises(MgdedupError, match=message):
        load_holidays(root, tmp_path / "rotate.txt")


def test_holidays_wrong_layouts(tmp_path):
    image(tmp_path / "100000.jpg")  # images at the root, not under jpg/
    with pytest.raises(MgdedupError, match=r"jpg/NNNNNN\.jpg"):
        load_holidays(tmp_path)
    image(tmp_path / "jpg" / "1000.jpg")  # not 6 digits
    with pytest.raises(MgdedupError, match="no NNNNNN.jpg image"):
        load_holidays(tmp_path)
    with pytest.raises(MgdedupError, match="not a folder"):
        load_holidays(tmp_path / "missing")


def ukb(folder: Path, names) -> None:
    for name in names:
        image(folder / name)


def test_ukb_under_full_sorted_numerically(tmp_path):
    ukb(tmp_path / "full", [f"ukbench{n:05d}.jpg" for n in reversed(range(12))])
    data = load_ukb(tmp_path)
    assert [p.name for p in data.paths] == [f"ukbench{n:05d}.jpg" for n in range(12)]
    assert data.paths[10].name == "ukbench00010.jpg"  # after ukbench00009
    assert data.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_ukb_unpadded_names_at_the_root(tmp_path):
    ukb(tmp_path, [f"ukbench{n}.jpg" for n in range(12)])
    data = load_ukb(tmp_path)
    # lexicographic order would give 0 1 10 11 2 ...
    assert [p.name for p in data.paths][8:] == ["ukbench8.jpg", "ukbench9.jpg",
                                                 "ukbench10.jpg", "ukbench11.jpg"]
    assert data.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_ukb_wrong_layouts(tmp_path):
    with pytest.raises(MgdedupError, match="ukbenchNNNNN.jpg"):
        load_ukb(tmp_path)  # empty
    ukb(tmp_path, [f"ukbench{n:05d}.jpg" for n in range(6)])
    with pytest.raises(MgdedupError, match="6 UKBench images.*not a multiple of 4"):
        load_ukb(tmp_path)
    ukb(tmp_path, ["ukbench00009.jpg", "ukbench00010.jpg"])  # 8 images, groups 0,1,2 uneven
    with pytest.raises(MgdedupError, match="group 1 .* has 2 images"):
        load_ukb(tmp_path)
    ukb(tmp_path, ["ukbench9.jpg"])  # same number as ukbench00009
    with pytest.raises(MgdedupError, match="same UKBench number"):
        load_ukb(tmp_path)


def copydays(root: Path) -> Path:
    for i in (200000, 200100, 200200):
        image(root / "original" / f"{i}.jpg", i % 256)
    image(root / "strong" / "200000_strong1.jpg")  # exact id prefix
    image(root / "strong" / "200000_strong2.jpg")
    image(root / "strong" / "200203.jpg")  # same block 2002xx
    image(root / "strong" / "notes.txt")  # ignored: no id
    return root


def test_copydays_queries_and_positives(tmp_path):
    root = copydays(tmp_path / "cd")
    image(tmp_path / "flickr" / "b" / "x.png")
    image(tmp_path / "flickr" / "a.jpg")
    (tmp_path / "flickr" / "a.txt").write_text("not an image")
    data = load_copydays(root, tmp_path / "flickr")
    assert [p.name for p in data.database] == ["200000.jpg", "200100.jpg", "200200.jpg",
                                               "a.jpg", "x.png"]
    assert data.n_originals == 3
    assert [p.name for p in data.queries] == ["200000_strong1.jpg", "200000_strong2.jpg",
                                              "200203.jpg"]
    assert data.positive_of_query.tolist() == [0, 0, 2]
    assert len(load_copydays(root).database) == 3  # no distractors


def test_copydays_inria_folder_names(tmp_path):
    image(tmp_path / "copydays_original" / "200000.jpg")
    image(tmp_path / "copydays_strong" / "200001.jpg")
    assert load_copydays(tmp_path).positive_of_query.tolist() == [0]


def test_copydays_wrong_layouts(tmp_path):
    image(tmp_path / "200000.jpg")
    with pytest.raises(MgdedupError, match="no original/ or copydays_original/ folder"):
        load_copydays(tmp_path)
    image(tmp_path / "original" / "200000.jpg")
    with pytest.raises(MgdedupError, match="no strong/ or copydays_strong/ folder"):
        load_copydays(tmp_path)
    image(tmp_path / "strong" / "300001.jpg")  # no original in block 3000
    with pytest.raises(MgdedupError, match="300001.jpg: 0 originals"):
        load_copydays(tmp_path)
    (tmp_path / "strong" / "300001.jpg").unlink()
    image(tmp_path / "strong" / "200001.jpg")
    with pytest.raises(MgdedupError, match="distractor folder"):
        load_copydays(tmp_path, tmp_path / "missing")


def test_copydays_ambiguous_block(tmp_path):
    image(tmp_path / "original" / "200000.jpg")
    image(tmp_path / "original" / "200050.jpg")
    image(tmp_path / "strong" / "200001.jpg")
    with pytest.raises(MgdedupError, match="2 originals"):
        load_copydays(tmp_path)


@pytest.mark.parametrize("under_val", [True, False])
def test_imagenet_val_classes_in_sorted_order(tmp_path, under_val):
    folder = tmp_path / "val" if under_val else tmp_path
    image(folder / "n02" / "b.JPEG")
    image(folder / "n02" / "a.JPEG")
    image(folder / "n01" / "c.png")
    (folder / "n03").mkdir()  # empty class keeps its index
    image(folder / "n04" / "d.jpg")
    (folder / "n04" / "labels.txt").write_text("not an image")
    data = load_imagenet_val(tmp_path)
    assert data.classes == ["n01", "n02", "n03", "n04"]
    assert [p.name for p in data.paths] == ["c.png", "a.JPEG", "b.JPEG", "d.jpg"]
    assert data.labels.tolist() == [0, 1, 1, 3]
    assert isinstance(data.labels, np.ndarray)


def test_imagenet_val_wrong_layouts(tmp_path):
    image(tmp_path / "ILSVRC2012_val_00000001.JPEG")  # flat val folder
    with pytest.raises(MgdedupError, match="1 loose images: sort them"):
        load_imagenet_val(tmp_path)
    (tmp_path / "n01").mkdir()
    with pytest.raises(MgdedupError, match="no image in the 1 class folders"):
        load_imagenet_val(tmp_path)

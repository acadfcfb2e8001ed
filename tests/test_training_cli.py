"""`mgdedup train`: user mistakes are one line and exit 1; the data layouts are checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run
from training_helpers import make_imagefolder, make_unlabelled

from mgdedup.errors import MgdedupError
from mgdedup.training.data import (
    AugmentedImages,
    SeededBatches,
    augmentation_seed,
    build_augmentation,
    imagefolder_split,
    unlabelled_files,
)
from mgdedup.training.sampler import RepeatedAugmentationSampler


def test_imagenet_and_images_together_is_an_error(tmp_path):
    one_line_error(run("train", "--imagenet", tmp_path, "--images", tmp_path), "not both")


def test_no_data_is_an_error():
    one_line_error(run("train"), "--imagenet")


def test_images_needs_init(tmp_path):
    make_unlabelled(tmp_path / "photos", 2)
    one_line_error(run("train", "--images", tmp_path / "photos"), "--init")


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"),
    ("no-train", "has no train/ folder"),
    ("flat-train", "not sorted into class folders"),
    ("empty-class", "holds no images"),
    ("val-unknown-class", "missing from train/"),
])
def test_bad_imagenet_layout_exits_1_with_one_line(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        make_imagefolder(root, classes=2, per_class=1, val_per_class=1, size=32)
    if layout == "no-train":
        (root / "train").rename(root / "training")
    elif layout == "flat-train":
        for path in (root / "train").rglob("*.png"):
            path.rename(root / "train" / f"{path.parent.name}-{path.name}")
        for folder in (root / "train").iterdir():
            if folder.is_dir():
                folder.rmdir()
    elif layout == "empty-class":
        (root / "train" / "zebra").mkdir()
    elif layout == "val-unknown-class":
        (root / "val" / "class00").rename(root / "val" / "unicorn")
    one_line_error(run("train", "--imagenet", root, "--run-dir", tmp_path / "run",
                       "--workers", 0), message)
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_bad_flag_values_are_one_line_errors(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=2, per_class=1, val_per_class=0, size=32)
    one_line_error(run("train", "--imagenet", root, "--lam", 1.5), "--lam")
    one_line_error(run("train", "--imagenet", root, "--augment", "randaugment"), "--augment")
    one_line_error(run("train", "--imagenet", root, "--milestones", "30,x"), "--milestones")
    one_line_error(run("train", "--imagenet", root, "--repeats", 1), "--repeats")


def test_resume_of_a_plain_model_file_is_an_error(tmp_path):
    torch.save({"format": "mgdedup-model"}, tmp_path / "plain.pt")
    one_line_error(run("train", "--resume", tmp_path / "plain.pt"), "not a training checkpoint")


def test_unlabelled_folder_skips_unreadable_files(tmp_path):
    paths = make_unlabelled(tmp_path / "photos", 3)
    (tmp_path / "photos" / "notes.jpg").write_text("not an image")
    broken = tmp_path / "photos" / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:200])  # a JPEG header, then nothing
    files = unlabelled_files(tmp_path / "photos")
    assert broken in files.paths and tmp_path / "photos" / "notes.jpg" not in files.paths
    dataset = AugmentedImages(files, build_augmentation("full", 32), 32)
    position = files.paths.index(broken)
    pixels, label, index = dataset[(position, 7)]  # replaced by the next readable image
    assert pixels.shape == (3, 32, 32) and label == -1 and index == position


def test_samples_are_functions_of_index_and_seed(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=2, per_class=2, val_per_class=0,
                            size=48)
    files = imagefolder_split(root, "train")
    assert files.classes == ["class00", "class01"] and files.labels == [0, 0, 1, 1]
    dataset = AugmentedImages(files, build_augmentation("autoaugment", 32), 32)
    torch.manual_seed(1)
    first = dataset[(2, 99)][0]
    torch.manual_seed(2)  # the global RNG does not matter ...
    assert torch.equal(dataset[(2, 99)][0], first)
    assert not torch.equal(dataset[(2, 100)][0], first)  # ... the sample seed does
    sampler = RepeatedAugmentationSampler(4, 6, 3, iters_per_epoch=2, seed=0)
    batches = list(SeededBatches(sampler, seed=0))
    assert len(batches) == 2 and all(len(b) == 6 for b in batches)
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every copy gets its own augmentation
    assert batches[0][0][1] == augmentation_seed(0, 0, 0, 0, 0)


def test_original_views_are_the_first_copy_of_each_group_as_index_sees_it(tmp_path):
    """--original-view: positions 0, m, 2m, ... carry the unaugmented flag (and the same
    indices and seeds as without it); that sample equals the test-protocol input `index`
    embeds at s* = 224, and above 224 it is a square centre crop of the resized image."""
    from mgdedup.imaging.transforms import load_for_embedding

    paths = make_unlabelled(tmp_path / "photos", 4, size=(320, 240))
    dataset = AugmentedImages(unlabelled_files(tmp_path / "photos"),
                              build_augmentation("full", 224), 224)
    sampler = RepeatedAugmentationSampler(4, 6, 3, iters_per_epoch=2, seed=0)
    plain = list(SeededBatches(sampler, seed=0))
    marked = list(SeededBatches(sampler, seed=0, original_views=True))
    for batch_plain, batch_marked in zip(plain, marked, strict=True):
        assert [item[:2] for item in batch_marked] == batch_plain
        assert [len(item) == 3 for item in batch_marked] == [True, False, False] * 2
        assert all(batch_marked[i][0] == batch_marked[i + 1][0] for i in (0, 1, 3, 4))
    index = dataset.files.paths.index(paths[1])
    view = dataset[(index, 5, True)][0]
    assert torch.equal(view, load_for_embedding(paths[1], 224)[0])
    assert not torch.equal(dataset[(index, 5)][0], view)
    wide = AugmentedImages(dataset.files, build_augmentation("full", 300), 300)
    assert wide[(index, 5, True)][0].shape == (3, 300, 300)

    # on by default when fine-tuning for copy detection, off for the paper's labelled recipe
    from mgdedup.training.config import TrainConfig

    assert TrainConfig(images="x", init="default").original_views
    assert not TrainConfig(images="x", init="default", original_view=False).original_views
    assert not TrainConfig(imagenet="x").original_views


def test_cli_does_not_import_training_at_module_level():
    """Inference modules never import the training code; the CLI only inside `train`."""
    package = Path(__file__).resolve().parent.parent / "mgdedup"
    for path in [*package.glob("*.py"), *package.glob("trunks/*.py")]:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("mgdedup.training"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("mgdedup.training") for a in node.names), path


def test_imagefolder_split_reports_missing_root(tmp_path):
    with pytest.raises(MgdedupError, match="has no train/ folder"):
        imagefolder_split(tmp_path, "train")

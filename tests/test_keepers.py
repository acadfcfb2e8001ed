"""Keeper rules keep the original: camera EXIF, the picture at its highest resolution, the
first written; explicit rules and --prefer; the reason is in every output."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run
from PIL import Image

from mgdedup.duplicates.keepers import (
    KEEP_RULES,
    KeeperRule,
    Traits,
    has_camera_exif,
    is_framed_copy,
)
from mgdedup.imaging.synthetic import random_scene, textured_field

RESOLUTION = 224
DAY = 86_400 * 10**9


def traits(path: str, pixels: int = 100, size: int = 1000, mtime: int = 0, **extra) -> Traits:
    return Traits(path=path, pixels=pixels, size=size, mtime_ns=mtime, **extra)


def reference_key(rule: str, t: Traits, prefer_position: int) -> tuple:
    """The rules as the docs state them, written out independently of `KeeperRule`."""
    seconds = t.mtime_ns // 10**9
    tail = (-t.pixels, -t.size, len(t.path))
    body = {"original": (not t.camera_exif, t.framed_copy, seconds, *tail),
            "most-pixels": tail,
            "largest": (-t.size, -t.pixels, len(t.path)),
            "oldest": (seconds, *tail), "newest": (-seconds, *tail),
            "exif": (not t.camera_exif, *tail)}[rule]
    return (not t.chosen, prefer_position if prefer_position >= 0 else np.inf, *body, t.path)


@pytest.mark.parametrize("rule", KEEP_RULES)
def test_order_matches_the_documented_rules(rule):
    rng = random.Random(rule)
    files = {}
    for row in range(60):
        files[row] = traits(f"/p/{'x' * rng.randrange(1, 4)}{row:02d}.jpg",
                            pixels=rng.choice([100, 120, 400, 1000]),
                            size=rng.choice([5, 50, 500]),
                            mtime=rng.choice([0, 1, 3]) * 10**9 + rng.randrange(10**8),
                            camera_exif=rng.random() < 0.3, framed_copy=rng.random() < 0.2,
                            chosen=rng.random() < 0.05,
                            preferred=rng.choice([-1, -1, -1, 0, 1]))
    order = KeeperRule(rule).order(70, files)
    expected = sorted(files, key=lambda r: reference_key(rule, files[r], files[r].preferred))
    assert order[:60].tolist() == expected
    assert sorted(order[60:].tolist()) == list(range(60, 70))  # rows without pairs last


def test_reasons_name_what_decided():
    rule = KeeperRule()
    original = traits("/a/photo.jpg", pixels=100, mtime=0, camera_exif=True)
    bigger_copy = traits("/b/copy.jpg", pixels=400, mtime=5 * 10**9)
    assert rule.reason(original, [bigger_copy]).startswith("has camera EXIF, oldest (")
    screenshot = traits("/b/shot.png", pixels=400, framed_copy=True)
    assert rule.reason(traits("/a/p.jpg", pixels=100), [screenshot]).startswith(
        "the other shows it smaller, inside a screenshot or paste")
    assert KeeperRule("largest").reason(traits("/a", size=9), [traits("/b", size=1)]) == \
        "largest file"
    assert KeeperRule().reason(traits("/z", chosen=True), [traits("/a")]) == \
        "chosen in review"
    assert rule.reason(traits("/a"), []) == "only file"


def test_framed_copy_geometry():
    # a 1000-pixel photo shown in a tenth of a 4000-pixel screenshot: 400 of its pixels
    assert is_framed_copy(cover=0.1, pixels=4000, other_cover=0.9, other_pixels=1000)
    # a crop: the original covers little but shows the part at the same scale
    assert not is_framed_copy(cover=0.25, pixels=4000, other_cover=1.0, other_pixels=1000)
    # a resize: both covered alike
    assert not is_framed_copy(cover=0.8, pixels=4000, other_cover=0.8, other_pixels=1000)
    assert not is_framed_copy(cover=0.1, pixels=4000, other_cover=0.5, other_pixels=1000)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown keeper rule"):
        KeeperRule("biggest")


def _exif_jpeg(image: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"  # Make
    exif[0x0110] = "Model 1"
    image.save(path, quality=92, exif=exif)


def test_camera_exif_is_read_from_the_header(tmp_path):
    image = random_scene(np.random.default_rng(0), (64, 48))
    _exif_jpeg(image, tmp_path / "camera.jpg")
    image.save(tmp_path / "plain.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    assert has_camera_exif(tmp_path / "camera.jpg")
    assert not has_camera_exif(tmp_path / "plain.jpg")
    assert not has_camera_exif(tmp_path / "text.jpg")
    assert not has_camera_exif(tmp_path / "missing.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    assert not has_camera_exif(tmp_path / "fifo.jpg")  # never blocks


@pytest.fixture(scope="module")
def originals_and_copies(tmp_path_factory) -> Path:
    """Three originals, each with a copy that beats it on pixels or bytes: an upscale (the
    original has camera EXIF), a re-save and a mirrored re-save at higher quality (written
    a day later), a paste onto a larger canvas (same times, no EXIF)."""
    root = tmp_path_factory.mktemp("keepers") / "photos"
    (root / "originals").mkdir(parents=True)
    (root / "copies").mkdir()
    rng = np.random.default_rng(3)
    scenes = [textured_field(rng, (480, 360)) for _ in range(3)]
    _exif_jpeg(scenes[0], root / "originals" / "camera.jpg")
    scenes[0].resize((960, 720), Image.BICUBIC).save(root / "copies" / "upscaled.jpg",
                                                     quality=95)
    scenes[1].save(root / "originals" / "photo.jpg", quality=80)
    scenes[1].transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "copies" / "mirror.jpg",
                                                              quality=98)
    scenes[1].save(root / "copies" / "resave.jpg", quality=98)
    scenes[2].save(root / "originals" / "pasted-from.jpg", quality=90)
    canvas = textured_field(np.random.default_rng(99), (960, 720))
    canvas.paste(scenes[2].resize((288, 216), Image.BICUBIC), (400, 300))
    canvas.save(root / "copies" / "canvas.jpg", quality=90)
    base = 1_700_000_000 * 10**9
    for path in root.rglob("*.jpg"):
        os.utime(path, ns=(base, base))
    for name in ("mirror.jpg", "resave.jpg"):
        os.utime(root / "copies" / name, ns=(base + DAY, base + DAY))
    assert run("index", root, "-r", RESOLUTION, "--workers", "0").exit_code == 0
    return root


def _groups(root: Path, *options: str) -> dict[str, dict]:
    done = run("dedup", "--index", root / ".mgdedup", "--format", "json", *options)
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    return {Path(f["path"]).name: g for g in document["groups"] for f in g["files"]}


def test_default_keeps_each_original(originals_and_copies):
    groups = _groups(originals_and_copies)
    for original, copy, reason in (("camera.jpg", "upscaled.jpg", "has camera EXIF"),
                                   ("photo.jpg", "mirror.jpg", "oldest"),
                                   ("pasted-from.jpg", "canvas.jpg",
                                    "the other shows it smaller")):
        assert groups[copy] is groups[original], f"{copy} not grouped with {original}"
        assert Path(groups[original]["keeper"]).name == original
        assert groups[original]["keeper_reason"].startswith(reason)


def test_most_pixels_rule_keeps_the_bigger_copies(originals_and_copies):
    groups = _groups(originals_and_copies, "--keep", "most-pixels")
    assert Path(groups["camera.jpg"]["keeper"]).name == "upscaled.jpg"
    assert Path(groups["pasted-from.jpg"]["keeper"]).name == "canvas.jpg"
    groups = _groups(originals_and_copies, "--keep", "largest")
    assert Path(groups["photo.jpg"]["keeper"]).name in ("mirror.jpg", "resave.jpg")
    assert groups["photo.jpg"]["keeper_reason"].startswith("largest file")
    groups = _groups(originals_and_copies, "--keep", "newest")
    assert Path(groups["photo.jpg"]["keeper"]).name in ("mirror.jpg", "resave.jpg")


def test_prefer_folder_wins_and_is_checked(originals_and_copies):
    groups = _groups(originals_and_copies, "--prefer", str(originals_and_copies / "copies"))
    for copy in ("upscaled.jpg", "canvas.jpg"):
        assert Path(groups[copy]["keeper"]).name == copy
        assert groups[copy]["keeper_reason"].startswith("in a --prefer folder")
    done = run("dedup", "--index", originals_and_copies / ".mgdedup", "--prefer",
               originals_and_copies / "nowhere")
    assert done.exit_code == 1 and "not a folder" in done.output


def test_reason_is_in_table_csv_and_dry_run(originals_and_copies, tmp_path):
    index = originals_and_copies / ".mgdedup"
    table = run("dedup", "--index", index)
    assert "keeper: has camera EXIF" in table.stdout
    csv_text = run("dedup", "--index", index, "--format", "csv").stdout
    header, *rows = [line.split(",") for line in csv_text.splitlines()]
    reasons = {row[2].rsplit("/", 1)[-1]: row[header.index("keeper_reason")] for row in rows}
    assert reasons["camera.jpg"].startswith("has camera EXIF") and reasons["upscaled.jpg"] == ""
    dry = run("dedup", "--index", index, "--action", "move", "--to", tmp_path / "dups")
    lines = [line for line in dry.stdout.splitlines() if line]
    upscaled = next(line for line in lines if "upscaled.jpg" in line)
    keeper = originals_and_copies / "originals" / "camera.jpg"
    assert upscaled.startswith(f"keep {keeper} (has camera EXIF")
    assert f"<- move {originals_and_copies / 'copies' / 'upscaled.jpg'} (P(copy) " in upscaled

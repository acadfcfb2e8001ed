"""Every kind of input a real folder holds, through `mgdedup index` end to end: each good image
is indexed exactly once, each bad file is listed in errors.jsonl with a readable reason, the
run never stops. (Formats at unit level: tests/test_imageio.py; this goes through the CLI.)"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import mgdedup.index.build
from mgdedup.cli import app
from mgdedup.index.store import IndexStore

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def scene(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Asymmetric 16 px colour blocks: JPEG friendly, and any rotation shows."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _build_corpus(folder: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Writes the files; returns good name -> upright (width, height) and bad name -> a
    substring of its expected reason."""
    folder.mkdir()
    good: dict[str, tuple[int, int]] = {}
    bad: dict[str, str] = {}

    def keep(name: str, image: Image.Image, size: tuple[int, int] | None = None, **kw) -> None:
        image.save(folder / name, **kw)
        good[name] = size or image.size

    # broken or not images at all
    scene(seed=1).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    bad["truncated.jpg"] = "truncated JPEG"
    (folder / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "not an image (empty file)"
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n")
    bad["notes.jpg"] = "not an image (text file with .jpg extension)"
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))
    bad["bomb.png"] = "image too large: 100000x100000 pixels"
    (folder / "readme.txt").write_text("not an image and not named like one: ignored\n")

    # pixel modes and containers
    keep("png_as.dat", scene(seed=2), format="PNG")
    rgba = scene(seed=3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    keep("alpha.png", rgba)
    palette = scene(seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    keep("palette_transparent.png", palette, transparency=0)
    ramp = (np.arange(96 * 64, dtype=np.uint32).reshape(64, 96) * 10).astype(np.uint16)
    keep("grey16.png", Image.fromarray(ramp))
    keep("bilevel.png", scene(seed=5).convert("1"))
    keep("cmyk.jpg", scene(seed=6).convert("CMYK"))
    keep("progressive.jpg", scene(seed=7), progressive=True, quality=85)
    frames = [scene(seed=s).convert("P") for s in (8, 9, 10)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:],
                   duration=100, loop=0)
    good["animated.gif"] = frames[0].size
    keep("image.webp", scene(seed=11), quality=80)
    keep("image.tiff", scene(seed=12), compression="tiff_lzw")
    keep("image.bmp", scene(seed=13))
    keep("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    keep("café 写真.png", scene(seed=14))
    keep("with space.jpg", scene(seed=15))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        upright = (64, 96) if orientation >= 5 else (96, 64)
        keep(f"exif_{orientation}.jpg", scene(seed=20 + orientation), upright, exif=exif)

    # file system oddities
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    bad["loop_a.jpg"] = bad["loop_b.jpg"] = "symlink loop"
    (folder / "sub").mkdir()
    keep("sub/nested.png", scene(seed=30))
    os.symlink("..", folder / "sub" / "up")  # a directory loop: never followed
    locked = folder / "locked.png"
    scene(seed=31).save(locked)
    locked.chmod(0)
    if IS_ROOT:  # root reads anything: it is just an image then
        good["locked.png"] = (96, 64)
    else:
        bad["locked.png"] = "permission denied"
    scene(seed=32).save(folder / "vanishing.png")
    bad["vanishing.png"] = "file disappeared"
    return good, bad


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    good, bad = _build_corpus(folder)
    original = mgdedup.index.build.scan_images

    def scan_then_delete(*args, **kwargs):
        found = original(*args, **kwargs)
        (folder / "vanishing.png").unlink()  # gone between scan and decode
        return found

    monkeypatch.setattr(mgdedup.index.build, "scan_images", scan_then_delete)
    yield folder.resolve(), good, bad
    (folder / "locked.png").chmod(0o644)  # let pytest clean up


def test_every_input_is_indexed_once_or_listed_with_a_reason(corpus):
    folder, good, bad = corpus
    result = runner.invoke(app, ["index", str(folder), "--resolution", "224",
                                 "--workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"{len(good)} indexed, {len(bad)} skipped" in result.stderr, result.stderr

    with IndexStore.open(folder / ".mgdedup" / "embeddings.h5") as store:
        rels = list(store.read("paths"))
        sizes = dict(zip(rels, zip(store.read("width").tolist(),
                                   store.read("height").tolist())))
        assert len(store) == len(good)
    assert sorted(rels) == sorted(good)  # every good image exactly once, nothing else
    assert sizes == good  # upright sizes: EXIF orientation applied

    lines = (folder / ".mgdedup" / "errors.jsonl").read_text(encoding="utf-8").splitlines()
    errors = [json.loads(line) for line in lines]
    reasons = {Path(e["path"]).relative_to(folder).as_posix(): e["reason"] for e in errors}
    assert len(reasons) == len(errors)  # each bad file once
    assert set(reasons) == set(bad)
    for name, expected in bad.items():
        reason = reasons[name]
        assert reason.strip() and "\n" not in reason and "Traceback" not in reason
        assert expected in reason, (name, reason)

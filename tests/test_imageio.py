"""Reading images: formats by content, every pixel mode to RGB, EXIF orientation, draft
decoding, and readable reasons for broken files. All images are generated here."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageFile, ImageOps

from mgdedup.errors import MgdedupError
from mgdedup.imaging import reading
from mgdedup.imaging.reading import ImageReadError, open_rgb, sniff_bytes, sniff_format

RED, WHITE, BLACK = (255, 0, 0), (255, 255, 255), (0, 0, 0)


def scene(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Asymmetric blocks of colour (16 px, JPEG friendly) so any flip or rotation shows."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))
    return Image.fromarray(pixels)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# --------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize("ext, kwargs, expected", [
    ("jpg", {}, "jpeg"), ("png", {}, "png"), ("gif", {}, "gif"), ("bmp", {}, "bmp"),
    ("tif", {}, "tiff"), ("webp", {}, "webp"), ("ico", {}, "ico"), ("ppm", {}, "ppm"),
    ("jp2", {}, "jp2"), ("avif", {}, "avif"), ("tif", {"compression": "tiff_lzw"}, "tiff"),
])
def test_sniff_generated_files(tmp_path, ext, kwargs, expected):
    path = tmp_path / f"image.{ext}"
    scene().save(path, **kwargs)
    assert sniff_format(path) == expected
    renamed = path.rename(tmp_path / "image.dat")  # the name plays no part
    assert sniff_format(renamed) == expected


def test_sniff_grey_and_bilevel_netpbm(tmp_path):
    scene().convert("L").save(tmp_path / "a.pgm")
    scene().convert("1").save(tmp_path / "a.pbm")
    assert sniff_format(tmp_path / "a.pgm") == "pgm"
    assert sniff_format(tmp_path / "a.pbm") == "pbm"


def test_sniff_big_endian_tiff_and_iso_bmff_brands():
    assert sniff_bytes(b"MM\x00*\x00\x00\x00\x08" + bytes(24)) == "tiff"
    ftyp = b"\x00\x00\x00\x18ftyp"
    assert sniff_bytes(ftyp + b"heic\x00\x00\x00\x00mif1heic") == "heic"
    assert sniff_bytes(ftyp + b"mif1\x00\x00\x00\x00mif1heic") == "heic"
    assert sniff_bytes(ftyp + b"avif\x00\x00\x00\x00avifmif1") == "avif"
    assert sniff_bytes(ftyp + b"mif1\x00\x00\x00\x00mif1miaf") == "heif"
    assert sniff_bytes(ftyp + b"isom\x00\x00\x02\x00isomiso2") is None  # an MP4 video
    assert sniff_bytes(ftyp + b"crx \x00\x00\x00\x01crx isom") is None  # a Canon CR3 raw
    assert sniff_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(20)) == "jp2"


@pytest.mark.parametrize("head", [
    b"", b"hello world, this is text", b"BM but not a bitmap, just prose",
    b"P1 is a nice parking spot", b"\x00\x00\x01\x00\x00\x00" + bytes(30),
    b"RIFF\x00\x00\x00\x00WAVE",
])
def test_sniff_rejects_lookalikes(head):
    assert sniff_bytes(head) is None


# --------------------------------------------------------------------------- pixel modes


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128)])
    img.save(tmp_path / "a.png")
    rgb, size = open_rgb(tmp_path / "a.png")
    assert rgb.mode == "RGB" and size == (3, 1)
    assert rgb.getpixel((0, 0)) == RED
    assert rgb.getpixel((1, 0)) == WHITE  # not the stored red, not black
    r, g, b = rgb.getpixel((2, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_light_content_on_transparency_is_flattened_onto_black(tmp_path):
    # a white design drawn only in the alpha channel (as desktop overlays and logos are):
    # on white it would vanish, and two different designs would be the same blank page
    img = Image.new("RGBA", (4, 1), (255, 255, 255, 0))
    img.putdata([(255, 255, 255, 0), (255, 255, 255, 255), (255, 255, 255, 51),
                 (250, 250, 250, 0)])
    img.save(tmp_path / "overlay.png")
    rgb, _ = open_rgb(tmp_path / "overlay.png")
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [BLACK, WHITE, (51, 51, 51), BLACK]

    other = Image.new("RGBA", (4, 1), (255, 255, 255, 0))
    other.putdata([(255, 255, 255, 255)] + [(255, 255, 255, 0)] * 3)
    other.save(tmp_path / "other.png")
    assert open_rgb(tmp_path / "other.png")[0].tobytes() != rgb.tobytes()


def test_dark_content_on_transparency_stays_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(200, 200, 200, 255), (10, 10, 10, 255), (0, 0, 0, 0)])  # mean grey 105
    img.save(tmp_path / "logo.png")
    rgb, _ = open_rgb(tmp_path / "logo.png")
    assert rgb.getpixel((2, 0)) == WHITE


def test_la_and_pa_transparent_pixels_are_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])
    la.save(tmp_path / "la.png")
    rgb, _ = open_rgb(tmp_path / "la.png")
    assert rgb.getpixel((0, 0)) == BLACK and rgb.getpixel((1, 0)) == WHITE

    pa = Image.new("RGBA", (2, 1))
    pa.putdata([(0, 0, 255, 255), (0, 0, 255, 0)])
    pa = pa.convert("P").convert("PA")
    pa.putpixel((1, 0), (pa.getpixel((0, 0))[0], 0))
    pa.save(tmp_path / "pa.tif")
    with Image.open(tmp_path / "pa.tif") as check:
        assert check.mode == "PA"
    rgb, _ = open_rgb(tmp_path / "pa.tif")
    assert rgb.getpixel((0, 0)) == (0, 0, 255) and rgb.getpixel((1, 0)) == WHITE


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_and_without_transparency(tmp_path, ext):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    img.save(tmp_path / f"opaque.{ext}")
    img.save(tmp_path / f"clear.{ext}", transparency=2)
    opaque, _ = open_rgb(tmp_path / f"opaque.{ext}")
    assert [opaque.getpixel((x, 0)) for x in range(3)] == [RED, (0, 255, 0), BLACK]
    clear, _ = open_rgb(tmp_path / f"clear.{ext}")
    assert [clear.getpixel((x, 0)) for x in range(3)] == [RED, (0, 255, 0), WHITE]


def test_rgb_with_transparent_colour_key(tmp_path):
    img = Image.new("RGB", (2, 1))
    img.putdata([RED, (0, 0, 255)])
    img.save(tmp_path / "key.png", transparency=(0, 0, 255))
    rgb, _ = open_rgb(tmp_path / "key.png")
    assert rgb.getpixel((0, 0)) == RED and rgb.getpixel((1, 0)) == WHITE


def test_cmyk_jpeg_and_tiff(tmp_path):
    # Pillow writes CMYK JPEGs the Adobe way (inverted, APP14 marker), as Photoshop does
    cmyk = Image.new("CMYK", (32, 16), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (16, 0, 32, 16))  # pure black
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tif")
    with Image.open(tmp_path / "c.jpg") as check:
        assert check.mode == "CMYK" and "adobe" in check.info
    for name in ("c.jpg", "c.tif"):
        rgb, _ = open_rgb(tmp_path / name)
        cyan = np.asarray(rgb)[4:12, 4:12].reshape(-1, 3).mean(axis=0)
        black = np.asarray(rgb)[4:12, 20:28].reshape(-1, 3).mean(axis=0)
        assert np.abs(cyan - (0, 255, 255)).max() < 4, name
        assert np.abs(black).max() < 4, name


def test_sixteen_bit_ramp_uses_full_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as check:
        assert check.mode.startswith("I")
    rgb, _ = open_rgb(tmp_path / "ramp.png")
    grey = np.asarray(rgb)[0, :, 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey) >= 0)
    assert np.abs(grey - ramp[0] / 257).max() <= 1  # the same mapping as 8-bit copies
    assert np.array_equal(np.asarray(rgb)[..., 0], np.asarray(rgb)[..., 2])


def test_sixteen_bit_big_endian_and_twelve_bit_data(tmp_path):
    ramp = np.linspace(0, 4095, 256).astype(np.uint16).reshape(1, 256)  # 12-bit sensor data
    img = Image.frombytes("I;16B", (256, 1), ramp.astype(">u2").tobytes())
    img.save(tmp_path / "twelve.tif")
    with Image.open(tmp_path / "twelve.tif") as check:
        assert check.mode == "I;16B"
    grey = np.asarray(open_rgb(tmp_path / "twelve.tif")[0])[0, :, 0]
    assert grey.min() == 0 and grey.max() == 255  # not near-black, not clipped


def test_thirty_two_bit_and_float(tmp_path):
    ints = Image.fromarray(np.linspace(0, 65535, 64).astype(np.int32).reshape(1, 64), mode="I")
    ints.save(tmp_path / "i.tif")
    unit = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64), mode="F")
    unit.save(tmp_path / "unit.tif")
    signed = Image.fromarray(np.linspace(-5, 5, 64, dtype=np.float32).reshape(1, 64), mode="F")
    signed.save(tmp_path / "signed.tif")
    for name in ("i.tif", "unit.tif", "signed.tif"):
        grey = np.asarray(open_rgb(tmp_path / name)[0])[0, :, 0]
        assert grey[0] == 0 and grey[-1] == 255, name
        assert np.all(np.diff(grey.astype(int)) >= 0), name


def test_bilevel_and_grey(tmp_path):
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.png")
    Image.new("L", (2, 1), 77).save(tmp_path / "grey.png")
    rgb, _ = open_rgb(tmp_path / "one.png")
    assert rgb.getpixel((0, 0)) == BLACK and rgb.getpixel((1, 0)) == WHITE
    assert open_rgb(tmp_path / "grey.png")[0].getpixel((1, 0)) == (77, 77, 77)


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_animation_gives_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / f"anim.{ext}", save_all=True, append_images=frames[1:],
                   duration=100, loop=0, lossless=True)
    with Image.open(tmp_path / f"anim.{ext}") as check:
        assert getattr(check, "n_frames", 1) == 3
    rgb, size = open_rgb(tmp_path / f"anim.{ext}")
    assert size == (16, 16)
    assert np.abs(pixels(rgb) - RED).max() <= 2


# --------------------------------------------------------------------------- EXIF orientation

# the transpose that turns an upright picture into what a camera stores with that tag
STORED = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


def save_oriented(upright: Image.Image, path: Path, orientation: int, **kwargs) -> None:
    stored = upright if STORED[orientation] is None else upright.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "tif"])
def test_exif_orientation(tmp_path, orientation, ext):
    upright = scene(96, 64)
    path = tmp_path / f"o{orientation}.{ext}"
    options = ({"quality": 95, "subsampling": 0} if ext == "jpg"
               else {"lossless": True} if ext == "webp" else {})
    save_oriented(upright, path, orientation, **options)
    rgb, size = open_rgb(path)
    assert size == (96, 64)
    assert rgb.size == (96, 64)
    tolerance = 3 if ext == "jpg" else 0
    assert np.abs(pixels(rgb) - pixels(upright)).mean() <= tolerance
    with Image.open(path) as reference:  # agrees with Pillow's own exif_transpose
        expected = ImageOps.exif_transpose(reference).convert("RGB")
    assert np.array_equal(pixels(rgb), pixels(expected))


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_draft_size_is_requested_in_upright_orientation(tmp_path, orientation):
    upright = photo(1600, 800)
    path = tmp_path / "big.jpg"
    save_oriented(upright, path, orientation, quality=90)
    rgb, size = open_rgb(path, min_size=(300, 100))
    assert size == (1600, 800)
    # width needs 1600 // 300 = 5 -> scale 1/4; a wrong axis order would pick 1/8 (200 wide)
    assert rgb.size == (400, 200)
    full, _ = open_rgb(path)
    assert full.size == (1600, 800)


# --------------------------------------------------------------------------- draft decoding


def test_draft_keeps_both_sides_large_enough(tmp_path):
    photo(1600, 1200).save(tmp_path / "p.jpg", quality=90)
    for needed in [(200, 150), (200, 151), (201, 150), (500, 100), (1600, 1200), (3000, 10)]:
        rgb, size = open_rgb(tmp_path / "p.jpg", min_size=needed)
        assert size == (1600, 1200)
        assert rgb.size[0] >= min(needed[0], 1600) and rgb.size[1] >= min(needed[1], 1200)
    assert open_rgb(tmp_path / "p.jpg", min_size=(200, 150))[0].size == (200, 150)
    assert open_rgb(tmp_path / "p.jpg", min_size=(201, 150))[0].size == (400, 300)
    # a function of the original size, as load_for_embedding passes it
    rgb, _ = open_rgb(tmp_path / "p.jpg", min_size=lambda s: (s[0] // 4, s[1] // 4))
    assert rgb.size == (400, 300)


def test_draft_close_to_full_decode_then_resize(tmp_path):
    photo(1600, 1200, seed=3).save(tmp_path / "p.jpg", quality=90)
    drafted, _ = open_rgb(tmp_path / "p.jpg", min_size=(400, 300))
    assert drafted.size == (400, 300)
    full, _ = open_rgb(tmp_path / "p.jpg")
    reference = full.resize((400, 300), Image.Resampling.BILINEAR)
    assert np.abs(pixels(drafted) - pixels(reference)).mean() < 3.0


def test_draft_lets_a_jpeg_above_the_limit_through(tmp_path, monkeypatch):
    photo(1600, 1200).save(tmp_path / "p.jpg", quality=80)
    monkeypatch.setattr(reading, "MAX_PIXELS", 1_000_000)
    rgb, size = open_rgb(tmp_path / "p.jpg", min_size=(400, 300))
    assert rgb.size == (400, 300) and size == (1600, 1200)
    with pytest.raises(ImageReadError, match=r"image too large: 1600x1200 pixels"):
        open_rgb(tmp_path / "p.jpg")


# --------------------------------------------------------------------------- broken files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data gets decoded (a bomb must be stopped at the header)."""
    def refuse(self):
        raise AssertionError(f"decoded a {self.size} image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_huge_png_header_is_refused_before_decoding(tmp_path, no_decoding):
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageReadError, match=r"^image too large: 100000x100000 pixels$"):
        open_rgb(tmp_path / "bomb.png")
    with pytest.raises(ImageReadError, match="too large"):
        open_rgb(tmp_path / "bomb.png", min_size=(224, 224))  # no draft for PNG


def test_lowered_limit_applies_to_other_formats(tmp_path, monkeypatch):
    scene(96, 64).save(tmp_path / "a.webp")
    monkeypatch.setattr(reading, "MAX_PIXELS", 96 * 64 - 1)
    with pytest.raises(ImageReadError, match=r"image too large: 96x64 pixels"):
        open_rgb(tmp_path / "a.webp")


def test_pillow_bomb_error_becomes_image_read_error(tmp_path, monkeypatch):
    # a GIF whose frame is larger than its declared screen: Pillow checks it while reading
    scene(32, 32).save(tmp_path / "a.gif")
    data = bytearray((tmp_path / "a.gif").read_bytes())
    data[6:10] = struct.pack("<HH", 1, 1)
    (tmp_path / "a.gif").write_bytes(bytes(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match=r"^image too large: 1024 pixels$"):
        open_rgb(tmp_path / "a.gif")


def test_truncated_jpeg(tmp_path):
    photo(640, 480).save(tmp_path / "p.jpg", quality=90)
    data = (tmp_path / "p.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"^truncated JPEG$"):
        open_rgb(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match=r"^truncated JPEG$"):
        open_rgb(tmp_path / "cut.jpg", min_size=(80, 60))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
    photo(320, 240).save(tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"truncated PNG|corrupt PNG"):
        open_rgb(tmp_path / "cut.png")


def test_corrupt_png_data(tmp_path):
    header = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", b"this is not zlib data at all") + png_chunk(b"IEND", b""))
    (tmp_path / "bad.png").write_bytes(data)
    with pytest.raises(ImageReadError, match=r"^corrupt PNG \(.+\)$"):
        open_rgb(tmp_path / "bad.png")


def test_header_only_jpeg(tmp_path):
    (tmp_path / "stub.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(20))
    with pytest.raises(ImageReadError, match=r"JPEG"):
        open_rgb(tmp_path / "stub.jpg")


def test_empty_text_and_unknown_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "fake.jpg").write_text("<html>not found</html>\n")
    (tmp_path / "blob.png").write_bytes(bytes(range(256)))
    with pytest.raises(ImageReadError, match=r"^not an image \(empty file\)$"):
        open_rgb(tmp_path / "empty.jpg")
    with pytest.raises(ImageReadError,
                       match=r"^not an image \(text file with \.jpg extension\)$"):
        open_rgb(tmp_path / "fake.jpg")
    with pytest.raises(ImageReadError, match=r"^not an image \(unknown format"):
        open_rgb(tmp_path / "blob.png")


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(ImageReadError, match=r"^file disappeared$"):
        open_rgb(tmp_path / "gone.jpg")
    with pytest.raises(ImageReadError, match=r"^is a directory$"):
        open_rgb(tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(reading, "open_regular", denied)
    with pytest.raises(ImageReadError, match=r"^permission denied$"):
        open_rgb(tmp_path / "any.jpg")


def test_heic_without_pillow_heif(tmp_path, monkeypatch):
    monkeypatch.delitem(Image.OPEN, "HEIF", raising=False)
    monkeypatch.setattr(reading, "_register_heif", lambda: None)  # as if not installed
    (tmp_path / "IMG_0001.HEIC").write_bytes(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100))
    with pytest.raises(ImageReadError,
                       match=r"^unsupported format heic \(install mgdedup\[heif\]\)$"):
        open_rgb(tmp_path / "IMG_0001.HEIC")


def test_error_is_user_facing():
    assert issubclass(ImageReadError, MgdedupError)
    assert ImageReadError("truncated JPEG").reason == "truncated JPEG"

"""Which image format a file holds, from its first bytes only, without Pillow or numpy: the
scan and `classify` tell a text file named `.jpg` (or a missing one) before anything heavy is
imported or a model loads. `mgdedup.imaging.reading` decodes what this recognises."""

from __future__ import annotations

import struct
from pathlib import Path

HEAD_BYTES = 64
"""Bytes read to recognise a format (an ISO BMFF `ftyp` box needs more than 16)."""

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_GENERIC_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2", b"miaf"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_ICO_BPP = {0, 1, 2, 4, 8, 16, 24, 32}
_WHITESPACE = b" \t\r\n"
_NETPBM = dict(zip(b"123456Ff", ("pbm", "pgm", "ppm", "pbm", "pgm", "ppm", "pfm", "pfm")))


def sniff_format(path: str | Path) -> str | None:
    """Image format of `path` from its first bytes ("jpeg", "png", ...), or None.

    One small read: cheap enough to run on every file of a scanned folder. OSError (missing,
    unreadable) propagates so that callers can tell "not an image" from "cannot read".
    """
    with open(path, "rb") as fp:
        return sniff_bytes(fp.read(HEAD_BYTES))


def sniff_bytes(head: bytes) -> str | None:
    """Format name from the first bytes of a file (see `sniff_format`)."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return "jp2"
    if head[:4] == b"\xff\x4f\xff\x51":
        return "j2k"
    if head[:2] == b"BM" and len(head) >= 18 and (
            struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES):
        return "bmp"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and _looks_like_ico(head):
        return "ico" if head[2] == 1 else "cur"
    if len(head) >= 4 and head[0] == ord("P") and head[1] in _NETPBM and head[2] in _WHITESPACE:
        rest = head[3:].lstrip(_WHITESPACE)
        if rest[:1].isdigit() or rest[:1] == b"#":  # width or a comment must follow
            return _NETPBM[head[1]]
    return None


def _sniff_ftyp(head: bytes) -> str | None:
    """HEIC / HEIF / AVIF from the brands of an ISO BMFF `ftyp` box; None for video, CR3..."""
    box_end = min(len(head), max(16, struct.unpack_from(">I", head, 0)[0]))
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, box_end - 3, 4)}
    if head[8:12] in _AVIF_BRANDS or (head[8:12] not in _HEIF_BRANDS and brands & _AVIF_BRANDS):
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heic"
    if head[8:12] in _GENERIC_HEIF_BRANDS:
        return "heif"
    return None


def _looks_like_ico(head: bytes) -> bool:
    """The 4-byte ICO magic is weak; also check the count and the first directory entry."""
    if len(head) < 22:
        return False
    count, = struct.unpack_from("<H", head, 4)
    reserved = head[9]
    planes, bpp = struct.unpack_from("<HH", head, 10)
    if head[2] == 2:  # CUR: hotspot instead of planes / bpp
        return 1 <= count <= 256 and reserved == 0
    return 1 <= count <= 256 and reserved == 0 and planes in (0, 1) and bpp in _ICO_BPP


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    for cut in range(4):  # the head may end inside a multi-byte UTF-8 character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    return all(ch.isprintable() or ch in "\t\n\r\f\v\ufeff" for ch in text)


def not_image_reason(path: str | Path, head: bytes) -> str:
    """Why a file whose content matched no image format is not one, e.g. for a scan report."""
    suffix = Path(path).suffix.lower()
    where = f" with {suffix} extension" if suffix else ""
    if not head:
        return "not an image (empty file)"
    if _looks_like_text(head):
        return f"not an image (text file{where})"
    return f"not an image (unknown format{where})"


def probe(path: str | Path) -> str | None:
    """Why `path` cannot be an image file, from its type and first bytes only, or None when it
    may be one: what a command checks before it loads a model (decoding can still fail)."""
    from mgdedup.files.regular import read_head

    try:
        _, head = read_head(Path(path), HEAD_BYTES)
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot read ({error.strerror or error})"
    if sniff_bytes(head) is None:
        return not_image_reason(path, head)
    return None

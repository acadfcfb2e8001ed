"""JPEG decoders for `index`: Pillow's draft mode against simplejpeg and PyTurboJPEG.

Usage: python benchmarks/jpeg_decoders.py [--source ../shared/photos] [--images 24]
       [--resolutions 224,500] [--repeats 3] [--json out.json]

Each decoder reads the same 12 MP JPEGs (made as `embed_throughput.py` makes them: photos
upscaled to 4000x3000 with film grain, q90) to the smallest DCT scale whose sides stay >= what
`index` needs at s* (`decode_size_for`), one image at a time on one thread, from bytes already
in memory (the file read is the same for all). Reported per decoder and s*: milliseconds per
image (best of `repeats` passes), the decoded size, and the largest and mean absolute pixel
difference from Pillow's draft decode (what `index` runs today). Decoders that are not
installed are listed as such; PyTurboJPEG also needs the libturbojpeg shared library.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_throughput import make_images  # noqa: E402

from mgdedup.imaging.transforms import decode_size_for  # noqa: E402

#: DCT scales libjpeg offers in draft mode (Pillow) and that we ask of the others
SCALES = (8, 4, 2, 1)


def draft_scale(size: tuple[int, int], needed: tuple[int, int]) -> int:
    """The largest 1/scale whose sides stay >= `needed` (what Pillow's draft picks)."""
    for scale in SCALES:
        if -(-size[0] // scale) >= needed[0] and -(-size[1] // scale) >= needed[1]:
            return scale
    return 1


def pillow_draft(data: bytes, needed: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", needed)
        return np.asarray(im.convert("RGB"))


def simplejpeg_decoder(fast: bool) -> Callable[[bytes, tuple[int, int]], np.ndarray] | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: bytes, needed: tuple[int, int]) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                                      min_width=needed[0], min_height=needed[1])
    return decode


def turbojpeg_decoder(fast: bool) -> Callable[[bytes, tuple[int, int]], np.ndarray] | None:
    try:
        import turbojpeg

        codec = turbojpeg.TurboJPEG()
    except (ImportError, OSError, RuntimeError):
        return None
    flags = (turbojpeg.TJFLAG_FASTDCT | turbojpeg.TJFLAG_FASTUPSAMPLE) if fast else 0

    def decode(data: bytes, needed: tuple[int, int]) -> np.ndarray:
        width, height, _, _ = codec.decode_header(data)
        scale = draft_scale((width, height), needed)
        return codec.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(1, scale),
                            flags=flags)
    return decode


def best_ms(decode: Callable[[bytes, tuple[int, int]], np.ndarray], files: list[bytes],
            needed: list[tuple[int, int]], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for data, size in zip(files, needed, strict=True):
            decode(data, size)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--resolutions", default="224,500")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    decoders: dict[str, Callable[[bytes, tuple[int, int]], np.ndarray] | None] = {
        "pillow draft": pillow_draft,
        "simplejpeg": simplejpeg_decoder(fast=False),
        "simplejpeg fastdct+fastupsample": simplejpeg_decoder(fast=True),
        "turbojpeg": turbojpeg_decoder(fast=False),
        "turbojpeg fastdct+fastupsample": turbojpeg_decoder(fast=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, args.source)
        files = [p.read_bytes() for p in paths]
    sizes = []
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            sizes.append(im.size)
    results = []
    for resolution in (int(r) for r in args.resolutions.split(",")):
        needed = [decode_size_for(size, resolution) for size in sizes]
        reference = [pillow_draft(d, n) for d, n in zip(files, needed, strict=True)]
        for name, decode in decoders.items():
            if decode is None:
                print(f"s*={resolution} {name}: not installed", file=sys.stderr)
                continue
            out = [decode(d, n) for d, n in zip(files, needed, strict=True)]
            same_shape = all(o.shape == r.shape for o, r in zip(out, reference, strict=True))
            diffs = [np.abs(o.astype(np.int16) - r.astype(np.int16))
                     for o, r in zip(out, reference, strict=True)] if same_shape else []
            row = {
                "resolution": resolution, "decoder": name,
                "ms_per_image": round(best_ms(decode, files, needed, args.repeats), 2),
                "decoded": "x".join(map(str, out[0].shape[1::-1])),
                "max_abs_diff": int(max(d.max() for d in diffs)) if diffs else None,
                "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 3)
                if diffs else None,
            }
            results.append(row)
            print(json.dumps(row))
    summary = {"date": date.today().isoformat(), "machine": platform.processor() or
               platform.machine(), "images": args.images, "file_size": "4000x3000 q90",
               "pillow_libjpeg_turbo": features.version("libjpeg_turbo"), "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

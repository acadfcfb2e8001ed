"""Copy sets that look like users' collections, for the decision benchmark and for fitting.

A copy set is a folder: `photos/` holds real photographs (every one of them a member of the
collection: look-alike shots of the same food or scene included, since those are what users
have), `copies/` holds copies made from some of them, under shuffled names, of every kind of
`mgdedup.imaging.edits` (the five planted edits and the DISC2021-style hard kinds made with
AugLy), and `truth.json` says which original each copy came from and how.

Photos are split by a hash of their path into disjoint parts, so what fits a whitening or a
score (the "fit" part) never appears in what is evaluated ("eval"); "pasted" copies are pasted
onto photos of a third part ("backgrounds") that is in neither. Part "all" takes every photo
of a folder the fitting never saw (an independent set, e.g. Debian's wallpapers), with its
"pasted" backgrounds from another folder; files that are one image at several sizes (a
wallpaper shipped per screen size) are declared by a pattern and form one family.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mgdedup.imaging.edits import COPY_QUALITY, EDITS, HARD_KINDS, make_hard_copy, shrunk
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.scan import scan_images

#: folders of ../shared/photos never used here (wallpapers and Tux Paint material are kept for
#: independent evaluation)
RESERVED = ("tuxpaint", "lxqt")
MILD_KINDS = ("crop", "jpeg30", "third", "mirror", "bright")
KINDS = (*HARD_KINDS, *MILD_KINDS)


def part_of(rel: str) -> str:
    """The part of the photos a file belongs to, by a hash of its path: 60 % fit, 32 % eval,
    8 % backgrounds."""
    bucket = int(hashlib.md5(rel.encode("utf-8", "surrogateescape")).hexdigest(), 16) % 25
    return "fit" if bucket < 15 else "eval" if bucket < 23 else "backgrounds"


def photos_of(root: Path, part: str, limit: int | None = None) -> list[Path]:
    files, _ = scan_images([root])
    chosen = [f.path for f in files if not any(p in RESERVED for p in Path(f.rel).parts)
              and (part == "all" or part_of(f.rel) == part)]
    return chosen[:limit] if limit else chosen


@dataclass
class CopySet:
    folder: Path
    photos: list[Path]  # every original and look-alike, as written in the set
    copies: list[tuple[Path, Path, str]]  # (copy, its original, kind)
    same: list[list[Path]] = field(default_factory=list)  # photos that are one image

    def family(self) -> dict[str, int]:
        """Absolute path -> family id (an original and its copies share one, and so do
        photos declared the same image)."""
        family = {str(p.resolve()): n for n, p in enumerate(self.photos)}
        for members in self.same:
            first = family[str(members[0].resolve())]
            for member in members[1:]:
                family[str(member.resolve())] = first
        for copy, original, _ in self.copies:
            family[str(copy.resolve())] = family[str(original.resolve())]
        return family

    def kind_of(self) -> dict[str, str]:
        return {str(c.resolve()): kind for c, _, kind in self.copies}


def _load(path: Path, limit: int = 1600) -> Image.Image | None:
    try:
        image, _ = open_rgb(path, None)
    except ImageReadError:
        return None
    return shrunk(image, limit // 3)  # copies of camera-size photos stay fast to make


def build_copy_set(source: Path, folder: Path, *, part: str, originals: int, per_kind: int,
                   seed: int = 0, kinds: tuple[str, ...] = KINDS, photos_limit: int | None = None,
                   backgrounds_from: Path | None = None, same: tuple[str, ...] = ()
                   ) -> CopySet:
    """Write a copy set of the photos of `part` below `folder` (see the module docstring):
    every photo of the part, and `per_kind` copies of each kind, made from `originals` photos
    drawn with `seed` (round robin over kinds, so each original has several kinds). "pasted"
    copies go onto the "backgrounds" part of `backgrounds_from` (default: `source`); photos
    whose relative paths match one of the regular expressions `same` identically are one image
    (the same picture at other sizes, a light and a dark edition of one design)."""
    rng = np.random.default_rng(seed)
    photos_dir, copies_dir = folder / "photos", folder / "copies"
    photos_dir.mkdir(parents=True, exist_ok=True)
    copies_dir.mkdir(parents=True, exist_ok=True)
    sources = photos_of(source, part, photos_limit)
    backgrounds = [image for image in (_load(p) for p in photos_of(
        backgrounds_from or source, "backgrounds")) if image is not None]
    written: list[Path] = []
    by_pattern: dict[tuple[int, str], list[Path]] = {}
    for path in sources:
        rel = path.relative_to(source.resolve())
        target = photos_dir / "__".join(rel.parts)
        shutil.copy2(path, target)
        written.append(target)
        for number, pattern in enumerate(same):
            found = re.search(pattern, rel.as_posix())
            if found:
                by_pattern.setdefault((number, found.group(0)), []).append(target)
                break
    picks = rng.choice(len(written), size=min(originals, len(written)), replace=False)
    jobs = [(kind, int(picks[(k * per_kind + n) % len(picks)]))
            for k, kind in enumerate(kinds) for n in range(per_kind)]
    order = rng.permutation(len(jobs))  # copy names say nothing of their kind or original
    copies: list[tuple[Path, Path, str]] = []
    cache: dict[int, Image.Image | None] = {}
    for number, job in enumerate(order):
        kind, index = jobs[int(job)]
        if index not in cache:
            cache = {index: _load(written[index])}  # one decoded original at a time
        image = cache[index]
        if image is None:
            continue
        if kind in EDITS:
            copy = EDITS[kind](image, rng).convert("RGB")
        else:
            copy = make_hard_copy(image, kind, rng, backgrounds)
        target = copies_dir / f"copy_{number:04d}.jpg"
        copy.save(target, quality=COPY_QUALITY)
        copies.append((target, written[index], kind))
    by_bytes: dict[str, list[Path]] = {}
    for target in written:  # byte-identical photos (a symlinked wallpaper) are one image too
        by_bytes.setdefault(hashlib.sha256(target.read_bytes()).hexdigest(), []).append(target)
    groups = _merged([m for m in [*by_pattern.values(), *by_bytes.values()] if len(m) > 1])
    truth = {"photos": [str(p) for p in written],
             "copies": [{"copy": str(c), "original": str(o), "kind": k} for c, o, k in copies],
             "same": [[str(p) for p in members] for members in groups]}
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    return CopySet(folder, written, copies, groups)


def _merged(groups: list[list[Path]]) -> list[list[Path]]:
    """Groups sharing a member, merged (a pattern group and a byte-identical pair)."""
    merged: list[list[Path]] = []
    for group in groups:
        overlapping = [m for m in merged if set(m) & set(group)]
        joined = list(dict.fromkeys([p for m in overlapping for p in m] + group))
        merged = [m for m in merged if m not in overlapping] + [joined]
    return merged


def load_copy_set(folder: Path) -> CopySet:
    truth = json.loads((folder / "truth.json").read_text())
    return CopySet(folder, [Path(p) for p in truth["photos"]],
                   [(Path(c["copy"]), Path(c["original"]), c["kind"]) for c in truth["copies"]],
                   [[Path(p) for p in members] for members in truth.get("same", [])])


def copy_set_folder(work: Path, name: str, originals: int, per_kind: int, seed: int) -> Path:
    """Where the benchmarks keep the copy set of these settings (one set, shared by them)."""
    return work / f"{name}-{originals}x{per_kind}-s{seed}"


def index_folder(folder: Path, spec: str, resolution: int, prefix: str = "") -> Path:
    """The index of a copy set for a model and resolution (`prefix`: a variant of it)."""
    return folder / f".mgdedup-{prefix}{Path(spec).stem}-{resolution}"


def load_or_build(source: Path, folder: Path, **build: object) -> CopySet:
    """The copy set in `folder`, built first (`build_copy_set(source, folder, **build)`)
    when it is not there yet."""
    if (folder / "truth.json").is_file():
        return load_copy_set(folder)
    started = time.perf_counter()
    copies = build_copy_set(source, folder, **build)
    print(f"built {folder}: {len(copies.photos)} photos, {len(copies.copies)} copies in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return copies

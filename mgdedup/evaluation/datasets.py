"""Loaders of the benchmark folders: paths and ground truth, no image is opened.

Each loader checks the layout and raises MgdedupError (one line naming the expected layout)
when the folder does not look like the dataset. File names are matched case-insensitively on
the extension; hidden files (".name") are ignored.

Accepted layouts:

* Holidays: ``root/jpg/NNNNNN.jpg`` (6-digit id). Group = id // 100; the query of a group is
  its lowest id. Optional rotation list: lines ``NNNNNN.jpg ANGLE`` (ANGLE an integer multiple
  of 90, the degrees the image must be turned; its sign convention is the list's, this loader
  only reads it); blank lines and lines starting with ``#`` are skipped.
* UKBench: ``root/full/ukbenchN.jpg`` or ``root/ukbenchN.jpg``, N any number of digits
  (``ukbench00010.jpg`` and ``ukbench10.jpg`` are both id 10, sorted numerically, never
  lexicographically). Group = N // 4; every group must have its 4 images.
* Copydays: originals in ``root/original/`` (or ``root/copydays_original/``) named
  ``NNNNNN.jpg``; strong edits in ``root/strong/`` (or ``root/copydays_strong/``) whose name
  starts with a 6-digit id (``200000.jpg``, ``200000_strong1.jpg``, ``200003.jpg``). An edit's
  original is the original with the same id if there is one, else the only original of the
  same block (id // 100, Copydays numbers the variants of image XXXX00 as XXXX01, XXXX02...).
  Queries = the strong edits; database = originals (sorted by id) then the distractors (all
  images below the distractor folder, recursively, sorted by relative path).
* ImageNet val: ImageFolder layout ``root/val/<class>/*`` or ``root/<class>/*``. Class index
  = position of the class folder in the sorted (by name, like torchvision's ImageFolder)
  list of all class folders, empty ones included, so that indices match a 1000-way model.
* Pairs (any folder + ground truth of copies): a JSON file ``{"groups": [["a.jpg",
  "edits/a_crop.jpg"], ["b.png", "b_copy.jpg", "c.jpg"], ...]}``, paths relative to DIR
  ('/'-separated). Every image below DIR (recursively) is in the set, sorted by relative path;
  images of one group are copies of each other, every other pair (an unlisted image included)
  is a non-copy. A group has at least 2 images and an image is in at most one group.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgdedup.errors import MgdedupError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}

_HOLIDAYS_NAME = re.compile(r"^(\d{6})\.jpe?g$", re.IGNORECASE)
_UKB_NAME = re.compile(r"^ukbench(\d+)\.jpe?g$", re.IGNORECASE)
_COPYDAYS_ORIGINAL = re.compile(r"^(\d{6})\.(jpe?g|png)$", re.IGNORECASE)
_COPYDAYS_EDIT = re.compile(r"^(\d{6})(\D.*)?\.(jpe?g|png)$", re.IGNORECASE)


@dataclass
class HolidaysSet:
    paths: list[Path]  # sorted by id
    groups: np.ndarray  # (N,) id // 100
    query_rows: np.ndarray  # (Q,) row of the lowest id of each group, in group order
    rotation: dict[Path, int] = field(default_factory=dict)  # path -> degrees (listed ones)


@dataclass
class UKBSet:
    paths: list[Path]  # sorted by number
    groups: np.ndarray  # (N,) number // 4


@dataclass
class CopydaysSet:
    database: list[Path]  # originals (sorted by id), then distractors
    queries: list[Path]  # strong edits, sorted by file name
    positive_of_query: np.ndarray  # (Q,) row in database of each query's original
    n_originals: int  # database[:n_originals] are the originals


@dataclass
class ImageNetVal:
    paths: list[Path]  # by class index, then file name
    labels: np.ndarray  # (N,) class index
    classes: list[str]  # class folder names, sorted; classes[i] is index i


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _folder(root: Path, expected: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise MgdedupError(f"{root} is not a folder; expected {expected}")
    return root


def load_holidays(root: Path | str, rotate_file: Path | str | None = None) -> HolidaysSet:
    """INRIA Holidays below `root` (see the module docstring for the layout)."""
    expected = "root/jpg/NNNNNN.jpg (INRIA Holidays, 6-digit ids)"
    root = _folder(Path(root), expected)
    folder = root / "jpg"
    if not folder.is_dir():
        raise MgdedupError(f"no jpg/ folder in {root}; expected {expected}")
    named = _files_by_number(folder, _HOLIDAYS_NAME, "Holidays")
    if not named:
        raise MgdedupError(f"no NNNNNN.jpg image in {folder}; expected {expected}")
    ids = np.array(sorted(named))
    paths = [named[i] for i in ids]
    groups = ids // 100
    _, query_rows = np.unique(groups, return_index=True)  # first (lowest id) row per group
    rotation = _read_rotation(Path(rotate_file), {p.name: p for p in paths}) \
        if rotate_file is not None else {}
    return HolidaysSet(paths, groups, query_rows.astype(np.int64), rotation)


def _read_rotation(path: Path, by_name: dict[str, Path]) -> dict[Path, int]:
    expected = "lines 'NNNNNN.jpg ANGLE' with ANGLE a multiple of 90"
    if not path.is_file():
        raise MgdedupError(f"rotation list {path} not found; expected {expected}")
    rotation = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            name, angle = parts[0], int(parts[1])
            if len(parts) != 2 or angle % 90:
                raise ValueError
        except (ValueError, IndexError):
            raise MgdedupError(f"{path}:{number}: {line!r} is not {expected}") from None
        name = Path(name).name
        if name not in by_name:
            raise MgdedupError(f"{path}:{number}: {name} is not a Holidays image of the set")
        rotation[by_name[name]] = angle
    return rotation


def load_ukb(root: Path | str) -> UKBSet:
    """UKBench (University of Kentucky Benchmark) below `root`; groups of 4 consecutive ids."""
    expected = "root/full/ukbenchNNNNN.jpg or root/ukbenchNNNNN.jpg, 4 images per object"
    root = _folder(Path(root), expected)
    for folder in (root / "full", root):
        if not folder.is_dir():
            continue
        named = _files_by_number(folder, _UKB_NAME, "UKBench")
        if named:
            break
    else:
        raise MgdedupError(f"no ukbenchNNNNN.jpg image in {root}; expected {expected}")
    numbers = np.array(sorted(named))
    if len(numbers) % 4:
        raise MgdedupError(f"{len(numbers)} UKBench images in {folder}, not a multiple of 4; "
                           f"expected {expected}")
    groups = numbers // 4
    values, counts = np.unique(groups, return_counts=True)
    if (counts != 4).any():
        bad = int(values[counts != 4][0])
        raise MgdedupError(f"UKBench group {bad} (ukbench{4 * bad:05d}-{4 * bad + 3:05d}) has "
                           f"{int(counts[counts != 4][0])} images in {folder}; expected "
                           f"{expected}")
    return UKBSet([named[n] for n in numbers], groups)


def _files_by_number(folder: Path, pattern: re.Pattern[str], kind: str) -> dict[int, Path]:
    """{number: file} for the files whose name `pattern` matches (group 1 = the number);
    two files with one number make the ground truth ambiguous, so they are refused."""
    named: dict[int, Path] = {}
    for path in _files(folder):
        match = pattern.match(path.name)
        if match:
            number = int(match[1])
            if number in named:
                raise MgdedupError(f"{path.name} and {named[number].name} have the same {kind} "
                                   f"number in {folder}")
            named[number] = path
    return named


def _subfolder(root: Path, names: tuple[str, ...], expected: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise MgdedupError(f"no {' or '.join(n + '/' for n in names)} folder in {root}; "
                       f"expected {expected}")


def load_copydays(root: Path | str, distractors: Path | str | None = None) -> CopydaysSet:
    """Copydays strong edits as queries against originals (+ distractors, e.g. 10k Flickr)."""
    expected = ("root/original/NNNNNN.jpg and root/strong/NNNNNN*.jpg (an edit's name starts "
                "with its original's 6-digit id or block)")
    root = _folder(Path(root), expected)
    original_folder = _subfolder(root, ("original", "copydays_original"), expected)
    strong_folder = _subfolder(root, ("strong", "copydays_strong"), expected)
    originals = _files_by_number(original_folder, _COPYDAYS_ORIGINAL, "Copydays original")
    if not originals:
        raise MgdedupError(f"no NNNNNN.jpg original in {original_folder}; expected {expected}")
    ids = sorted(originals)
    row_of_id = {i: row for row, i in enumerate(ids)}
    rows_of_block: dict[int, list[int]] = {}
    for i in ids:
        rows_of_block.setdefault(i // 100, []).append(row_of_id[i])
    queries, positives = [], []
    for path in _files(strong_folder):
        match = _COPYDAYS_EDIT.match(path.name)
        if not match:
            continue
        edit_id = int(match[1])
        if edit_id in row_of_id:
            row = row_of_id[edit_id]
        elif len(rows_of_block.get(edit_id // 100, [])) == 1:
            row = rows_of_block[edit_id // 100][0]
        else:
            found = len(rows_of_block.get(edit_id // 100, []))
            raise MgdedupError(f"strong edit {path.name}: {found} originals with id {match[1]} "
                               f"or block {edit_id // 100:04d}xx, need exactly 1; expected "
                               f"{expected}")
        queries.append(path)
        positives.append(row)
    if not queries:
        raise MgdedupError(f"no NNNNNN*.jpg edit in {strong_folder}; expected {expected}")
    database = [originals[i] for i in ids]
    if distractors is not None:
        folder = Path(distractors)
        if not folder.is_dir():
            raise MgdedupError(f"distractor folder {folder} not found; expected a folder of "
                               "images (searched recursively)")
        extra = sorted((p for p in folder.rglob("*") if p.is_file()
                        and p.suffix.lower() in IMAGE_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                       key=lambda p: p.relative_to(folder).as_posix())
        if not extra:
            raise MgdedupError(f"no image in distractor folder {folder}")
        database += extra
    return CopydaysSet(database, queries, np.array(positives, dtype=np.int64), len(ids))


def load_imagenet_val(root: Path | str) -> ImageNetVal:
    """ImageNet validation set in ImageFolder layout (class folders of images)."""
    expected = "root/val/<class>/<image> or root/<class>/<image> (ImageFolder layout)"
    root = _folder(Path(root), expected)
    folder = root / "val" if (root / "val").is_dir() else root
    classes = sorted(p.name for p in folder.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = sum(1 for p in _files(folder) if p.suffix.lower() in IMAGE_SUFFIXES)
        hint = (f" ({loose} loose images: sort them into one folder per class first)"
                if loose else "")
        raise MgdedupError(f"no class folder in {folder}{hint}; expected {expected}")
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in _files(folder / name):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    if not paths:
        raise MgdedupError(f"no image in the {len(classes)} class folders of {folder}; "
                           f"expected {expected}")
    return ImageNetVal(paths, np.array(labels, dtype=np.int64), classes)


@dataclass
class PairsSet:
    paths: list[Path]  # every image below DIR, sorted by relative path
    groups: np.ndarray  # (N,) group id: listed groups 0..G-1, then one id per unlisted image
    n_groups: int  # listed groups


def load_pairs(ground_truth: Path | str, root: Path | str) -> PairsSet:
    """A folder of images and a JSON ground truth of copy groups (module docstring)."""
    expected = 'a JSON file {"groups": [["a.jpg", "a_copy.jpg"], ...]} with paths relative to DIR'
    ground_truth, root = Path(ground_truth), _folder(Path(root), "a folder of images")
    if not ground_truth.is_file():
        raise MgdedupError(f"ground truth {ground_truth} not found; expected {expected}")
    try:
        data = json.loads(ground_truth.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise MgdedupError(f"{ground_truth} is not JSON ({first_line(error)}); "
                           f"expected {expected}") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
        raise MgdedupError(f"{ground_truth} has no list of groups; expected {expected}")
    images = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
              and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    group_of: dict[str, int] = {}
    for number, members in enumerate(groups):
        if len(members) < 2:
            raise MgdedupError(f"{ground_truth}: group {number + 1} has {len(members)} image(s), "
                               "a group of copies needs at least 2")
        for name in members:
            rel = Path(name).as_posix()
            if rel not in images:
                if (root / rel).is_file():  # listed, not an image suffix: trust the list
                    images[rel] = root / rel
                else:
                    raise MgdedupError(f"{ground_truth}: group {number + 1}: {name} is not "
                                       f"an image in {root}")
            if rel in group_of:
                raise MgdedupError(f"{ground_truth}: {name} is in groups {group_of[rel] + 1} "
                                   f"and {number + 1}; an image is in at most one group")
            group_of[rel] = number
    names = sorted(images)
    next_id = iter(range(len(groups), len(groups) + len(names)))
    ids = [group_of[n] if n in group_of else next(next_id) for n in names]
    return PairsSet([images[n] for n in names], np.array(ids, dtype=np.int64), len(groups))

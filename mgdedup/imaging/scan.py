"""Finding the images below some folders.

Images are recognised by content, not by name: a photo saved as `.dat` is indexed, a text file
named `.jpg` is reported. Directory symlinks are not followed (no loops, no file counted twice
through a link); symlinks to files are. Nothing here raises for one bad file: unreadable
entries come back as (path, reason) for the index's error list.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mgdedup.files.regular import NotRegularFile, read_head
from mgdedup.files.roots import check_roots
from mgdedup.imaging.reading import HEAD_BYTES, not_image_reason, sniff_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".heic", ".heif", ".hif", ".avif", ".ico", ".cur", ".ppm", ".pgm", ".pbm", ".pnm",
    ".pfm", ".jp2", ".j2k", ".jpf", ".jpx",
})
"""Extensions that claim an image: such a file that is not one is reported, not ignored."""

RAW_EXTENSIONS = frozenset({
    ".dng", ".cr2", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".pef", ".3fr", ".erf", ".kdc",
    ".mef", ".mos", ".iiq", ".srw", ".rwl",
})
"""Camera raw files built on TIFF: their content sniffs as TIFF, but Pillow would only see a
thumbnail or fail, so they are left alone rather than matched against their own JPEGs."""



@dataclass(frozen=True)
class ScannedFile:
    """One image found by a scan; `rel` (posix) is how the index names it below `root`."""

    root: Path  # absolute, resolved
    path: Path  # absolute: root / rel (a symlinked file keeps its own name)
    rel: str
    size: int
    mtime_ns: int


Known = Mapping[tuple[str, str], tuple[int, int]]
"""(root, rel) -> (size, mtime_ns) of files already indexed: see `scan_images`."""


def scan_images(roots: Sequence[Path], *, skip_dirs: Sequence[str] = (".mgdedup",),
                known: Known | None = None) -> tuple[list[ScannedFile], list[tuple[Path, str]]]:
    """Images below `roots` sorted by (root, rel), and (path, reason) for the problems.

    A root may be a single image file (its root is then its folder). A missing root raises
    MgdedupError; everything else that goes wrong becomes a problem entry.
    `known`: files whose size and mtime still match were images when indexed and have not
    changed, so they are only stat'ed, not opened: a re-run over an unchanged collection
    costs one stat per file.
    """
    check_roots(roots)
    found: dict[str, ScannedFile] = {}
    problems: list[tuple[Path, str]] = []
    skip = frozenset(skip_dirs)
    for given in roots:
        given = Path(given).expanduser()
        if not given.exists():  # a dangling link (check_roots refused any other)
            problems.append((given, _dangling_reason(given)))
            continue
        explicit = not given.is_dir()  # a file named on the command line is always reported
        if not explicit:
            root = given.resolve()
            candidates = _walk(root, skip, problems)
        else:
            root = given.absolute().parent.resolve()
            candidates = iter([os.path.join(root, given.name)])
        for path in candidates:
            item = _examine(root, path, problems, explicit, known)
            if item is None:
                continue
            # overlapping roots: keep a file seen twice under the outermost root
            seen = found.get(path)
            if seen is None or len(item.root.parts) < len(seen.root.parts):
                found[path] = item
    files = sorted(found.values(), key=lambda f: (str(f.root), f.rel))
    problems.sort(key=lambda p: str(p[0]))
    log.debug("scan: %d images, %d problems", len(files), len(problems))
    return files, problems


def _walk(root: Path, skip: frozenset[str], problems: list[tuple[Path, str]]) -> Iterator[str]:
    """Regular files and file symlinks below root, depth first, without following dir links.
    Paths as str: a Path object per file costs more than the stat a re-run needs."""
    stack: list[str | Path] = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except PermissionError:
            problems.append((Path(folder), "permission denied"))
            continue
        except FileNotFoundError:
            problems.append((Path(folder), "folder disappeared"))
            continue
        except OSError as error:
            problems.append((Path(folder), f"cannot list folder ({error.strerror})"))
            continue
        subfolders = []
        for entry in entries:
            path = entry.path
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in skip:
                        subfolders.append(path)
                elif entry.is_symlink():
                    if not os.path.exists(path):  # dangling, or a loop of links
                        problems.append((Path(path), _dangling_reason(Path(path))))
                    elif entry.is_file():  # follows the link
                        yield path
                    else:
                        log.debug("not following directory symlink %s", path)
                elif entry.is_file(follow_symlinks=False):
                    yield path
                # fifos, sockets, devices: never opened (a fifo would block the read)
            except OSError as error:
                problems.append((Path(path), f"cannot stat ({error.strerror})"))
        stack.extend(reversed(subfolders))


def _examine(root: Path, path: str, problems: list[tuple[Path, str]],
             explicit: bool = False, known: Known | None = None) -> ScannedFile | None:
    """ScannedFile for an image, None otherwise (reported when its name claimed an image)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in RAW_EXTENSIONS:
        log.debug("skipping camera raw file %s", path)
        return None
    root_str = str(root)
    rel = path[len(root_str):].lstrip(os.sep)  # below root by construction
    if os.sep != "/":
        rel = rel.replace(os.sep, "/")
    if known is not None:
        before = known.get((root_str, rel))
        if before is not None:
            try:
                stat = os.stat(path)
            except OSError:
                stat = None  # let the full examination below say what is wrong
            if stat is not None and (stat.st_size, stat.st_mtime_ns) == before:
                return ScannedFile(root=root, path=Path(path), rel=rel, size=stat.st_size,
                                   mtime_ns=stat.st_mtime_ns)
    try:
        stat, head = read_head(Path(path), HEAD_BYTES)
    except NotRegularFile as error:  # swapped for a FIFO or a device since listed
        problems.append((Path(path), f"not a regular file ({error.strerror})"))
        return None
    except FileNotFoundError:
        problems.append((Path(path), "file disappeared"))
        return None
    except PermissionError:
        problems.append((Path(path), "permission denied"))
        return None
    except OSError as error:
        problems.append((Path(path), f"cannot read ({error.strerror})"))
        return None
    if sniff_bytes(head) is None:
        if explicit or suffix in IMAGE_EXTENSIONS:
            problems.append((Path(path), not_image_reason(Path(path), head)))
        return None
    return ScannedFile(root=root, path=Path(path), rel=rel, size=stat.st_size,
                       mtime_ns=stat.st_mtime_ns)


def _dangling_reason(link: Path) -> str:
    """Tell a loop of links from a link to nothing: the fixes differ."""
    try:
        os.stat(link)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop"
    return "broken symlink"

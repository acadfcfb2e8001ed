"""The file operations actions are made of, each of which never overwrites and never removes
anything it did not create itself."""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import stat
from pathlib import Path

from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import fsync_dir
from mgdedup.files.digest import file_digest

_COPY_CHUNK = 8 * 1024 * 1024


def resolve(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file `path` names (links followed), None if there is none.
    Two paths with one identity are one file: a hard link, the same folder mounted twice."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """A regular file itself (not a link to one, not a FIFO, device or folder)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def unique_destination(path: Path, taken: set[Path]) -> Path:
    """`path`, or `name (1).ext`, `name (2).ext`, ...: free on disk and within `taken`."""
    candidate, n = path, 0
    while candidate in taken or os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem} ({n}){path.suffix}")
    return candidate


def move_no_clobber(src: Path, dst: Path) -> None:
    """Rename within a filesystem; across filesystems copy, fsync, verify, then unlink."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists, not overwriting", str(dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_verified(src, dst)
        src.unlink()
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


COPY_TAG = ".mgdedup-copy-"


def copy_temporary(dst: Path) -> Path:
    """The hidden name a copy to `dst` is written under: ``.NAME.mgdedup-copy-XXXXXXXX``."""
    return dst.with_name(f".{dst.name}{COPY_TAG}{secrets.token_hex(4)}")


def leftover_copies(dst: Path) -> list[Path]:
    """Hidden copies to `dst` that a killed run left behind (never the file itself)."""
    try:
        return sorted(dst.parent.glob(f".{glob.escape(dst.name)}{COPY_TAG}*"))
    except OSError:
        return []


def copy_verified(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` across filesystems without ever leaving half a file at `dst`:
    written under a hidden name (created exclusively), fsynced, digest-checked, then given
    the name `dst` only if it is still free. On failure only what this call created is
    removed; an existing `dst` is never touched."""
    tmp = copy_temporary(dst)
    created = False
    try:
        with open(src, "rb") as fin:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        if file_digest(tmp) != file_digest(src):
            raise MgdedupError(f"copy of {src} to {dst} does not match the original")
        _name_exclusively(tmp, dst)
    finally:
        if created:
            tmp.unlink(missing_ok=True)


def _name_exclusively(tmp: Path, dst: Path) -> None:
    """Give the file `tmp` the name `dst` unless that is taken (a hard link is atomic and
    never replaces; filesystems without hard links get a checked rename)."""
    try:
        os.link(tmp, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists, not overwriting",
                                  str(dst)) from None
        os.rename(tmp, dst)


def make_link(kind: str, keeper: Path, at: Path) -> None:
    """A hard link or a symlink to `keeper` at `at` (which must not exist)."""
    if kind == "hardlink":
        os.link(keeper, at)
    else:
        os.symlink(keeper, at)


def is_our_link(path: Path, kind: str, keeper: Path, link_target: str | None) -> bool:
    """Whether `path` is the link an action made: a symlink whose text is `link_target`, or a
    hard link sharing the keeper's inode while the keeper still exists."""
    if kind == "symlink":
        try:
            return path.is_symlink() and os.readlink(path) == link_target
        except OSError:
            return False
    if kind == "hardlink":
        if path.is_symlink():
            return False
        mine = file_identity(path)
        return mine is not None and mine == file_identity(keeper)
    return False


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether resolved `path` lies in (or is) one of the resolved `roots`."""
    return any(path == root or root in path.parents for root in roots)


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above `path` that exists, symlinks resolved."""
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return resolve(ancestor)

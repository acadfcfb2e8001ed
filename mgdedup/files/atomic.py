"""Replacing a file so that readers, a crash or a second writer never see half of it.

Every file mgdedup writes whole (model files, checkpoints, the index's side files, reports,
cached graphs) goes through here: the content is written to a temporary file with a unique
name in the same folder (two writers never share one), flushed and fsynced, then renamed over
the target with `os.replace`, and the folder is fsynced so the rename survives a power cut.
On any failure the temporary file is removed and the target is untouched.

The temporary file is created by the writer itself (its random name is what keeps writers
apart), so it gets the usual permissions: a model or a report is as readable as the user's
other files.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mgdedup.errors import MgdedupError

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in `path` durable; best effort (not every platform or
    filesystem can open and fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """A fresh, unused name beside `path`: ``.NAME.<random>.tmp`` (hidden, never a target)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """``with replacing(target) as tmp:`` create and write `tmp` by any means (h5py, faiss,
    torch.save); on leaving the block it is fsynced and renamed over `target`.

    The folder is created if missing. OSError (a read-only folder, a full disk) becomes a
    one-line MgdedupError naming `what` and the target; other errors propagate unchanged.
    Either way the temporary file is gone and the target is as before.
    """
    target = check_writable(path, what)
    tmp = temporary_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except OSError as error:
        raise MgdedupError(f"cannot write {what} {target}: {describe_os_error(error)}") from None
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes, what: str = "file") -> None:
    """Replace `path` with `data` atomically (see `replacing`)."""
    with replacing(path, what) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike[str], text: str, what: str = "file") -> None:
    """Replace `path` with UTF-8 `text` atomically, with "\\n" line endings."""
    write_bytes(path, text.encode("utf-8"), what)


def check_writable(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Fail early, with one line, when `path` cannot be written as a file: it is a folder, or
    its nearest existing ancestor is not a folder or not writable. Commands call this before
    doing any work, so a typo in ``--out`` costs nothing. Returns the path."""
    target = Path(path)
    if target.is_dir():
        raise MgdedupError(f"cannot write {what} {target}: it is a folder")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MgdedupError(f"cannot write {what} {target}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MgdedupError(f"cannot write {what} {target}: no permission to write in "
                           f"{ancestor}")
    return target


def describe_os_error(error: OSError) -> str:
    """The human part of an OSError: "No space left on device", "Permission denied"."""
    return error.strerror or " ".join(str(error).split()) or type(error).__name__

"""One writer per index: ``IDX/lock`` while `mgdedup index` or `merge` writes an index folder,
or `dedup --apply` / `undo` act on its files.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds ``{"pid", "host",
"started", "command"}``. A second writer fails fast with a one-line MgdedupError naming the holder.
Readers (`dedup`, `search`, `classify --index`) never take it: the HDF5 store lets them read
between the writer's batches.

A lock is stale, and taken over with a warning, when its process is gone: same host and
``os.kill(pid, 0)`` says no such process, or the file cannot be parsed and is older than
`GARBAGE_GRACE_S` (a fresh unparsable file may be a writer between create and write). A lock
from another host is never presumed stale: its process cannot be checked from here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgdedup.errors import MgdedupError
from mgdedup.index.layout import IndexDir

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

GARBAGE_GRACE_S = 60.0
_ATTEMPTS = 5


class IndexLock:
    """``with IndexLock(index_dir):`` -- exclusive right to write `index_dir` (created if
    missing; removed again on release if the lock was all that was put in it)."""

    def __init__(self, index_dir: str | os.PathLike[str], command: str = "index") -> None:
        """`command` names the holder in the message another process gets (index, merge,
        dedup --apply, undo)."""
        self.command = command
        self.index_dir = Path(index_dir)
        self.path = IndexDir(self.index_dir).lock
        self._inode: tuple[int, int] | None = None
        self._created: list[Path] = []

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._inode is not None

    def acquire(self) -> None:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this IndexLock")
        missing = [d for d in (self.index_dir, *self.index_dir.parents) if not d.exists()]
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MgdedupError(f"cannot create index folder {self.index_dir}: "
                               f"{error.strerror}") from None
        self._created = missing  # innermost first
        for _ in range(_ATTEMPTS):
            if self._try_create():
                return
            self._take_over_if_stale()  # raises while a live writer holds the lock
        raise MgdedupError(f"cannot take the lock {self.path}: other processes keep "
                           "replacing it; try again")

    def release(self) -> None:
        """Remove the lock file if it is still ours (a takeover by another process is not)."""
        if not self.held:
            return
        try:
            if _inode(self.path) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot remove lock file %s: %s", self.path, error.strerror)
        self._inode = None
        created, self._created = self._created, []
        for folder in created:  # innermost first; only empty ones go (nothing was written)
            try:
                folder.rmdir()
            except OSError:
                break

    # --- plumbing --------------------------------------------------------------------------
    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise MgdedupError(f"cannot create lock file {self.path}: {error.strerror}") from None
        try:
            content = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                       "started": datetime.now().astimezone().isoformat(timespec="seconds")}
            os.write(fd, (json.dumps(content) + "\n").encode("utf-8"))
            self._inode = _inode_fd(fd)
        except OSError as error:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise MgdedupError(f"cannot write lock file {self.path}: {error.strerror}") from None
        os.close(fd)
        return True

    def _take_over_if_stale(self) -> None:
        """Remove a stale lock (then the caller retries); raise if a live writer holds it."""
        try:
            stat = os.stat(self.path)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return  # released meanwhile: retry
        except OSError as error:
            raise MgdedupError(f"cannot read lock file {self.path}: {error.strerror}") from None
        holder = _parse(raw)
        if holder is None:
            age = time.time() - stat.st_mtime
            if age < GARBAGE_GRACE_S:
                raise MgdedupError(
                    f"another mgdedup process is writing {self.index_dir} (lock file "
                    f"{self.path} "
                    f"is unreadable; if no index run is active, remove it or wait "
                    f"{GARBAGE_GRACE_S - age:.0f} s)")
            why = f"unreadable lock file, {age:.0f} s old"
        else:
            pid, host, started = holder
            if host != socket.gethostname() or _alive(pid):
                raise MgdedupError(f"another mgdedup process ({_command_of(raw)}) is writing "
                                   f"{self.index_dir} "
                                   f"(pid {pid} on {host} since {started})")
            why = f"pid {pid} on {host} since {started} is not running"
        # rename, not unlink: only the file judged stale may go, never one created meanwhile
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first: retry
        if _inode(aside) != (stat.st_dev, stat.st_ino):  # raced: this is a live lock
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise MgdedupError(f"another mgdedup process is writing {self.index_dir} "
                               f"(it took over the stale lock {self.path} just now)")
        aside.unlink(missing_ok=True)
        log.warning("taking over stale index lock %s (%s)", self.path, why)


def _command_of(raw: bytes) -> str:
    """The holder's command as its lock file names it ("mgdedup index" for older files)."""
    try:
        command = json.loads(raw.decode("utf-8")).get("command", "index")
    except (UnicodeDecodeError, ValueError, AttributeError):
        command = "index"
    return f"mgdedup {command}" if isinstance(command, str) else "mgdedup"


def _parse(raw: bytes) -> tuple[int, str, str] | None:
    try:
        data: Any = json.loads(raw.decode("utf-8"))
        pid, host, started = data["pid"], data["host"], data["started"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 \
            or not isinstance(host, str) or not isinstance(started, str):
        return None
    return pid, host, started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    return True


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _inode_fd(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino

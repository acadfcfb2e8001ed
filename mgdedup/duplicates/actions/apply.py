"""Carrying out a plan: every step re-checked, announced in the manifest before it starts, its
outcome recorded after; one failed step never stops the others."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgdedup.duplicates.actions.file_ops import (
    file_identity,
    make_link,
    move_no_clobber,
    unique_destination,
)
from mgdedup.duplicates.actions.kinds import SKIP, Action
from mgdedup.duplicates.actions.manifest import SUFFIX, ManifestWriter
from mgdedup.duplicates.actions.plan import (
    Indexed,
    PlannedStep,
    index_roots,
    keeper_reason,
    new_run_id,
    source_reason,
)
from mgdedup.errors import MgdedupError, one_line
from mgdedup.files.atomic import describe_os_error, fsync_dir
from mgdedup.index.layout import IndexDir
from mgdedup.index.lock import IndexLock

log = logging.getLogger(__name__)


@dataclass
class ActionReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    manifest: Path | None = None  # None when nothing was attempted
    messages: list[str] = field(default_factory=list)  # one line per skipped or failed step
    stopped: str = ""  # why the run stopped before its end (the manifest could not be written)


def apply_plan(steps: Sequence[PlannedStep], index_dir: Path) -> ActionReport:
    """Do the planned steps under the index's lock, each re-checked first.

    The manifest is created before the first file is touched (a folder that cannot hold it
    is a one-line MgdedupError, and nothing changed); if it cannot be written during the run,
    the run stops at once and says so, and `undo` still sees every step that was started.
    """
    report = ActionReport()
    index_dir = Path(index_dir).resolve()
    layout = IndexDir(index_dir)
    run_id = next((s.run_id for s in steps if s.run_id), "") or new_run_id()
    with IndexLock(index_dir, command="dedup --apply"):
        todo = [step for step in steps if step.kind != SKIP]
        writer = ManifestWriter.create(layout.actions / f"{run_id}{SUFFIX}", run_id, index_dir,
                                       index_roots(index_dir)) if todo else None
        try:
            keeper_checks: dict[tuple[Path, Any], str | None] = {}
            for number, step in enumerate(steps):
                if report.stopped:
                    break
                _apply_counted(number, step, writer, report, keeper_checks)
        finally:
            if writer is not None:
                writer.close()
                if writer.steps:
                    report.manifest = writer.path
                else:  # every step skipped: nothing to undo, no manifest to find
                    writer.path.unlink(missing_ok=True)
    return report


def _apply_counted(number: int, step: PlannedStep, writer: ManifestWriter | None,
                   report: ActionReport, keeper_checks: dict[tuple[Path, Any], str | None]
                   ) -> None:
    reason = step.reason if step.kind == SKIP else _recheck(step, keeper_checks)
    if reason or writer is None:
        report.skipped += 1
        report.messages.append(f"skipped {step.source}: {reason}")
        log.warning("skipped %s: %s", step.source, reason)
        return
    kind = Action(step.kind)
    stored = None if step.destination is None else unique_destination(step.destination, set())
    tmp_link = None
    if kind in (Action.HARDLINK, Action.SYMLINK):
        tmp_link = step.source.with_name(f".{step.source.name}.mgdedup-{secrets.token_hex(4)}")
    entry = {"op": kind.value, "source": str(step.source),
             "stored": None if stored is None else str(stored),
             "link": str(step.keeper) if tmp_link is not None else None,
             "tmp_link": None if tmp_link is None else str(tmp_link),
             "keeper": str(step.keeper), "digest": step.digest, "size": step.size,
             "mtime_ns": step.mtime_ns}
    if not _record(lambda: writer.intent(number, entry), writer, report):
        return
    try:
        _do(kind, step, stored, tmp_link)
    except (OSError, MgdedupError) as exc:
        why = one_line(exc)
        report.failed += 1
        report.messages.append(f"failed {step.source}: {why}")
        log.error("failed %s %s: %s", step.kind, step.source, why)
        _record(lambda: writer.outcome(number, "failed", why), writer, report)
        return
    if stored is not None:
        step.destination = stored
    report.done += 1
    _record(lambda: writer.outcome(number, "done"), writer, report)


def _record(write: Any, writer: ManifestWriter, report: ActionReport) -> bool:
    """Write a manifest line; when that fails, stop the run (nothing more may happen that
    the manifest does not announce)."""
    try:
        write()
    except OSError as error:
        report.stopped = (f"stopped: cannot write the manifest {writer.path} "
                          f"({describe_os_error(error)}); `mgdedup undo {writer.path}` "
                          "puts back what was done")
        report.messages.append(report.stopped)
        report.failed += 1
        return False
    return True


def _recheck(step: PlannedStep, keeper_checks: dict[tuple[Path, Any], str | None]
             ) -> str | None:
    """The files may have changed between planning and now."""
    reason = source_reason(step.source, Indexed(step.digest, step.size, step.mtime_ns))
    if reason:
        return reason
    keeper_id = file_identity(step.keeper)
    if keeper_id is not None and file_identity(step.source) == keeper_id:
        return "it is the same file as its keeper (a hard link or the same folder mounted twice)"
    try:  # a keeper is hashed once per run while its stat stays the same
        st = os.stat(step.keeper)
        key = (step.keeper, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        key = (step.keeper, None)
    if key not in keeper_checks:
        keeper_checks[key] = keeper_reason(step.keeper, step.keeper_indexed)
    return keeper_checks[key]


def _do(kind: Action, step: PlannedStep, stored: Path | None, tmp_link: Path | None) -> None:
    if stored is None:  # permanent delete
        step.source.unlink()
        fsync_dir(step.source.parent)
    elif tmp_link is None:  # move, delete to the trash
        move_no_clobber(step.source, stored)
    else:
        _replace_by_link(kind, step, stored, tmp_link)


def _replace_by_link(kind: Action, step: PlannedStep, stored: Path, tmp_link: Path) -> None:
    """The link is made first under a hidden name (it fails early, e.g. a hard link across
    filesystems), then the duplicate's bytes are moved away and the link takes the source's
    name, exclusively (a file that appeared there meanwhile is never replaced)."""
    make_link(kind.value, step.keeper, tmp_link)
    try:
        move_no_clobber(step.source, stored)
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        raise
    try:
        if kind is Action.HARDLINK:
            os.link(tmp_link, step.source)
        else:
            os.symlink(step.keeper, step.source)
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        try:  # put the bytes back where they were
            move_no_clobber(stored, step.source)
        except OSError:  # something took the name: the bytes stay where the manifest says
            log.warning("%s stays at %s: its name was taken meanwhile", step.source, stored)
        raise
    tmp_link.unlink(missing_ok=True)
    fsync_dir(step.source.parent)

"""Putting back what an applied action did, from its manifest and from what is on disk.

Each step is judged by the files as they are now, not only by what the manifest says, so an
undo works after a run killed in the middle of a step and after an undo killed in the middle
of its own: a source that holds its recorded bytes again is in place (a redundant stored copy
is then removed), a source that is missing or still the link the action made gets its stored
copy back, and anything else at the source (a new file, a foreign link) is never overwritten.
Nothing is restored into a folder that no longer resolves inside the indexed folders (a
parent swapped for a symlink to elsewhere).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mgdedup.duplicates.actions.file_ops import (
    existing_ancestor,
    file_identity,
    inside,
    is_our_link,
    is_regular_file,
    leftover_copies,
    move_no_clobber,
    resolve,
)
from mgdedup.duplicates.actions.kinds import Action
from mgdedup.duplicates.actions.manifest import RecordedStep, manifests_of, read_manifest
from mgdedup.duplicates.actions.plan import index_roots
from mgdedup.errors import MgdedupError, one_line
from mgdedup.files.digest import file_digest
from mgdedup.index.layout import IndexDir
from mgdedup.index.lock import IndexLock

log = logging.getLogger(__name__)


@dataclass
class UndoReport:
    manifest: Path
    restored: int = 0
    already_undone: int = 0  # files found in place (undone before, or never moved)
    skipped: int = 0  # left alone, with the reason in `messages` (an unreadable line too)
    failed: int = 0
    not_undoable: int = 0  # permanent deletes
    messages: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every undoable step of the manifest is undone (now or before)."""
        return self.skipped == 0 and self.failed == 0

    @property
    def nothing_left(self) -> bool:
        """Every step was already undone before this run."""
        return self.complete and self.restored == 0


def latest_manifest(index_dir: Path) -> Path:
    """The newest manifest of an index."""
    folder = IndexDir(index_dir).actions
    found = manifests_of(folder)
    if not found:
        raise MgdedupError(f"no actions recorded in {folder}: nothing to undo")
    return found[-1]


def _index_of(manifest: Path, header: dict | None) -> Path:
    recorded = (header or {}).get("index")
    if isinstance(recorded, str) and IndexDir(Path(recorded)).exists():
        return Path(recorded)
    return manifest.resolve().parent.parent  # IDX/actions/RUN.jsonl


def undo(manifest: Path) -> UndoReport:
    """Put back what a manifest records, newest step first, under the index's lock; never
    overwrites anything."""
    manifest = Path(manifest)
    read = read_manifest(manifest)
    index_dir = _index_of(manifest, read.header)
    roots = read.roots
    if roots is None:  # a version 1 manifest: the index says which folders are indexed
        roots = index_roots(index_dir)
    roots = [resolve(r) for r in roots]
    report = UndoReport(manifest=manifest)
    for problem in read.problems:
        report.skipped += 1
        report.messages.append(f"{manifest}: {problem}")
    if read.torn_last_line is not None:
        report.messages.append(f"{manifest}: line {read.torn_last_line} is incomplete (the run "
                               "was killed while writing it; the step it announced never "
                               "started)")
    with IndexLock(index_dir, command="undo"):
        for step in reversed(read.steps):
            _undo_counted(step, roots, report)
    if report.nothing_left and (read.steps or not read.problems):
        report.messages.append(f"nothing left to undo in {manifest}: every file is back")
    return report


def _undo_counted(step: RecordedStep, roots: list[Path], report: UndoReport) -> None:
    try:
        outcome, detail = _undo_one(step, roots)
    except (OSError, MgdedupError) as exc:
        report.failed += 1
        report.messages.append(f"failed to restore {step.source}: {one_line(exc)}")
        log.error("failed to restore %s: %s", step.source, one_line(exc))
        return
    if outcome == "restored":
        report.restored += 1
        log.info("restored %s", step.source)
    elif outcome == "in place":
        if step.state != "failed":  # a failed step moved nothing: nothing to count
            report.already_undone += 1
    elif outcome == "not undoable":
        report.not_undoable += 1
        report.messages.append(f"cannot undo permanent delete of {step.source}")
    else:
        report.skipped += 1
        report.messages.append(f"skipped {step.source}: {detail}")
        log.warning("not restoring %s: %s", step.source, detail)
    if detail and outcome in ("restored", "in place"):
        report.messages.append(detail)


def _holds_original(path: Path, step: RecordedStep) -> bool:
    return is_regular_file(path) and file_digest(path) == step.digest


def _undo_one(step: RecordedStep, roots: list[Path]) -> tuple[str, str]:
    """("restored" | "in place" | "skipped" | "not undoable", detail)."""
    source, stored = step.source, step.stored
    ancestor = existing_ancestor(source)
    if not inside(ancestor, roots):
        return "skipped", (f"its folder now resolves to {ancestor}, outside the indexed "
                           "folders; nothing is restored there")
    if step.tmp_link is not None and os.path.lexists(step.tmp_link) and \
            is_our_link(step.tmp_link, step.op, step.keeper, step.link):
        step.tmp_link.unlink()  # a link run killed before the link took the source's name
    for leftover in leftover_copies(source) + (leftover_copies(stored) if stored else []):
        leftover.unlink(missing_ok=True)  # half a copy of a killed run: never a named file
    ours = step.op in (Action.HARDLINK.value, Action.SYMLINK.value) and \
        os.path.lexists(source) and is_our_link(source, step.op, step.keeper, step.link)
    if not ours and os.path.lexists(source):
        if not _holds_original(source, step):
            return "skipped", f"a file now exists at {source}; not overwriting it"
        detail = ""
        if stored is not None and _holds_original(stored, step) \
                and file_identity(stored) != file_identity(source):
            stored.unlink()  # a second, identical copy (a copy finished, the source stayed)
            detail = f"removed {stored}, a second copy of {source}, which is in place"
        return "in place", detail
    if stored is None:
        return "not undoable", ""
    if not os.path.lexists(stored):
        raise MgdedupError(f"its stored copy {stored} is missing")
    if stored.is_symlink() or not _holds_original(stored, step):
        return "skipped", f"its stored copy {stored} was changed; left where it is"
    if ours:
        source.unlink()
    move_no_clobber(stored, source)
    os.utime(source, ns=(source.stat().st_atime_ns, step.mtime_ns))
    if file_digest(source) != step.digest:
        raise MgdedupError(f"restored {source} does not match the recorded digest")
    return "restored", ""

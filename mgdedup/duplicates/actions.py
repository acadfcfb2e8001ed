"""Safe, undoable actions on duplicate files: move, hardlink, symlink, delete.

Users point this at their photo libraries, so the rules are about never losing a file:

- Only group MEMBERS are acted on; a path that is the keeper of any group never is.
- Paths from an index are not trusted: a source must resolve (symlinks resolved) inside one of
  the index's roots, must not itself be a symlink, and must still have the size, mtime and
  blake2b digest stored in the index (checked when planning AND again right before acting).
- Nothing is overwritten: a taken destination name gets a suffix ``name (1).jpg``.
- Bytes are never destroyed unless ``permanent`` is asked for: ``delete`` moves them to
  ``--to`` or ``IDX/trash/<run id>/``; ``hardlink``/``symlink`` first move them there, then put
  a link to the keeper at the source path.
- Each applied step is appended to ``IDX/actions/<run id>.jsonl`` (flushed and fsynced) right
  after it succeeded, so an interrupted run leaves a manifest of exactly what was done, and
  :func:`undo` can put every file back byte-identical with its mtime.

Undo progress is kept in ``<manifest>.undone`` (one line per undone manifest line), so an
interrupted undo can be resumed and undoing twice is a harmless no-op.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mgdedup.duplicates.action_kinds import Action
from mgdedup.duplicates.find import DedupResult
from mgdedup.errors import MgdedupError, one_line
from mgdedup.files.atomic import fsync_dir
from mgdedup.files.digest import file_digest
from mgdedup.index.layout import IndexDir

log = logging.getLogger(__name__)

UNDONE_SUFFIX = ".undone"
SKIP = "skip"
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass
class PlannedStep:
    """One thing `apply_plan` will do (or, for kind "skip", refuses to do and why)."""

    kind: str  # an Action value, or "skip"
    source: Path  # absolute path of the duplicate
    destination: Path | None  # where the duplicate's bytes go; None: skip or permanent delete
    keeper: Path
    reason: str = ""  # why a step is skipped
    digest: str = ""  # expected from the index
    size: int = -1
    mtime_ns: int = -1
    run_id: str = ""


@dataclass
class ActionReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    manifest: Path | None = None  # None when nothing was applied
    messages: list[str] = field(default_factory=list)  # one line per skipped or failed step


@dataclass
class UndoReport:
    manifest: Path
    restored: int = 0
    skipped: int = 0
    failed: int = 0
    not_undoable: int = 0  # permanent deletes
    already_undone: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every undoable step of the manifest is undone (now or before)."""
        return self.skipped == 0 and self.failed == 0


@dataclass(frozen=True)
class _Stored:
    digest: str
    size: int
    mtime_ns: int


# --- planning ------------------------------------------------------------------------------

def new_run_id() -> str:
    """UTC timestamp plus a random suffix: sortable by time, unique across quick runs."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def plan_actions(index_dir: Path, result: DedupResult, action: Action | str,
                 to: Path | None = None, permanent: bool = False) -> list[PlannedStep]:
    """What would be done to every group member; unsafe members become "skip" steps.

    Raises MgdedupError for unusable options (move without `to`, `to` inside an indexed root,
    `permanent` with anything but a plain delete).
    """
    action = Action(action)
    index_dir = Path(index_dir).resolve()
    roots, stored = _index_facts(index_dir)
    to = _check_options(action, to, permanent, roots)
    run_id = new_run_id()
    base = to if to is not None else IndexDir(index_dir).trash / run_id
    keepers = {_resolve(result.facts[g.keeper].path) for g in result.groups}
    reserved: set[Path] = set()
    steps: list[PlannedStep] = []
    for group in result.groups:
        keeper = _resolve(result.facts[group.keeper].path)
        for row, _score in group.members:
            source = Path(os.path.abspath(result.facts[row].path))
            step = _plan_one(source, keeper, action, permanent, roots, stored, keepers, reserved)
            step.run_id = run_id
            if step.kind != SKIP and not (action is Action.DELETE and permanent):
                step.destination = _unique_destination(base / step.destination, reserved)
                reserved.add(step.destination)
            if step.kind != SKIP:
                reserved.add(step.source)
            steps.append(step)
    return steps


def _index_facts(index_dir: Path) -> tuple[list[Path], dict[str, _Stored]]:
    """Resolved roots and the stored digest/size/mtime of every indexed absolute path."""
    with IndexDir(index_dir).open_store() as store:
        roots = [_resolve(r) for r in store.meta.roots]
        paths = store.absolute_paths()
        digests, sizes = store.read("digest"), store.read("size")
        mtimes = store.read("mtime_ns")
    stored = {os.path.abspath(p): _Stored(str(d), int(s), int(m))
              for p, d, s, m in zip(paths, digests, sizes, mtimes)}
    return roots, stored


def _check_options(action: Action, to: Path | None, permanent: bool,
                   roots: Sequence[Path]) -> Path | None:
    if permanent and action is not Action.DELETE:
        raise MgdedupError("--permanent only applies to --action delete")
    if permanent and to is not None:
        raise MgdedupError("--permanent deletes for good; it cannot be combined with --to")
    if action is Action.MOVE and to is None:
        raise MgdedupError("--action move needs --to DIR (a folder outside the indexed ones)")
    if to is None:
        return None
    to = _resolve(to)
    for root in roots:
        if to == root or root in to.parents:
            raise MgdedupError(f"--to {to} lies inside the indexed folder {root}; choose a "
                               "folder outside it (files there would be indexed again)")
    return to


def _plan_one(source: Path, keeper: Path, action: Action, permanent: bool,
              roots: Sequence[Path], stored: dict[str, _Stored], keepers: set[Path],
              reserved: set[Path]) -> PlannedStep:
    """A step for one member: destination relative to its root (joined later), or a skip."""
    step = PlannedStep(kind=action.value, source=source, destination=None, keeper=keeper)
    resolved = _resolve(source)
    root = _root_of(resolved, roots)
    facts = stored.get(str(source))
    if facts is not None:
        step.digest, step.size, step.mtime_ns = facts.digest, facts.size, facts.mtime_ns
    reason = (_role_reason(source, resolved, keeper, keepers, reserved)
              or (None if facts is not None else "not in the index")
              or _source_reason(source, facts)
              or _keeper_reason(keeper, action, resolved))
    if root is None or reason:
        step.kind = SKIP
        step.reason = "outside the indexed folders (after resolving symlinks)" \
            if root is None else reason
        return step
    if not (action is Action.DELETE and permanent):
        step.destination = resolved.relative_to(root)
    return step


def _role_reason(source: Path, resolved: Path, keeper: Path, keepers: set[Path],
                 reserved: set[Path]) -> str | None:
    if resolved in keepers or source in keepers or resolved == keeper:
        return "it is the keeper of a group"
    if source in reserved:
        return "already planned in this run"
    return None


def _source_reason(source: Path, facts: _Stored | None) -> str | None:
    """Why the file at `source` is not the one indexed (None: it is, byte for byte)."""
    if not os.path.lexists(source):
        return "missing (moved or deleted since indexing)"
    if source.is_symlink():
        return "is a symbolic link (acting on it would free nothing)"
    if not source.is_file():
        return "not a regular file"
    if facts is None:
        return "not in the index"
    st = source.stat()
    if st.st_size != facts.size or st.st_mtime_ns != facts.mtime_ns:
        return "changed since indexing (size or modification time differ); re-run index"
    if file_digest(source) != facts.digest:
        return "changed since indexing (content differs); re-run index"
    return None


def _keeper_reason(keeper: Path, action: Action, resolved_source: Path) -> str | None:
    """A duplicate is only given up while its keeper is still there."""
    if not keeper.is_file():
        return f"its keeper {keeper} is missing"
    if action is Action.HARDLINK and os.path.samefile(keeper, resolved_source):
        return "already a hard link to its keeper"
    return None


def _resolve(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _root_of(resolved: Path, roots: Sequence[Path]) -> Path | None:
    """The (longest) indexed root containing `resolved`, or None."""
    inside = [root for root in roots if root in resolved.parents]
    return max(inside, key=lambda r: len(r.parts)) if inside else None


def _unique_destination(path: Path, taken: set[Path]) -> Path:
    """`path`, or `name (1).ext`, `name (2).ext`, ...: free on disk and within this plan."""
    candidate, n = path, 0
    while candidate in taken or os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem} ({n}){path.suffix}")
    return candidate


def describe_plan(steps: Iterable[PlannedStep]) -> list[str]:
    """One line per step saying exactly what `apply_plan` would do (the dry run)."""
    return [_describe(step) for step in steps]


def _describe(step: PlannedStep) -> str:
    if step.kind == SKIP:
        return f"skip {step.source}: {step.reason}"
    if step.kind == Action.MOVE.value:
        return f"move {step.source} -> {step.destination}"
    if step.kind == Action.DELETE.value:
        if step.destination is None:
            return f"delete {step.source} PERMANENTLY (cannot be undone)"
        return f"delete {step.source} (moved to {step.destination})"
    return (f"{step.kind} {step.source} -> {step.keeper} (original moved to "
            f"{step.destination})")


# --- applying ------------------------------------------------------------------------------

def apply_plan(steps: Sequence[PlannedStep], index_dir: Path) -> ActionReport:
    """Do the planned steps, each re-checked first; one failure never stops the run."""
    report = ActionReport()
    run_id = next((s.run_id for s in steps if s.run_id), "") or new_run_id()
    manifest = _Manifest(IndexDir(Path(index_dir).resolve()).actions / f"{run_id}.jsonl")
    for step in steps:
        reason = step.reason if step.kind == SKIP else _recheck(step)
        if reason:
            report.skipped += 1
            report.messages.append(f"skipped {step.source}: {reason}")
            log.warning("skipped %s: %s", step.source, reason)
            continue
        try:
            entry = _apply_one(step)
        except (OSError, MgdedupError) as exc:
            report.failed += 1
            report.messages.append(f"failed {step.source}: {one_line(exc)}")
            log.error("failed %s %s: %s", step.kind, step.source, one_line(exc))
            continue
        manifest.append(entry)
        report.done += 1
        log.info("%s", _describe(step))
    report.manifest = manifest.path if manifest.written else None
    return report


def _recheck(step: PlannedStep) -> str | None:
    """The file may have changed between planning and now."""
    facts = _Stored(step.digest, step.size, step.mtime_ns)
    return _source_reason(step.source, facts) or _keeper_reason(step.keeper, Action(step.kind),
                                                                _resolve(step.source))


def _apply_one(step: PlannedStep) -> dict[str, Any]:
    """Do one step; returns its manifest entry. Raises OSError/MgdedupError on failure."""
    kind = Action(step.kind)
    stored: Path | None = None
    if kind is Action.DELETE and step.destination is None:
        step.source.unlink()
    elif kind in (Action.MOVE, Action.DELETE):
        stored = _move_no_clobber(step.source, _free(step.destination))
    else:
        stored = _replace_by_link(step, kind)
    return {"op": kind.value, "source": str(step.source),
            "stored": str(stored) if stored is not None else None,
            "link": str(step.keeper) if kind in (Action.HARDLINK, Action.SYMLINK) else None,
            "keeper": str(step.keeper), "digest": step.digest, "size": step.size,
            "mtime_ns": step.mtime_ns, "time": datetime.now(timezone.utc).isoformat()}


def _free(destination: Path | None) -> Path:
    """The planned destination, or the next free name if one appeared since planning."""
    if destination is None:
        raise MgdedupError("the planned step has no destination")
    return _unique_destination(destination, set())


def _replace_by_link(step: PlannedStep, kind: Action) -> Path:
    """Link made first under a temporary name (fails early, e.g. across filesystems), then
    the duplicate's bytes are moved away and the link takes the source's name."""
    tmp = step.source.with_name(f".{step.source.name}.mgdedup-{secrets.token_hex(4)}")
    if kind is Action.HARDLINK:
        os.link(step.keeper, tmp)
    else:
        os.symlink(step.keeper, tmp)
    try:
        stored = _move_no_clobber(step.source, _free(step.destination))
    except BaseException:
        tmp.unlink()
        raise
    try:
        os.rename(tmp, step.source)  # the source name is free: nothing is overwritten
    except BaseException:
        _move_no_clobber(stored, step.source)  # put the bytes back where they were
        tmp.unlink()
        raise
    fsync_dir(step.source.parent)
    return stored


def _move_no_clobber(src: Path, dst: Path) -> Path:
    """Rename within a filesystem; across filesystems copy, fsync, verify, then unlink."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists, not overwriting", str(dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_verified(src, dst)
        src.unlink()
    fsync_dir(dst.parent)
    fsync_dir(src.parent)
    return dst


def _copy_verified(src: Path, dst: Path) -> None:
    """Exclusive-create copy with metadata, on disk and digest-checked before src may go."""
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, _COPY_CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, dst)
        if file_digest(dst) != file_digest(src):
            raise MgdedupError(f"copy of {src} to {dst} does not match the original")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


class _Manifest:
    """Append-only JSON lines, each on disk before the next step starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = False

    def append(self, entry: dict[str, Any]) -> None:
        _append_line(self.path, entry)
        self.written = True


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)



# --- undo ----------------------------------------------------------------------------------

def latest_manifest(index_dir: Path) -> Path:
    """The newest manifest of an index: run ids sort by time (to the second; the file's
    mtime breaks ties between runs started in the same second)."""
    folder = IndexDir(index_dir).actions
    found = sorted(folder.glob("*.jsonl"), key=lambda p: (p.name[:16], p.stat().st_mtime_ns)) \
        if folder.is_dir() else []
    if not found:
        raise MgdedupError(f"no actions recorded in {folder}: nothing to undo")
    return found[-1]


def undo(manifest: Path) -> UndoReport:
    """Put back what a manifest records, newest step first; never overwrites anything."""
    manifest = Path(manifest)
    entries = _read_manifest(manifest)
    done_lines = _read_undone(manifest)
    report = UndoReport(manifest=manifest)
    for number in reversed(range(len(entries))):
        entry = entries[number]
        if entry.get("stored") is None:
            report.not_undoable += 1
            report.messages.append(f"cannot undo permanent delete of {entry['source']}")
            continue
        if number in done_lines:
            report.already_undone += 1
            continue
        _undo_counted(entry, number, manifest, report)
    if report.already_undone and not (report.restored or report.skipped or report.failed):
        report.messages.append(f"{manifest} was already undone; nothing to do")
    return report


def _undo_counted(entry: dict[str, Any], number: int, manifest: Path,
                  report: UndoReport) -> None:
    source = entry["source"]
    try:
        reason = _undo_one(entry)
    except (OSError, MgdedupError) as exc:
        report.failed += 1
        report.messages.append(f"failed to restore {source}: {one_line(exc)}")
        log.error("failed to restore %s: %s", source, one_line(exc))
        return
    if reason:
        report.skipped += 1
        report.messages.append(f"skipped {source}: {reason}")
        log.warning("not restoring %s: %s", source, reason)
        return
    _append_line(_undone_path(manifest), {"line": number,
                                         "time": datetime.now(timezone.utc).isoformat()})
    report.restored += 1
    log.info("restored %s", source)


def _undo_one(entry: dict[str, Any]) -> str | None:
    """Restore one entry; returns why it was skipped (None: restored)."""
    source, stored = Path(entry["source"]), Path(entry["stored"])
    if not stored.is_file() or stored.is_symlink():
        return f"its stored copy {stored} is missing"
    if file_digest(stored) != entry["digest"]:
        return f"its stored copy {stored} was changed; left where it is"
    reason = _remove_our_link(entry, source)
    if reason:
        return reason
    _move_no_clobber(stored, source)
    os.utime(source, ns=(source.stat().st_atime_ns, int(entry["mtime_ns"])))
    if file_digest(source) != entry["digest"]:
        raise MgdedupError(f"restored {source} does not match the recorded digest")
    return None


def _remove_our_link(entry: dict[str, Any], source: Path) -> str | None:
    """Clear the source path of the link this tool made; anything else there stays."""
    if not os.path.lexists(source):
        return None
    taken = f"a file now exists at {source}; not overwriting it"
    if entry["op"] == Action.SYMLINK.value:
        if not source.is_symlink() or os.readlink(source) != entry["link"]:
            return taken
    elif entry["op"] == Action.HARDLINK.value:
        if source.is_symlink() or not _same_inode(source, Path(entry["keeper"])):
            return taken
    else:
        return taken
    source.unlink()
    return None


def _same_inode(a: Path, b: Path) -> bool:
    """Only while the keeper still exists is the link at `a` a spare name for its bytes."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _read_manifest(manifest: Path) -> list[dict[str, Any]]:
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MgdedupError(f"cannot read manifest {manifest}: {one_line(exc)}") from exc
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:  # an interrupted write leaves a torn last line
            if number == len(lines):
                log.warning("ignoring incomplete last line of %s", manifest)
                break
            raise MgdedupError(f"manifest {manifest} line {number} is corrupt") from exc
    return entries


def _undone_path(manifest: Path) -> Path:
    return manifest.with_name(manifest.name + UNDONE_SUFFIX)


def _read_undone(manifest: Path) -> set[int]:
    path = _undone_path(manifest)
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(int(json.loads(line)["line"]))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line: that entry will simply be checked again
    return done

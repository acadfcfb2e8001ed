"""What an action would do to every group member, and why some members are left alone: the
dry run, and the checks `apply` repeats right before each step."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mgdedup.duplicates.actions.file_ops import (
    file_identity,
    is_regular_file,
    resolve,
    unique_destination,
)
from mgdedup.duplicates.actions.kinds import SKIP, Action
from mgdedup.duplicates.find import DedupResult
from mgdedup.errors import MgdedupError
from mgdedup.files.digest import file_digest
from mgdedup.index.layout import IndexDir


@dataclass(frozen=True)
class Indexed:
    """What the index recorded of a file."""

    digest: str
    size: int
    mtime_ns: int


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
    keeper_indexed: Indexed | None = None  # the keeper as indexed, checked again before acting
    score: float | None = None  # the duplicate's score in its group (for the dry run)
    why_kept: str = ""  # why the keeper is the keeper (`mgdedup.duplicates.keepers`)


def new_run_id() -> str:
    """UTC timestamp plus a random suffix: sortable by time, unique across quick runs."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def index_roots(index_dir: Path) -> list[Path]:
    """The index's root folders, symlinks resolved."""
    with IndexDir(index_dir).open_store() as store:
        return [resolve(r) for r in store.meta.roots]


def _index_facts(index_dir: Path) -> tuple[list[Path], dict[str, Indexed]]:
    """Resolved roots and the stored digest/size/mtime of every indexed absolute path."""
    with IndexDir(index_dir).open_store() as store:
        roots = [resolve(r) for r in store.meta.roots]
        paths = store.absolute_paths()
        digests, sizes = store.read("digest"), store.read("size")
        mtimes = store.read("mtime_ns")
    stored = {os.path.abspath(p): Indexed(str(d), int(s), int(m))
              for p, d, s, m in zip(paths, digests, sizes, mtimes)}
    return roots, stored


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
    keepers = {resolve(result.facts[g.keeper].path) for g in result.groups}
    # files by identity: a hard link or a second mount of a keeper is the keeper
    keeper_files = {identity for identity in map(file_identity, keepers) if identity}
    checked_keepers: dict[Path, str | None] = {}
    reserved: set[Path] = set()
    planned_files: set[tuple[int, int]] = set()
    steps: list[PlannedStep] = []
    for group in result.groups:
        keeper_path = result.facts[group.keeper].path
        keeper = resolve(keeper_path)
        for row, score in group.members:
            source = Path(os.path.abspath(result.facts[row].path))
            step = _plan_one(source, keeper, action, roots, stored, keepers, keeper_files,
                             reserved, planned_files)
            step.run_id = run_id
            step.score, step.why_kept = score, group.keeper_reason
            step.keeper_indexed = stored.get(os.path.abspath(keeper_path))
            if step.kind != SKIP:
                if keeper not in checked_keepers:
                    checked_keepers[keeper] = keeper_reason(keeper, step.keeper_indexed)
                if checked_keepers[keeper]:
                    step.kind, step.reason = SKIP, checked_keepers[keeper]  # type: ignore[assignment]
            if step.kind != SKIP:
                if action is Action.DELETE and permanent:
                    step.destination = None
                else:
                    step.destination = unique_destination(base / step.destination, reserved)
                    reserved.add(step.destination)
                reserved.add(step.source)
                identity = file_identity(step.source)
                if identity:
                    planned_files.add(identity)
            steps.append(step)
    return steps


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
    to = resolve(to)
    for root in roots:
        if to == root or root in to.parents:
            raise MgdedupError(f"--to {to} lies inside the indexed folder {root}; choose a "
                               "folder outside it (files there would be indexed again)")
    return to


def _plan_one(source: Path, keeper: Path, action: Action, roots: Sequence[Path],
              stored: dict[str, Indexed], keepers: set[Path],
              keeper_files: set[tuple[int, int]], reserved: set[Path],
              planned_files: set[tuple[int, int]]) -> PlannedStep:
    """A step for one member: destination relative to its root (joined later), or a skip."""
    step = PlannedStep(kind=action.value, source=source, destination=None, keeper=keeper)
    resolved = resolve(source)
    root = _root_of(resolved, roots)
    facts = stored.get(str(source))
    if facts is not None:
        step.digest, step.size, step.mtime_ns = facts.digest, facts.size, facts.mtime_ns
    reason = (_role_reason(source, resolved, keeper, keepers, keeper_files, reserved,
                           planned_files)
              or (None if facts is not None else "not in the index")
              or source_reason(source, facts))
    if root is None or reason:
        step.kind = SKIP
        step.reason = "outside the indexed folders (after resolving symlinks)" \
            if root is None else reason  # type: ignore[assignment]
        return step
    step.destination = resolved.relative_to(root)
    return step


def _role_reason(source: Path, resolved: Path, keeper: Path, keepers: set[Path],
                 keeper_files: set[tuple[int, int]], reserved: set[Path],
                 planned_files: set[tuple[int, int]]) -> str | None:
    if resolved in keepers or source in keepers or resolved == keeper:
        return "it is the keeper of a group"
    identity = file_identity(source)
    if identity is not None and identity in keeper_files:
        return "it is the same file as a keeper (a hard link or the same folder mounted twice)"
    if source in reserved:
        return "already planned in this run"
    if identity is not None and identity in planned_files:
        return "it is the same file as another duplicate already planned (a hard link or " \
               "the same folder mounted twice)"
    return None


def source_reason(source: Path, facts: Indexed | None) -> str | None:
    """Why the file at `source` is not the one indexed (None: it is, byte for byte)."""
    if not os.path.lexists(source):
        return "missing (moved or deleted since indexing)"
    if source.is_symlink():
        return "is a symbolic link (acting on it would free nothing)"
    if not is_regular_file(source):
        return "not a regular file"
    if facts is None:
        return "not in the index"
    st = source.stat()
    if st.st_size != facts.size or st.st_mtime_ns != facts.mtime_ns:
        return "changed since indexing (size or modification time differ); re-run index"
    if file_digest(source) != facts.digest:
        return "changed since indexing (content differs); re-run index"
    return None


def keeper_reason(keeper: Path, indexed: Indexed | None) -> str | None:
    """A duplicate is only given up while its keeper is still there, unchanged since it was
    indexed: otherwise the image's content might exist in no file any more."""
    if not os.path.lexists(keeper):
        return f"its keeper {keeper} is missing"
    if not is_regular_file(keeper):
        return f"its keeper {keeper} is not a regular file any more"
    if indexed is None:
        return f"its keeper {keeper} is not in the index"
    st = keeper.stat()
    if st.st_size != indexed.size or st.st_mtime_ns != indexed.mtime_ns:
        return f"its keeper {keeper} changed since indexing; re-run index"
    try:
        if file_digest(keeper) != indexed.digest:
            return f"its keeper {keeper} changed since indexing (content differs); re-run index"
    except OSError as error:
        return f"its keeper {keeper} cannot be read ({error.strerror})"
    return None


def _root_of(resolved: Path, roots: Sequence[Path]) -> Path | None:
    """The (longest) indexed root containing `resolved`, or None."""
    inside = [root for root in roots if root in resolved.parents]
    return max(inside, key=lambda r: len(r.parts)) if inside else None


def describe_plan(steps: Iterable[PlannedStep], score_kind: str = "copy") -> list[str]:
    """One line per step saying exactly what `apply_plan` would do (the dry run), with the
    keeper it is a duplicate of, why that file is kept, and the duplicate's score:
    `keep K (oldest) <- move A (P(copy) 0.982) -> DEST`."""
    label = {"copy": "P(copy)", "sscd-normalised": "normalised"}.get(score_kind, "cosine")
    return [_describe(step, label) for step in steps]


def _describe(step: PlannedStep, label: str) -> str:
    kept = f"keep {step.keeper}" + (f" ({step.why_kept})" if step.why_kept else "")
    score = f" ({label} {step.score:.3f})" if step.score is not None else ""
    if step.kind == SKIP:
        return f"{kept} <- skip {step.source}{score}: {step.reason}"
    if step.kind == Action.MOVE.value:
        return f"{kept} <- move {step.source}{score} -> {step.destination}"
    if step.kind == Action.DELETE.value:
        if step.destination is None:
            return f"{kept} <- delete {step.source}{score} PERMANENTLY (cannot be undone)"
        return f"{kept} <- delete {step.source}{score} (moved to {step.destination})"
    return (f"{kept} <- {step.kind} {step.source}{score} -> {step.keeper} (original moved to "
            f"{step.destination})")

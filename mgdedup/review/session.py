"""What the review page works on: the groups of one index as `dedup` finds them, the
person's decisions written to the index as they are made, and the dry run and apply of an
action, exactly as `mgdedup dedup --action` does them.

Every change goes through `mgdedup.duplicates.decisions` (the store `mgdedup mark` uses), so
a later `dedup` honours what was decided here; groups are found again after each decision
(the verified evidence is cached in the index, so this takes well under a second).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mgdedup.duplicates.decisions import load_decisions, save_decisions
from mgdedup.duplicates.find import DedupResult, find_duplicates
from mgdedup.duplicates.keepers import KeeperRule
from mgdedup.errors import MgdedupError
from mgdedup.files.names import printable
from mgdedup.index.layout import IndexDir

log = logging.getLogger(__name__)

#: longest side of the images the page shows: thumbnails, and the side-by-side compare
THUMB_PX, FULL_PX = 320, 2400
ACTIONS = ("move", "delete", "hardlink", "symlink")


@dataclass
class ReviewSession:
    """One index under review; safe to call from the server's threads."""

    index_dir: Path
    threshold: float | None = None
    keep: KeeperRule = field(default_factory=KeeperRule)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _result: DedupResult | None = field(default=None, repr=False)
    _roots: list[Path] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.index_dir = Path(self.index_dir).resolve()
        with IndexDir(self.index_dir).open_store() as store:
            self._roots = [Path(os.path.realpath(r)) for r in store.meta.roots]

    # -- groups -----------------------------------------------------------------------
    def result(self) -> DedupResult:
        with self._lock:
            if self._result is None:
                self._result = find_duplicates(self.index_dir, self.threshold, keep=self.keep)
            return self._result

    def groups_document(self) -> dict:
        """The groups as the page shows them: keeper first, then members by score."""
        result = self.result()
        facts = result.facts

        def file(row: int, role: str, score: float | None, cosine: float | None) -> dict:
            fact = facts[row]
            return {"row": row, "role": role, "path": printable(fact.path),
                    "name": printable(os.path.basename(fact.path)), "width": fact.width,
                    "height": fact.height, "bytes": fact.size, "score": score,
                    "cosine": cosine}

        groups = []
        for number, group in enumerate(result.groups, start=1):
            groups.append({
                "group": number, "keeper_reason": group.keeper_reason,
                "best_score": group.best_score,
                "reclaimable_bytes": sum(facts[r].size for r, _ in group.members),
                "files": [file(group.keeper, "keeper", None, 1.0),
                          *(file(row, "member", score, group.cosines.get(row))
                            for row, score in group.members)]})
        return {"index": str(self.index_dir), "threshold": result.threshold,
                "threshold_source": result.threshold_source, "score": result.score_kind,
                "keep_rule": result.keep_rule, "images": len(facts), "gone": result.gone,
                "groups": groups}

    # -- decisions ----------------------------------------------------------------------
    def decide(self, kind: str, row: int) -> None:
        """Record a decision on the file of `row` within its current group:
        "keeper" (keep it instead of the current keeper), "not-duplicate" (it is not a copy
        of any file of the group), "duplicate" (it is a copy of the keeper, whatever the
        score says)."""
        with self._lock:
            group = self._group_of(row)
            paths = [self.result().facts[r].path for r in
                     (group.keeper, *(member for member, _ in group.members))]
            path = self.result().facts[row].path
            decisions = load_decisions(self.index_dir)
            if kind == "keeper":
                decisions.choose_keeper(path, paths)
            elif kind == "not-duplicate":
                if row == group.keeper:
                    raise MgdedupError("the keeper cannot be marked not-duplicate: swap the "
                                       "keeper first")
                decisions.keepers.discard(path)
                for other in paths:
                    if other != path:
                        decisions.mark("not-duplicate", path, other)
            elif kind == "duplicate":
                if row == group.keeper:
                    raise MgdedupError("the keeper is not a duplicate of itself")
                decisions.mark("duplicate", path, paths[0])
            else:
                raise MgdedupError(f"unknown decision {kind!r}")
            save_decisions(self.index_dir, decisions)
            self._result = None
            log.info("review: %s %s", kind, path)

    def _group_of(self, row: int):
        for group in self.result().groups:
            if row == group.keeper or any(row == member for member, _ in group.members):
                return group
        raise MgdedupError(f"row {row} is not in any group (the groups changed; reload)")

    # -- actions ------------------------------------------------------------------------
    def plan(self, action: str, to: str | None) -> tuple[list[str], str, int]:
        """The dry run of `action` (lines exactly as `dedup --action` prints them), its
        fingerprint (what `apply` must be given), and how many files it would change."""
        steps = self._steps(action, to)
        from mgdedup.duplicates.actions.plan import describe_plan

        lines = [printable(line) for line in describe_plan(steps, self.result().score_kind)]
        return lines, _fingerprint(steps, action, to), sum(s.kind != "skip" for s in steps)

    def apply(self, action: str, to: str | None, fingerprint: str) -> tuple[list[str], bool]:
        """Apply the action if its dry run is still the one shown (`fingerprint`); returns
        the report lines and whether every step worked."""
        from mgdedup.duplicates.actions.apply import apply_plan

        with self._lock:
            steps = self._steps(action, to)
            if _fingerprint(steps, action, to) != fingerprint:
                raise MgdedupError("the dry run changed since it was shown; look at it again "
                                   "before applying")
            report = apply_plan(steps, self.index_dir)
            self._result = None
        out = [printable(m) for m in report.messages]
        out.append(f"{report.done} done, {report.skipped} skipped, {report.failed} failed"
                   + (f"; undo with: mgdedup undo {report.manifest}" if report.manifest
                      else ""))
        return out, report.failed == 0

    def _steps(self, action: str, to: str | None):
        from mgdedup.duplicates.actions.plan import plan_actions

        if action not in ACTIONS:
            raise MgdedupError(f"unknown action {action!r} (use {', '.join(ACTIONS)})")
        target = Path(to).expanduser() if to else None
        return plan_actions(self.index_dir, self.result(), action, target, permanent=False)

    # -- images -------------------------------------------------------------------------
    def image(self, row: int, size: str) -> bytes:
        """A JPEG of the file of `row` (only a file of a group, inside an indexed folder),
        its longest side at most THUMB_PX ("thumb") or FULL_PX ("full")."""
        from mgdedup.imaging.thumbnails import jpeg_thumbnail

        result = self.result()
        shown = {r for g in result.groups for r in (g.keeper, *(m for m, _ in g.members))}
        if row not in shown:
            raise MgdedupError(f"row {row} is not in a group")
        path = Path(os.path.realpath(result.facts[row].path))
        if not any(path == root or root in path.parents for root in self._roots):
            raise MgdedupError(f"{printable(str(path))} is outside the indexed folders")
        limit = THUMB_PX if size == "thumb" else FULL_PX
        return jpeg_thumbnail(path, limit, 80 if size == "thumb" else 90)[0]


def _fingerprint(steps, action: str, to: str | None) -> str:
    """What a dry run commits to: each file, what happens to it and which keeper it
    duplicates (not the trash folder's name, which is new for every run)."""
    digest = hashlib.sha256(f"{action}\0{to or ''}\0".encode())
    for step in steps:
        for part in (step.kind, str(step.source), str(step.keeper), step.reason, step.digest):
            digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:32]

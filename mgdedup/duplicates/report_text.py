"""Duplicate groups rendered for people (table) and for programs (JSON, CSV) on stdout."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mgdedup.duplicates.grouping import Group
from mgdedup.files.names import csv_safe, json_text, printable


@dataclass
class FileFacts:
    """What a report says about one indexed file."""

    path: str  # absolute
    width: int
    height: int
    size: int
    mtime_ns: int = 0


def _group_bytes(group: Group, facts: Sequence[FileFacts]) -> int:
    return sum(facts[row].size for row, _ in group.members)


def groups_to_json(groups: Sequence[Group], facts: Sequence[FileFacts], threshold: float, *,
                   threshold_source: str | None = None, target_precision: float | None = None,
                   score_kind: str = "cosine", keep_rule: str | None = None) -> str:
    """Everything the HTML report shows, for programs.

    Kept from the first version: "threshold", and per group "keeper" (path) and "members"
    (path, score). Added: "threshold_source" (threshold | measured | default | precision),
    "target_precision", "score" (what a score is: copy | cosine | sscd-normalised),
    "keep_rule" and per group "keeper_reason" (why that file is kept),
    "summary" (images indexed, groups, duplicates, reclaimable bytes, threshold), per group
    its number, size and reclaimable bytes, member width/height/bytes and "cosine" (the raw
    cosine to the keeper, whatever the score), and "files": keeper then members with role,
    path, width, height, bytes, score (null for the keeper) and cosine.
    """
    summary = {
        "images": len(facts),
        "groups": len(groups),
        "duplicates": sum(len(group.members) for group in groups),
        "reclaimable_bytes": sum(_group_bytes(group, facts) for group in groups),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "target_precision": target_precision,
    }

    def entry(group: Group, row: int, role: str, score: float | None) -> dict[str, object]:
        fact = facts[row]
        return {"role": role, "path": fact.path, "width": fact.width, "height": fact.height,
                "bytes": fact.size, "score": None if score is None else round(score, 6),
                "cosine": _cosine(group, row)}

    document = {
        "threshold": threshold,
        "threshold_source": threshold_source,
        "target_precision": target_precision,
        "score": score_kind,
        "keep_rule": keep_rule,
        "summary": summary,
        "groups": [
            {
                "group": number,
                "size": 1 + len(group.members),
                "reclaimable_bytes": _group_bytes(group, facts),
                "keeper": facts[group.keeper].path,
                "keeper_reason": group.keeper_reason,
                "members": [{"path": facts[row].path, "score": round(score, 6),
                             "width": facts[row].width, "height": facts[row].height,
                             "bytes": facts[row].size, "cosine": _cosine(group, row)}
                            for row, score in group.members],
                "files": [entry(group, group.keeper, "keeper", None),
                          *(entry(group, row, "member", score)
                            for row, score in group.members)],
            }
            for number, group in enumerate(groups, start=1)
        ],
    }
    return json_text(document, indent=2)


def _cosine(group: Group, row: int) -> float | None:
    """A file's raw cosine to its keeper (1 for the keeper), None where it is not known."""
    if row == group.keeper:
        return 1.0
    cosine = group.cosines.get(row)
    return None if cosine is None else round(cosine, 6)


#: the first seven columns are the original ones, in their order; new ones go at the end
CSV_COLUMNS = ("group", "role", "path", "score", "width", "height", "bytes", "group_size",
               "group_reclaimable_bytes", "images_indexed", "threshold", "threshold_source",
               "score_kind", "cosine", "keeper_reason")


def groups_to_csv(groups: Sequence[Group], facts: Sequence[FileFacts],
                  threshold: float | None = None, *, threshold_source: str | None = None,
                  score_kind: str = "cosine") -> str:
    """One row per file of every group, keeper first; the run's facts (images indexed,
    threshold and how it was chosen, what a score is) repeat on every row so each row
    stands alone.

    The keeper's score is "1.0" (itself) for cosine scores and empty for the others, where
    a self-score is meaningless; its cosine is 1.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    shared = [len(facts), "" if threshold is None else f"{threshold:g}",
              threshold_source or "", score_kind]
    for number, group in enumerate(groups, start=1):
        keeper = facts[group.keeper]
        per_group = [1 + len(group.members), _group_bytes(group, facts)]
        self_score = "1.0" if score_kind == "cosine" else ""
        writer.writerow([number, "keeper", csv_safe(keeper.path), self_score, keeper.width,
                         keeper.height, keeper.size, *per_group, *shared, "1.0",
                         csv_safe(group.keeper_reason)])
        for row, score in group.members:
            member = facts[row]
            cosine = _cosine(group, row)
            writer.writerow([number, "member", csv_safe(member.path), f"{score:.6f}", member.width,
                             member.height, member.size, *per_group, *shared,
                             "" if cosine is None else f"{cosine:.6f}", ""])
    return buffer.getvalue()


def print_groups_table(groups: Sequence[Group], facts: Sequence[FileFacts],
                       console: Console, score_kind: str = "cosine") -> None:
    """One block per group: the keeper first, then members by decreasing score (with the
    cosine beside a copy score, so the two scales are never confused)."""
    with_cosine = score_kind != "cosine"
    for number, group in enumerate(groups, start=1):
        title = f"group {number}" + (f" (keeper: {group.keeper_reason})"
                                     if group.keeper_reason else "")
        table = Table(title=printable(title), title_justify="left", show_edge=False,
                      pad_edge=False, expand=False)
        table.add_column("", no_wrap=True)
        table.add_column("P(copy)" if score_kind == "copy" else "score", justify="right",
                         no_wrap=True)
        if with_cosine:
            table.add_column("cosine", justify="right", no_wrap=True)
        table.add_column("pixels", justify="right", no_wrap=True)
        table.add_column("bytes", justify="right", no_wrap=True)
        table.add_column("path", overflow="fold")
        keeper = facts[group.keeper]
        table.add_row("keep", "", *([""] if with_cosine else []),
                      f"{keeper.width}x{keeper.height}", f"{keeper.size:,}",
                      Text(printable(keeper.path)))
        for row, score in group.members:
            member = facts[row]
            cosine = _cosine(group, row)
            extra = [("" if cosine is None else f"{cosine:.3f}")] if with_cosine else []
            table.add_row("dup", f"{score:.3f}", *extra, f"{member.width}x{member.height}",
                          f"{member.size:,}", Text(printable(member.path)))
        console.print(table)
        console.print()

"""Duplicate groups rendered for people (table) and for programs (JSON, CSV) on stdout."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from mgdedup.grouping import Group


@dataclass
class FileFacts:
    """What a report says about one indexed file."""

    path: str  # absolute
    width: int
    height: int
    size: int


def groups_to_json(groups: Sequence[Group], facts: Sequence[FileFacts], threshold: float) -> str:
    document = {
        "threshold": threshold,
        "groups": [
            {
                "keeper": facts[group.keeper].path,
                "members": [{"path": facts[row].path, "score": round(score, 6)}
                            for row, score in group.members],
            }
            for group in groups
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


CSV_COLUMNS = ("group", "role", "path", "score", "width", "height", "bytes")


def groups_to_csv(groups: Sequence[Group], facts: Sequence[FileFacts]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for number, group in enumerate(groups, start=1):
        keeper = facts[group.keeper]
        writer.writerow([number, "keeper", keeper.path, "1.0", keeper.width, keeper.height,
                         keeper.size])
        for row, score in group.members:
            member = facts[row]
            writer.writerow([number, "member", member.path, f"{score:.6f}", member.width,
                             member.height, member.size])
    return buffer.getvalue()


def print_groups_table(groups: Sequence[Group], facts: Sequence[FileFacts],
                       console: Console) -> None:
    """One block per group: the keeper first, then members by decreasing similarity."""
    for number, group in enumerate(groups, start=1):
        table = Table(title=f"group {number}", title_justify="left", show_edge=False,
                      pad_edge=False, expand=False)
        table.add_column("", no_wrap=True)
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("pixels", justify="right", no_wrap=True)
        table.add_column("bytes", justify="right", no_wrap=True)
        table.add_column("path", overflow="fold")
        keeper = facts[group.keeper]
        table.add_row("keep", "", f"{keeper.width}x{keeper.height}", f"{keeper.size:,}",
                      keeper.path)
        for row, score in group.members:
            member = facts[row]
            table.add_row("dup", f"{score:.3f}", f"{member.width}x{member.height}",
                          f"{member.size:,}", member.path)
        console.print(table)
        console.print()

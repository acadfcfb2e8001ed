"""The `mgdedup` command line: one module per area registers its commands on the shared app.

`shell` holds what every command shares (the Typer app, stderr console, error handling,
progress bars, common options); each other module is a thin layer over the library.
"""

from __future__ import annotations

from mgdedup.cli import (  # noqa: F401  (each module registers its commands when imported)
    demo,
    duplicates,
    evaluation,
    indexing,
    models,
    queries,
    training,
)
from mgdedup.cli.shell import app

__all__ = ["app", "main"]


def main() -> None:
    app()

"""`mgdedup merge`: scale-out commands (indexing is split with `mgdedup index --shard K/N`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mgdedup.cli_shell import app, err, progress_bar, user_errors


@app.command()
@user_errors
def merge(
    shards: Annotated[list[Path], typer.Argument(
        help="Shard index folders (written by `mgdedup index --shard K/N`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the merged index.")],
    factory: Annotated[str | None, typer.Option(
        "--factory", metavar="FACTORY",
        help="FAISS index of the result ('Flat', e.g. 'IVF4096,Flat', or 'auto'). Default: "
             "the shards' own, else auto.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an index already at --out.")] = False,
) -> None:
    """Combine shard indexes into one index (a file in several inputs: the newest row).

    Example: mgdedup index ~/photos --shard K/4 on 4 workers (K = 1..4), then
    mgdedup merge ~/photos/.mgdedup/shard-*-of-4 --out ~/photos/.mgdedup
    """
    from mgdedup.merge import merge_indexes

    with progress_bar("merging") as progress:
        task = progress.add_task("merging", total=None)
        summary = merge_indexes(shards, out, factory=factory, overwrite=overwrite,
                                progress=lambda rows: progress.update(task, completed=rows))
    line = f"merged {summary.inputs} indexes: {summary.total} images in {summary.index_dir}"
    if summary.duplicates:
        line += f"; {summary.duplicates} older duplicate rows dropped"
    if summary.missing_shards:
        line += (f"; shards {', '.join(summary.missing_shards)} missing (run `mgdedup index` "
                 "on the folder to embed their files)")
    err.print(line, highlight=False, soft_wrap=True)

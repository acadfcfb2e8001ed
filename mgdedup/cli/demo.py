"""`mgdedup demo`: the main job on a generated sample, with nothing to download."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mgdedup.cli.shell import DEFAULT_RESOLUTION, app, say, user_errors


@app.command()
@user_errors
def demo(
    folder: Annotated[Path | None, typer.Argument(
        help="Where to write the sample (default: a temporary folder).")] = None,
    resolution: Annotated[int, typer.Option("--resolution", "-r", min=32, max=4096)
                          ] = DEFAULT_RESOLUTION,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", min=-1.0, max=1.0, help="Default: the model's measured one.")
    ] = None,
    keep_files: Annotated[bool, typer.Option(
        "--keep-files/--no-keep-files",
        help="Keep the sample (and its index) so the printed paths can be opened; "
             "--no-keep-files removes a temporary sample at the end.")] = True,
) -> None:
    """Generate images with planted copies, index them and print the duplicate groups.

    Examples: mgdedup demo; mgdedup demo ~/mgdedup-sample (then mgdedup review there)
    """
    from mgdedup.duplicates.find import find_duplicates
    from mgdedup.duplicates.report_text import print_groups_table
    from mgdedup.imaging.synthetic import make_collection
    from mgdedup.index.build import update_index
    from mgdedup.index.layout import INDEX_DIRNAME
    from mgdedup.model.registry import DEFAULT_MODEL, load_model

    temporary = folder is None
    target = (folder.expanduser() if folder is not None else
              Path(tempfile.mkdtemp(prefix="mgdedup-demo-"))).resolve()
    try:
        collection = make_collection(target, originals=10, copies_per_edit=1, seed=7)
        say(f"generated {len(collection.originals)} images and "
                  f"{len(collection.copies)} edited copies in {target}")
        summary = update_index([target], target / INDEX_DIRNAME, load_model(DEFAULT_MODEL),
                               DEFAULT_MODEL, resolution, workers=0, remember=False)
        result = find_duplicates(summary.index_dir, threshold)
        print_groups_table(result.groups, result.facts, Console(), result.score_kind)
        group_of = {result.facts[row].path: number for number, g in enumerate(result.groups)
                    for row in (g.keeper, *(member for member, _ in g.members))}
        planted = [(str(o.resolve()), str(c.resolve())) for o, c, _ in collection.copies]
        hits = sum(o in group_of and group_of[o] == group_of.get(c) for o, c in planted)
        scale = "P(copy)" if result.score_kind == "copy" else result.score_kind
        say(f"found {hits} of {len(planted)} planted copies at threshold "
            f"{result.threshold:g} ({scale})")
    finally:
        if temporary and not keep_files:
            shutil.rmtree(target, ignore_errors=True)
    if temporary and not keep_files:
        say(f"removed the sample in {target}")
    else:
        say(f"the sample and its index are in {target}: try `mgdedup review --index "
            f"{target / INDEX_DIRNAME}`" + (f", or remove it with: rm -r {target}"
                                            if temporary else ""))

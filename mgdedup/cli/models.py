"""`mgdedup whiten`: a model file carrying a whitening fitted on the user's own images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mgdedup.cli.shell import (
    DEFAULT_RESOLUTION,
    ModelOption,
    WorkersOption,
    app,
    elapsed_and_rate,
    progress_bar,
    say,
    user_errors,
)
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import check_writable


@app.command()
@user_errors
def whiten(
    folders: Annotated[list[Path], typer.Argument(help="Folders of unlabelled images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New model file to write.")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", min=32, max=4096)
                          ] = DEFAULT_RESOLUTION,
    dim: Annotated[int | None, typer.Option("--dim", min=1,
                                               help="Keep the top DIM components.")] = None,
    calibration_images: Annotated[int, typer.Option(
        "--calibration-images", min=0,
        help="Measure the default dedup threshold on edited copies of this many of the "
             "images (0: keep the generic one).")] = 100,
    model: ModelOption = None,
    workers: WorkersOption = None,
) -> None:
    """Learn PCA whitening at one resolution and write a model file that carries it.

    Example: mgdedup whiten ~/unlabelled --resolution 500 --out my-model.pt
    """
    from mgdedup.model.model_file import save_model
    from mgdedup.model.registry import load_model
    from mgdedup.tuning.whiten import whiten_model

    out = out.expanduser()
    if out.exists():
        raise MgdedupError(f"{out} exists; choose another --out (never overwritten)")
    check_writable(out, "model file")
    for folder in folders:
        if not folder.expanduser().is_dir():
            raise MgdedupError(f"no such folder: {folder}")
    started = time.perf_counter()
    with progress_bar("embedding") as progress:
        task = progress.add_task("loading the model", total=None, unit=" img/s")
        loaded = load_model(model)
        progress.update(task, description="scanning")
        whitened, report = whiten_model(
            loaded, folders, resolution, dim, workers=workers,
            calibration_images=calibration_images,
            on_start=lambda total: progress.update(task, total=total, description="embedding"),
            on_progress=lambda count: progress.advance(task, count))
    whitened.info.name = out.stem
    save_model(whitened, out)
    threshold = report.whitening.threshold
    say(f"whitening {report.dim}-d fitted on {report.images} images at resolution "
              f"{resolution} (p*={report.whitening.p:g}), {report.skipped} skipped"
              + (f"; default threshold {threshold:g}" if threshold is not None else "")
              + f"; wrote {out} "
              + elapsed_and_rate(time.perf_counter() - started, report.images))

"""`mgdedup calibrate`: which threshold reaches a target precision on this collection.

The estimate itself (synthetic copies as positives, the collection's nearest neighbours as
candidates, a copy-rate prior) is documented in `mgdedup.calibrate`; `dedup --precision P`
reads what this command stores in IDX/calibration.json (and runs it when missing or stale).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mgdedup.calibrate import (
    DEFAULT_AUG_COPIES,
    DEFAULT_COPY_RATE,
    DEFAULT_NEIGHBOURS,
    DEFAULT_SAMPLE,
    DEFAULT_TARGETS,
)
from mgdedup.cli_shell import (
    IndexOption,
    ModelOption,
    WorkersOption,
    app,
    err,
    progress_bar,
    user_errors,
)
from mgdedup.errors import MgdedupError


@app.command()
@user_errors
def calibrate(
    index_dir: IndexOption = None,
    target_precision: Annotated[list[float] | None, typer.Option(
        "--target-precision", "-p", min=0.0, max=1.0,
        help="Precision to reach (repeatable). Default: 0.9, 0.95 and 0.99.")] = None,
    sample: Annotated[int, typer.Option(
        "--sample", min=1, help="Indexed images to make synthetic copies of.")
    ] = DEFAULT_SAMPLE,
    aug_copies: Annotated[int, typer.Option(
        "--aug-copies", min=0, help="Full-augmentation (IN-aug) copies per image, besides the "
                                    "five planted edits.")] = DEFAULT_AUG_COPIES,
    neighbours: Annotated[int, typer.Option(
        "--neighbours", min=1, help="Nearest other images looked at per indexed image.")
    ] = DEFAULT_NEIGHBOURS,
    copy_rate: Annotated[float, typer.Option(
        "--copy-rate", min=0.0,
        help="Copies per image assumed when the collection shows fewer: bounds false alarms "
             "in a collection without copies.")] = DEFAULT_COPY_RATE,
    score_norm: Annotated[bool, typer.Option(
        "--score-norm/--no-score-norm",
        help="Calibrate SSCD-normalised scores (what `dedup --precision` uses unless told "
             "--no-score-norm) or plain cosines.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Which images are sampled.")] = 0,
    model: ModelOption = None,
    workers: WorkersOption = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Estimate, without labels, the threshold reaching each target precision here.

    The result is stored in the index folder for `dedup --precision`.

    Example: mgdedup calibrate --target-precision 0.95
    """
    from mgdedup.calibrate import CALIBRATION_NAME, calibrate_index, save_calibration
    from mgdedup.locate import find_index
    from mgdedup.score_norm import ScoreNorm

    targets = sorted(set(target_precision or DEFAULT_TARGETS))
    for target in targets:
        if not 0.0 < target < 1.0:
            raise MgdedupError(f"--target-precision must be between 0 and 1 (exclusive), "
                               f"got {target:g}")
    where = find_index(index_dir)
    err.print(f"index: {where}", highlight=False, soft_wrap=True)
    with progress_bar("copies") as progress:
        task = progress.add_task("embedding copies", total=None)
        calibration = calibrate_index(
            where, sample=sample, aug_copies=aug_copies, neighbours=neighbours,
            prior_copy_rate=copy_rate, score_norm=ScoreNorm() if score_norm else None,
            seed=seed, model_spec=model, workers=workers, device=device,
            on_start=lambda total: progress.update(task, total=total),
            on_progress=lambda count: progress.advance(task, count))
    path = save_calibration(where, calibration)
    for skipped_path, reason in calibration.skipped:
        err.print(f"skipped {skipped_path}: {reason}", highlight=False, soft_wrap=True)
    rows = []
    for target in targets:
        found = calibration.threshold_for(target)
        rows.append({"target_precision": target,
                     "threshold": None if found is None else found[0],
                     "estimated_precision": None if found is None else found[1],
                     "recall": None if found is None else found[2]})
    if as_json:
        typer.echo(json.dumps({
            "index": str(where), "mode": calibration.mode, "sampled": calibration.sampled,
            "positives": calibration.positives, "neighbours": calibration.neighbours,
            "estimated_copy_rate": calibration.estimated_copy_rate,
            "copy_rate": calibration.copy_rate, "targets": rows}, indent=2))
    else:
        table = Table(show_edge=False, pad_edge=False)
        for name in ("precision", "threshold", "estimated", "recall"):
            table.add_column(name, justify="right", no_wrap=True)
        for row in rows:
            if row["threshold"] is None:
                table.add_row(f"{row['target_precision']:g}", "not reached", "", "")
            else:
                table.add_row(f"{row['target_precision']:g}", f"{row['threshold']:.4f}",
                              f"{row['estimated_precision']:.3f}", f"{row['recall']:.3f}")
        Console().print(table)
    err.print(f"{calibration.sampled} images, {calibration.positives} synthetic copies, "
              f"{calibration.neighbours} neighbours each; copies per image: "
              f"{calibration.estimated_copy_rate:.3g} estimated, {calibration.copy_rate:.3g} "
              f"used ({calibration.mode} scores); stored in {path.parent / CALIBRATION_NAME}",
              highlight=False, soft_wrap=True)

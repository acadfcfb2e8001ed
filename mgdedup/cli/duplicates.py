"""`mgdedup dedup`, `undo`, `mark` and `calibrate`: finding duplicate groups and acting on them.

Data (tables, JSON, CSV) goes to stdout, messages to stderr. `calibrate` estimates, without
labels, the threshold reaching a target precision on this collection (the estimator is
documented in `mgdedup.duplicates.precision`); `dedup --precision P` reads what it stores.
"""

from __future__ import annotations

import io
import json
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from mgdedup.cli.shell import (
    Format,
    IndexOption,
    ModelOption,
    UsageError,
    WorkersOption,
    app,
    elapsed_and_rate,
    progress_bar,
    say,
    user_errors,
)
from mgdedup.duplicates.actions.kinds import SKIP, Action
from mgdedup.duplicates.calibration_defaults import (
    DEFAULT_AUG_COPIES,
    DEFAULT_COPY_RATE,
    DEFAULT_NEIGHBOURS,
    DEFAULT_SAMPLE,
    DEFAULT_TARGETS,
)
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import check_writable
from mgdedup.files.names import printable
from mgdedup.imaging.edit_seeds import MAX_AUG_COPIES

if TYPE_CHECKING:
    from mgdedup.duplicates.find import DedupResult


class KeepRule(str, Enum):
    original = "original"
    most_pixels = "most-pixels"
    largest = "largest"
    oldest = "oldest"
    newest = "newest"
    exif = "exif"


def keeper_rule(keep: KeepRule, prefer: list[Path] | None):
    """The library's keeper rule from the CLI options; --prefer folders must exist."""
    from mgdedup.duplicates.keepers import KeeperRule

    for folder in prefer or ():
        if not folder.expanduser().is_dir():
            raise MgdedupError(f"--prefer {folder}: not a folder")
    return KeeperRule(keep.value, tuple(prefer or ()))


class Score(str, Enum):
    copy = "copy"
    cosine = "cosine"
    normalised = "normalised"


@app.command()
@user_errors
def dedup(
    index_dir: IndexOption = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", min=-1.0, max=1.0,
        help="Score at or above which a file is a duplicate. With the copy score (the "
             "default) it is a probability: 0.9 keeps the pairs at least 90 % sure to be "
             "copies. With --score cosine, a cosine similarity to the keeper. Default: the "
             "threshold measured for the index's model.")] = None,
    output_format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here, not stdout.")
                   ] = None,
    action: Annotated[Action | None, typer.Option(
        "--action", help="Act on the duplicates (never the keepers). Dry run unless --apply; "
                         "every applied step is recorded for `mgdedup undo`.")] = None,
    to: Annotated[Path | None, typer.Option(
        "--to", help="Where moved/deleted files go, keeping their folders (outside the "
                     "indexed folders). Default for delete/links: a trash folder in the index.")
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Really do it.")] = False,
    permanent: Annotated[bool, typer.Option(
        "--permanent", help="With --action delete: unlink instead of trashing (cannot be "
                            "undone).")] = False,
    precision: Annotated[float | None, typer.Option(
        "--precision", "-p", min=0.0, max=1.0,
        help="Use the threshold that reached this precision: on the copies the copy score "
             "was fitted on, or (cosine scores) estimated on this collection by `mgdedup "
             "calibrate`, run first when missing or stale. Not with --threshold.")] = None,
    score: Annotated[Score | None, typer.Option(
        "--score", "-s",
        help="copy: each candidate pair is verified (local features, geometry) and scored "
             "as the probability that it is a copy; groups are the images connected by such "
             "pairs. cosine: the descriptor's cosine to the keeper only (faster, misses hard "
             "copies). normalised: the cosine less the pair's similarity to the rest of the "
             "collection. Default: copy where the model has a copy score.")] = None,
    score_norm: Annotated[bool | None, typer.Option(
        "--score-norm/--no-score-norm",
        help="Same as --score normalised / --score cosine (kept from earlier versions).")
    ] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Threads verifying candidate pairs (default: one per core)."
    )] = None,
    keep: Annotated[KeepRule, typer.Option(
        "--keep", help="Which file of a group is kept. original: the one the others are "
                       "copies of where that can be told (camera EXIF, shows the picture "
                       "largest rather than as a screenshot or paste, modified first), then "
                       "most pixels; or most-pixels, largest, oldest, newest, exif. Files "
                       "chosen in `mgdedup review` always win.")] = KeepRule.original,
    prefer: Annotated[list[Path] | None, typer.Option(
        "--prefer", help="Keep files below this folder before any rule (repeatable; the "
                         "first given wins).")] = None,
) -> None:
    """Print duplicate groups: the file kept (the original, where it can be told; why is
    printed with each group) and its copies.

    Examples: mgdedup dedup; mgdedup dedup --threshold 0.9 --format json > groups.json;
    mgdedup dedup --action move --to ~/dups (dry run), then the same with --apply
    """
    from mgdedup.duplicates.find import find_duplicates, has_copy_score
    from mgdedup.duplicates.report_text import groups_to_csv, groups_to_json, print_groups_table
    from mgdedup.duplicates.score_norm import ScoreNorm, default_score_norm
    from mgdedup.index.layout import find_index

    if apply and action is None:
        raise UsageError("--apply needs --action move|delete|hardlink|symlink (nothing to "
                         "apply)")
    if threshold is not None and precision is not None:
        raise MgdedupError("give --threshold or --precision, not both")
    if score is not None and score_norm is not None and \
            (score is Score.normalised) != score_norm:
        raise MgdedupError("--score and --score-norm/--no-score-norm disagree; give one")
    if output_format is Format.html and out is None and action is None:
        raise MgdedupError("--format html needs --out FILE (a self-contained page)")
    if out is not None and action is None:
        check_writable(out.expanduser(), "report")
    where = find_index(index_dir)
    if score is None and score_norm is not None:
        score = Score.normalised if score_norm else Score.cosine
    if score is None:
        score = Score.copy if has_copy_score(where) else \
            Score.normalised if default_score_norm(precision is not None) else Score.cosine
    if score is Score.copy and threshold is not None and not 0.0 <= threshold <= 1.0:
        raise MgdedupError(f"a copy score threshold is a probability in [0, 1], got "
                           f"{threshold:g} (a cosine? then add --score cosine)")
    norm = ScoreNorm() if score is Score.normalised else None
    with progress_bar("calibrating") as progress:
        task = progress.add_task("calibrating", total=None, visible=False)
        verify = progress.add_task("verifying candidate pairs", total=None, visible=False,
                                   unit=" pairs/s")

        def calibrating(reason: str) -> None:
            say(f"calibrating the threshold for this collection ({reason}; stored in "
                f"{where} for next time)")
            progress.update(task, visible=True)

        result = find_duplicates(
            where, threshold, precision=precision, score_norm=norm,
            scoring="copy" if score is Score.copy else "cosine", workers=workers,
            keep=keeper_rule(keep, prefer), on_calibrate=calibrating,
            on_verify=lambda total: progress.update(verify, total=total, visible=True),
            on_verified=lambda count: progress.advance(verify, count),
            on_start=lambda total: progress.update(task, total=total),
            on_progress=lambda count: progress.advance(task, count))
    if result.gone:
        say(f"{result.gone} files that an applied action moved away are left out (`mgdedup "
            "undo` puts them back; `mgdedup index` refreshes the index)")
    if action is not None:
        _act(where, result, action, to, apply, permanent)
        return
    say(f"index: {where}")
    if output_format is Format.html:
        from mgdedup.duplicates.report_html import write_html

        write_html(result, out.expanduser(), index_dir=where)
        say(f"wrote {out} ({len(result.groups)} groups)")
    elif output_format is Format.table and out is None:
        print_groups_table(result.groups, result.facts, Console(), result.score_kind)
    else:
        if output_format is Format.json:
            text = groups_to_json(result.groups, result.facts, result.threshold,
                                  threshold_source=result.threshold_source,
                                  target_precision=result.target_precision,
                                  score_kind=result.score_kind,
                                  keep_rule=result.keep_rule) + "\n"
        elif output_format is Format.csv:
            text = groups_to_csv(result.groups, result.facts, result.threshold,
                                 threshold_source=result.threshold_source,
                                 score_kind=result.score_kind)
        else:
            buffer = Console(record=True, width=160, file=io.StringIO())
            print_groups_table(result.groups, result.facts, buffer, result.score_kind)
            text = buffer.export_text()
        _write_output(text, out)
    say(f"{len(result.groups)} groups, {result.duplicate_count} duplicates, "
        f"{result.reclaimable_bytes / 1e6:.1f} MB reclaimable at threshold "
        f"{result.threshold:g} ({_threshold_origin(result)})")


def _threshold_origin(result: DedupResult) -> str:
    """How the threshold of a dedup run was chosen, and on which scale, in words."""
    scale = {"copy": "copy score P(copy)", "sscd-normalised": "normalised scores"}.get(
        result.score_kind, "cosine")
    from mgdedup.duplicates.find import THRESHOLD_ORIGINS

    if result.threshold_source == "precision":
        where = "the fitting copies" if result.score_kind == "copy" else "this collection"
        return f"precision {result.target_precision:g} on {where}, {scale}"
    return f"{THRESHOLD_ORIGINS.get(result.threshold_source, 'given')}, {scale}"


def _act(where: Path, result: DedupResult, action: Action, to: Path | None, apply: bool,
         permanent: bool) -> None:
    """Dry run (the plan on stdout) or apply and say how to undo."""
    from mgdedup.duplicates.actions.apply import apply_plan
    from mgdedup.duplicates.actions.plan import describe_plan, plan_actions

    steps = plan_actions(where, result, action,
                         to.expanduser() if to is not None else None, permanent)
    if not apply:
        say(f"index: {where}")
        for line in describe_plan(steps, result.score_kind):
            typer.echo(printable(line))
        say(f"dry run: nothing changed; add --apply to {action.value} "
                  f"{sum(s.kind != SKIP for s in steps)} files")
        return
    report = apply_plan(steps, where)
    say(f"index: {where}")
    for message in report.messages:
        say(message)
    say(f"{report.done} done, {report.skipped} skipped, {report.failed} failed"
              + (f"; undo with: mgdedup undo {report.manifest}" if report.manifest else ""))
    if report.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def undo(
    manifest: Annotated[Path | None, typer.Argument(
        help="Manifest of an applied action (default: the latest of the index).")] = None,
    index_dir: IndexOption = None,
) -> None:
    """Put back every file an applied `dedup --action` moved, linked or trashed.

    Example: mgdedup undo
    """
    from mgdedup.duplicates.actions.manifest import manifests_of
    from mgdedup.duplicates.actions.undo import latest_manifest
    from mgdedup.duplicates.actions.undo import undo as undo_manifest
    from mgdedup.index.layout import IndexDir, find_index

    where = None
    if manifest is None:
        where = find_index(index_dir)
        manifest = latest_manifest(where)
    report = undo_manifest(manifest.expanduser())
    if report.nothing_left and not report.not_undoable:
        older = manifests_of(IndexDir(where).actions)[:-1] if where is not None else []
        say(f"nothing left to undo: every file of the latest action ({manifest}) is back "
            f"({report.already_undone} in place)"
            + (f"; an older one: mgdedup undo {older[-1]}" if older else ""))
        return
    for message in report.messages:
        say(message)
    say(f"{report.restored} restored, {report.already_undone} already in place, "
              f"{report.skipped} skipped, {report.failed} failed, {report.not_undoable} not "
              f"undoable ({manifest})")
    if not report.complete:
        raise typer.Exit(1)


def _write_output(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
        return
    from mgdedup.files.atomic import write_text

    write_text(out.expanduser(), text, "report")
    say(f"wrote {out}")



class Verdict(str, Enum):
    duplicate = "duplicate"
    not_duplicate = "not-duplicate"


@app.command()
@user_errors
def mark(
    verdict: Annotated[Verdict, typer.Argument(help="duplicate or not-duplicate")],
    first: Annotated[Path, typer.Argument(help="An indexed image.")],
    second: Annotated[Path, typer.Argument(help="Another indexed image.")],
    index_dir: IndexOption = None,
) -> None:
    """Remember your verdict on a pair; every later `dedup` honours it.

    Example: mgdedup mark not-duplicate a.jpg b.jpg
    """
    from mgdedup.duplicates.decisions import load_decisions, save_decisions
    from mgdedup.index.layout import IndexDir, find_index

    where = find_index(index_dir)
    with IndexDir(where).open_store() as store:
        indexed = {str(p) for p in store.absolute_paths()}
    pair = []
    for path in (first, second):
        resolved = str(path.expanduser().resolve())
        if resolved not in indexed:
            raise MgdedupError(f"{path} is not in the index {where}")
        pair.append(resolved)
    decisions = load_decisions(where)
    decisions.mark(verdict.value, *pair)
    save_decisions(where, decisions)
    say(f"marked {verdict.value}: {pair[0]} and {pair[1]} (in {where})")



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
        "--aug-copies", min=0, max=MAX_AUG_COPIES,
        help="Full-augmentation (IN-aug) copies per image, besides the "
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
    from mgdedup.duplicates.precision import calibrate_index, save_calibration
    from mgdedup.duplicates.score_norm import ScoreNorm
    from mgdedup.index.layout import find_index

    targets = sorted(set(target_precision or DEFAULT_TARGETS))
    for target in targets:
        if not 0.0 < target < 1.0:
            raise MgdedupError(f"--target-precision must be between 0 and 1 (exclusive), "
                               f"got {target:g}")
    where = find_index(index_dir)
    say(f"index: {where}")
    started = time.perf_counter()
    with progress_bar("copies") as progress:
        task = progress.add_task("embedding copies", total=None, unit=" img/s")
        calibration = calibrate_index(
            where, sample=sample, aug_copies=aug_copies, neighbours=neighbours,
            prior_copy_rate=copy_rate, score_norm=ScoreNorm() if score_norm else None,
            seed=seed, model_spec=model, workers=workers, device=device,
            on_start=lambda total: progress.update(task, total=total),
            on_progress=lambda count: progress.advance(task, count))
    path = save_calibration(where, calibration)
    for skipped_path, reason in calibration.skipped:
        say(f"skipped {skipped_path}: {reason}")
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
    say(f"{calibration.sampled} images, {calibration.positives} synthetic copies, "
              f"{calibration.neighbours} neighbours each; copies per image: "
              f"{calibration.estimated_copy_rate:.3g} estimated, {calibration.copy_rate:.3g} "
              f"used ({calibration.mode} scores); stored in {path} "
              + elapsed_and_rate(time.perf_counter() - started, calibration.positives,
                                 "copies"))


@app.command()
@user_errors
def review(
    index_dir: IndexOption = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", min=0.0, max=1.0,
        help="Copy score at or above which files group (default: the measured one).")] = None,
    keep: Annotated[KeepRule, typer.Option(
        "--keep", help="Keeper rule before your choices (see `dedup --keep`).")
    ] = KeepRule.original,
    prefer: Annotated[list[Path] | None, typer.Option(
        "--prefer", help="Keep files below this folder first (repeatable).")] = None,
    port: Annotated[int, typer.Option(
        "--port", min=0, max=65535, help="Port on 127.0.0.1 (default: a free one).")] = 0,
    open_browser: Annotated[bool, typer.Option(
        "--open/--no-open", help="Open the page in the default browser.")] = True,
) -> None:
    """Review the duplicate groups in a local page: compare side by side, keep another file,
    mark not-duplicate / duplicate (saved in the index for every later dedup), then apply an
    action after reading its dry run. Serves 127.0.0.1 only, with a per-run token.

    Example: mgdedup review
    """
    from mgdedup.index.layout import find_index
    from mgdedup.review.server import ReviewServer
    from mgdedup.review.session import ReviewSession

    where = find_index(index_dir)
    session = ReviewSession(where, threshold, keeper_rule(keep, prefer))
    say(f"index: {where}; finding the groups")
    document = session.groups_document()
    try:
        server = ReviewServer(session, port)
    except OSError as error:
        raise MgdedupError(f"cannot listen on 127.0.0.1:{port}: {error.strerror}") from None
    say(f"{len(document['groups'])} groups; review at {server.url} (this machine only; "
        "Ctrl+C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("review stopped; decisions are saved in the index")
    finally:
        server.server_close()

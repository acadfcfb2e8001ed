"""The `mgdedup` commands for indexing, finding and acting on duplicates, and classifying.

Shared plumbing (the app, error handling, progress bars) lives in `cli_shell`; other areas
(evaluation, training, scale-out) register their commands from their own `cli_*` modules,
imported at the end of this module.
"""

from __future__ import annotations

import io
import json
import tempfile
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from mgdedup.cli_shell import (
    DEFAULT_RESOLUTION,
    ActionName,
    Format,
    IndexOption,
    ModelOption,
    WorkersOption,
    app,
    err,
    progress_bar,
    user_errors,
)
from mgdedup.errors import MgdedupError

if TYPE_CHECKING:
    from mgdedup.dedup import DedupResult


@app.command()
@user_errors
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders (or image files) to index.")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", min=32, max=4096,
                                            help="Test resolution s*.")] = DEFAULT_RESOLUTION,
    model: ModelOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Index folder. Default: .mgdedup/ inside the first folder.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    workers: WorkersOption = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    rebuild: Annotated[bool, typer.Option(
        "--rebuild", help="Replace an index built with another model or resolution.")] = False,
    backend: Annotated[str, typer.Option(
        "--backend", help="auto|torch|onnx. auto: ONNX Runtime on CPU when available "
                          "(same descriptors, faster), else PyTorch; CUDA uses PyTorch.")
    ] = "auto",
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="K/N",
        help="Embed only share K of N (1 <= K <= N, by a hash of each file's path) into its "
             "own index; combine the N shard indexes with `mgdedup merge`. Default --out: "
             ".mgdedup/shard-K-of-N inside the first folder.")] = None,
    factory: Annotated[str | None, typer.Option(
        "--factory", metavar="FACTORY",
        help="FAISS index for search, remembered by the index: 'Flat' (exact), e.g. "
             "'IVF4096,Flat' (approximate, for millions of images), or 'auto' (exact up to "
             "250k images, IVF above). Default: what the index remembers, else auto.")] = None,
) -> None:
    """Embed every image below FOLDERS; re-running only embeds new or changed files.

    Examples: mgdedup index ~/photos --resolution 500;
    N workers: mgdedup index ~/photos --shard K/N (K = 1..N), then
    mgdedup merge ~/photos/.mgdedup/shard-*-of-N --out ~/photos/.mgdedup
    """
    from mgdedup.embed import preferred_backend
    from mgdedup.indexer import ProgressHooks, Shard, update_index
    from mgdedup.locate import default_index_dir
    from mgdedup.registry import canonical_spec, load_model

    parsed = Shard.parse(shard) if shard is not None else None
    spec = canonical_spec(model)
    loaded = load_model(spec)
    if out is not None:
        index_dir = out.expanduser()
    elif parsed is not None:  # N workers must not share one folder: one index each
        index_dir = default_index_dir(folders) / f"shard-{parsed.k}-of-{parsed.n}"
    else:
        index_dir = default_index_dir(folders)
    with preferred_backend(backend), progress_bar("embedding") as progress:
        task = progress.add_task("embedding", total=None)
        hooks = ProgressHooks(start=lambda total: progress.update(task, total=total),
                              advance=lambda count: progress.advance(task, count))
        summary = update_index(folders, index_dir, loaded, spec, resolution,
                               batch_size=batch_size, workers=workers, rebuild=rebuild,
                               device=device, progress=hooks, shard=parsed, factory=factory)
    line = (f"{summary.embedded} indexed, {summary.skipped} skipped"
            + (f" (see {summary.errors_path})" if summary.skipped else "")
            + f"; {summary.unchanged} unchanged, {summary.removed} removed; "
              f"{summary.total} images in {summary.index_dir}")
    err.print(line, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def dedup(
    index_dir: IndexOption = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", min=-1.0, max=1.0,
        help="Cosine similarity to the keeper at or above which a file is a duplicate. "
             "Default: the threshold measured for the index's model (precision 0.99 on "
             "edited copies of real photos).")] = None,
    output_format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here, not stdout.")
                   ] = None,
    action: Annotated[ActionName | None, typer.Option(
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
        help="Use the threshold estimated to reach this precision on this collection "
             "(`mgdedup calibrate`; run first when missing or stale). Not with --threshold."
    )] = None,
    score_norm: Annotated[bool | None, typer.Option(
        "--score-norm/--no-score-norm",
        help="Score pairs by SSCD-normalised similarity (the collection as background) "
             "instead of plain cosine; --threshold is then on that scale, and without one "
             "the threshold is calibrated for precision 0.99. Default: normalised with "
             "--precision, cosine otherwise.")
    ] = None,
) -> None:
    """Print duplicate groups: a keeper (most pixels, then largest file) and its copies.

    Examples: mgdedup dedup; mgdedup dedup --threshold 0.7 --format json > groups.json;
    mgdedup dedup --action move --to ~/dups (dry run), then the same with --apply
    """
    from mgdedup.dedup import find_duplicates
    from mgdedup.locate import find_index
    from mgdedup.report import groups_to_csv, groups_to_json, print_groups_table
    from mgdedup.score_norm import ScoreNorm, default_score_norm

    if threshold is not None and precision is not None:
        raise MgdedupError("give --threshold or --precision, not both")
    if output_format is Format.html and out is None and action is None:
        raise MgdedupError("--format html needs --out FILE (a self-contained page)")
    where = find_index(index_dir)
    norm = default_score_norm(precision is not None) if score_norm is None else \
        (ScoreNorm() if score_norm else None)
    with progress_bar("calibrating") as progress:
        task = progress.add_task("calibrating", total=None, visible=False)

        def calibrating(reason: str) -> None:
            err.print(f"calibrating the threshold for this collection ({reason}; stored in "
                      f"{where} for next time)", highlight=False, soft_wrap=True)
            progress.update(task, visible=True)

        result = find_duplicates(
            where, threshold, precision=precision, score_norm=norm, on_calibrate=calibrating,
            on_start=lambda total: progress.update(task, total=total),
            on_progress=lambda count: progress.advance(task, count))
    if action is not None:
        _act(where, result, action, to, apply, permanent)
        return
    err.print(f"index: {where}", highlight=False, soft_wrap=True)
    if output_format is Format.html:
        from mgdedup.report_html import write_html

        write_html(result, out.expanduser())
        err.print(f"wrote {out} ({len(result.groups)} groups)", highlight=False)
    elif output_format is Format.table and out is None:
        print_groups_table(result.groups, result.facts, Console())
    else:
        normalised = result.score_norm is not None
        if output_format is Format.json:
            text = groups_to_json(result.groups, result.facts, result.threshold,
                                  threshold_source=result.threshold_source,
                                  target_precision=result.target_precision,
                                  normalised=normalised) + "\n"
        elif output_format is Format.csv:
            text = groups_to_csv(result.groups, result.facts, result.threshold,
                                 threshold_source=result.threshold_source,
                                 normalised=normalised)
        else:
            buffer = Console(record=True, width=160, file=io.StringIO())
            print_groups_table(result.groups, result.facts, buffer)
            text = buffer.export_text()
        _write_output(text, out)
    err.print(f"{len(result.groups)} groups, {result.duplicate_count} duplicates, "
              f"{result.reclaimable_bytes / 1e6:.1f} MB reclaimable at threshold "
              f"{result.threshold:g} ({_threshold_origin(result)})",
              highlight=False)


def _threshold_origin(result: DedupResult) -> str:
    """How the threshold of a dedup run was chosen, in words."""
    scale = "normalised scores" if result.score_norm is not None else "cosine"
    if result.threshold_source == "precision":
        return f"calibrated for precision {result.target_precision:g}, {scale}"
    if result.threshold_source == "measured":
        return f"measured for the model, {scale}"
    if result.threshold_source == "default":
        return f"generic default, {scale}"
    return f"given, {scale}"


def _act(where: Path, result: DedupResult, action: ActionName, to: Path | None, apply: bool,
         permanent: bool) -> None:
    """Dry run (the plan on stdout) or apply and say how to undo."""
    from mgdedup.actions import Action, apply_plan, describe_plan, plan_actions

    steps = plan_actions(where, result, Action(action.value),
                         to.expanduser() if to is not None else None, permanent)
    err.print(f"index: {where}", highlight=False, soft_wrap=True)
    if not apply:
        for line in describe_plan(steps):
            typer.echo(line)
        err.print(f"dry run: nothing changed; add --apply to {action.value} "
                  f"{sum(s.kind != 'skip' for s in steps)} files", highlight=False)
        return
    report = apply_plan(steps, where)
    for message in report.messages:
        err.print(message, highlight=False, soft_wrap=True)
    err.print(f"{report.done} done, {report.skipped} skipped, {report.failed} failed"
              + (f"; undo with: mgdedup undo {report.manifest}" if report.manifest else ""),
              highlight=False, soft_wrap=True)
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
    from mgdedup.actions import latest_manifest
    from mgdedup.actions import undo as undo_manifest
    from mgdedup.locate import find_index

    if manifest is None:
        manifest = latest_manifest(find_index(index_dir))
    report = undo_manifest(manifest.expanduser())
    for message in report.messages:
        err.print(message, highlight=False, soft_wrap=True)
    err.print(f"{report.restored} restored, {report.skipped} skipped, {report.failed} failed, "
              f"{report.not_undoable} not undoable ({manifest})", highlight=False,
              soft_wrap=True)
    if not report.complete:
        raise typer.Exit(1)


def _write_output(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.expanduser().write_text(text, encoding="utf-8")
    except OSError as error:
        raise MgdedupError(f"cannot write {out}: {error.strerror}") from None
    err.print(f"wrote {out}", highlight=False)


@app.command()
@user_errors
def search(
    images: Annotated[list[Path], typer.Argument(help="Query images.")],
    index_dir: IndexOption = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 10,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Nearest indexed images for each query image.

    Example: mgdedup search some.jpg -k 10
    """
    from mgdedup.locate import find_index
    from mgdedup.lookup import search_index

    where = find_index(index_dir)
    results = search_index(where, images, k=k, model_spec=model)
    err.print(f"index: {where}", highlight=False, soft_wrap=True)
    for result in results:
        if result.error:
            err.print(f"skipped {result.query}: {result.error}", highlight=False)
    if as_json:
        typer.echo(json.dumps([{"query": r.query, "results": [{"path": p, "score": round(s, 6)}
                                                              for p, s in r.results]}
                               for r in results if r.error is None], ensure_ascii=False, indent=2))
    else:
        for result in results:
            if result.error is None:
                typer.echo(result.query)
                for path, score in result.results:
                    typer.echo(f"  {score:.3f}  {path}")
    if all(r.error for r in results):
        raise typer.Exit(1)


@app.command()
@user_errors
def classify(
    images: Annotated[list[Path] | None, typer.Argument(help="Images to classify.")] = None,
    index_dir: IndexOption = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Classes per image.")] = 5,
    resolution: Annotated[int, typer.Option("--resolution", "-r", min=32, max=4096)] = 224,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Top ImageNet classes of images, or of every indexed image with --index (no image read).

    Example: mgdedup classify img.jpg -k 5
    """
    from mgdedup.classify import classify_images, classify_index

    if images:
        from mgdedup.registry import load_model

        predictions = classify_images(load_model(model), images, resolution, k=k)
    elif index_dir is not None:
        from mgdedup.locate import find_index

        predictions = classify_index(find_index(index_dir), k=k, model_spec=model)
    else:
        raise MgdedupError("give images to classify, or --index to classify an index")
    for prediction in predictions:
        if prediction.error:
            err.print(f"skipped {prediction.path}: {prediction.error}", highlight=False)
    good = [p for p in predictions if p.error is None]
    if as_json:
        typer.echo(json.dumps([{"path": p.path, "top": [{"index": i, "label": label,
                                                         "prob": round(q, 6)}
                                                        for i, label, q in p.top]}
                               for p in good], ensure_ascii=False, indent=2))
    else:
        for prediction in good:
            typer.echo(prediction.path)
            for _, label, probability in prediction.top:
                typer.echo(f"  {probability:6.1%}  {label}")
    if not good:
        raise typer.Exit(1)


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
    from mgdedup.checkpoint import save_model
    from mgdedup.fit_whitening import whiten_model
    from mgdedup.registry import load_model

    out = out.expanduser()
    if out.exists():
        raise MgdedupError(f"{out} exists; choose another --out (never overwritten)")
    with progress_bar("embedding") as progress:
        task = progress.add_task("embedding", total=None)
        whitened, report = whiten_model(
            load_model(model), folders, resolution, dim, workers=workers,
            calibration_images=calibration_images,
            on_start=lambda total: progress.update(task, total=total),
            on_progress=lambda count: progress.advance(task, count))
    whitened.info.name = out.stem
    save_model(whitened, out)
    threshold = report.whitening.threshold
    err.print(f"whitening {report.dim}-d fitted on {report.images} images at resolution "
              f"{resolution} (p*={report.whitening.p:g}), {report.skipped} skipped"
              + (f"; default threshold {threshold:g}" if threshold is not None else "")
              + f"; wrote {out}", highlight=False, soft_wrap=True)


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
    from mgdedup.decisions import load_decisions, save_decisions
    from mgdedup.locate import H5_NAME, find_index
    from mgdedup.store import IndexStore

    where = find_index(index_dir)
    with IndexStore.open(where / H5_NAME) as store:
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
    err.print(f"marked {verdict.value}: {pair[0]} and {pair[1]} (in {where})", highlight=False,
              soft_wrap=True)


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
) -> None:
    """Generate images with planted copies, index them and print the duplicate groups."""
    from mgdedup.dedup import find_duplicates
    from mgdedup.indexer import update_index
    from mgdedup.locate import INDEX_DIRNAME
    from mgdedup.registry import DEFAULT_MODEL, load_model
    from mgdedup.report import print_groups_table
    from mgdedup.synthetic import make_collection

    with tempfile.TemporaryDirectory(prefix="mgdedup-demo-") as tmp:
        target = (folder.expanduser() if folder is not None else Path(tmp)).resolve()
        collection = make_collection(target, originals=10, copies_per_edit=1, seed=7)
        err.print(f"generated {len(collection.originals)} images and "
                  f"{len(collection.copies)} edited copies in {target}", highlight=False)
        summary = update_index([target], target / INDEX_DIRNAME, load_model(DEFAULT_MODEL),
                               DEFAULT_MODEL, resolution, workers=0)
        result = find_duplicates(summary.index_dir, threshold)
        print_groups_table(result.groups, result.facts, Console())
        found = {frozenset((result.facts[g.keeper].path, result.facts[row].path))
                 for g in result.groups for row, _ in g.members}
        planted = [frozenset((str(o.resolve()), str(c.resolve())))
                   for o, c, _ in collection.copies]
        hits = sum(pair in found for pair in planted)
        err.print(f"found {hits} of {len(planted)} planted copies at threshold "
                  f"{result.threshold:g}",
                  highlight=False)


def main() -> None:
    app()


# Commands of other areas register themselves on the shared app when imported.
# (Each area's module is listed here once; nothing else in this file changes for them.)
from mgdedup import cli_eval, cli_review, cli_scale, cli_train  # noqa: F401

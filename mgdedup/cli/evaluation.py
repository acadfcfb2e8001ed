"""`mgdedup eval ...` (benchmarks of the paper and of any folder with copies) and `tune-p`.

Results go to stdout (a table, or JSON with --json); progress and messages to stderr.
Embeddings are cached per (model, s*, p*) (mgdedup.evaluation.cache), so running another
benchmark or metric on the same images embeds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mgdedup.cli.shell import (
    DEFAULT_RESOLUTION,
    ModelOption,
    WorkersOption,
    app,
    progress_bar,
    say,
    user_errors,
)
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import check_writable

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Evaluate a model on retrieval / classification benchmarks (results on stdout).",
)
app.add_typer(eval_app, name="eval")

ResolutionOption = Annotated[int, typer.Option("--resolution", "-r", min=32, max=4096,
                                               help="Test resolution s*.")]
CacheOption = Annotated[Path | None, typer.Option(
    "--cache", help="Folder of embedding caches. Default: $XDG_CACHE_HOME/mgdedup/eval.")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]
POption = Annotated[float | None, typer.Option(
    "--p", min=0.1, help="GeM exponent to evaluate. Default: the model's p* at --resolution.")]
DeviceOption = Annotated[str, typer.Option("--device", help="torch device, e.g. cuda.")]
KOption = Annotated[int | None, typer.Option(
    "-k", "--k", min=2, help="Source images of the IN-aug set (default 2000, as the paper).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the IN-aug picks and copies.")]
LayoutOption = Annotated[str, typer.Option(
    "--layout", help="auto, flat (any image below the folder) or classes (ImageFolder: "
                     "--per-class picks per class folder).")]
PerClassOption = Annotated[int, typer.Option("--per-class", min=1,
                                             help="IN-aug picks per class folder.")]
ExcludeOption = Annotated[list[str] | None, typer.Option(
    "--exclude", help="Never pick images with this folder/file name in their path "
                      "(repeatable).")]


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int], None]]:
    with progress_bar(description) as progress:
        task = progress.add_task(description, total=None)
        yield lambda n: progress.advance(task, n)


def _evaluate(title: str, benchmark: str, args: tuple, model: str | None, p: float | None,
              cache: Path | None, device: str, workers: int | None, as_json: bool,
              **options: Any) -> None:
    """Run `mgdedup.evaluation.runner.<benchmark>(model, *args, **options)` with a progress
    bar and show its result."""
    from mgdedup.evaluation import runner
    from mgdedup.model.registry import load_model

    loaded = load_model(model)
    with _progress(title) as advance:
        result = getattr(runner, benchmark)(loaded, *args, on_progress=advance, p=p,
                                            cache_root=cache, device=device, workers=workers,
                                            **options)
    _show(result, as_json)


def _show(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    table = Table(title=f"{result['benchmark']} at s*={result['resolution']}, "
                        f"p={result['p']:g}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.items():
        if name in ("benchmark", "cache"):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) and name != "p" else str(value)
        table.add_row(name, shown)
    Console(width=160).print(table)
    say(f"{result['embedded']} image(s) embedded, the others from the cache "
              f"{result['cache']}")


@eval_app.command("holidays")
@user_errors
def eval_holidays(
    root: Annotated[Path, typer.Argument(help="Holidays folder (root/jpg/NNNNNN.jpg).")],
    resolution: ResolutionOption = DEFAULT_RESOLUTION,
    model: ModelOption = None,
    rotate_file: Annotated[Path | None, typer.Option(
        "--rotate-file", help="Lines 'NNNNNN.jpg ANGLE' (degrees counter-clockwise).")] = None,
    p: POption = None, cache: CacheOption = None, device: DeviceOption = "cpu",
    workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """INRIA Holidays mAP. Example: mgdedup eval holidays /data/holidays -r 500"""
    _evaluate("Holidays", "holidays", (root, resolution), model, p, cache, device, workers,
              as_json, rotate_file=rotate_file)


@eval_app.command("ukb")
@user_errors
def eval_ukb(
    root: Annotated[Path, typer.Argument(help="UKBench folder (root[/full]/ukbenchNNNNN.jpg).")],
    resolution: ResolutionOption = DEFAULT_RESOLUTION,
    model: ModelOption = None,
    p: POption = None, cache: CacheOption = None, device: DeviceOption = "cpu",
    workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """UKBench score (0-4). Example: mgdedup eval ukb /data/ukbench -r 500"""
    _evaluate("UKBench", "ukb", (root, resolution), model, p, cache, device, workers, as_json)


@eval_app.command("copydays")
@user_errors
def eval_copydays(
    root: Annotated[Path, typer.Argument(help="Copydays folder (original/, strong/).")],
    distractors: Annotated[Path | None, typer.Option(
        "--distractors", help="Folder of distractor images (e.g. 10k YFCC), recursive.")] = None,
    resolution: ResolutionOption = DEFAULT_RESOLUTION,
    model: ModelOption = None,
    p: POption = None, cache: CacheOption = None, device: DeviceOption = "cpu",
    workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """Copydays strong (+ distractors) mAP.
    Example: mgdedup eval copydays /data/copydays --distractors /data/yfcc10k"""
    _evaluate("Copydays", "copydays", (root, resolution), model, p, cache, device, workers,
              as_json, distractors=distractors)


@eval_app.command("imagenet")
@user_errors
def eval_imagenet(
    root: Annotated[Path, typer.Argument(help="ImageNet folder (root[/val]/<class>/<image>).")],
    resolution: ResolutionOption = 224,
    model: ModelOption = None,
    p: POption = None, cache: CacheOption = None, device: DeviceOption = "cpu",
    workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """ImageNet validation top-1 / top-5. Example: mgdedup eval imagenet /data/imagenet -r 224"""
    _evaluate("ImageNet", "imagenet", (root, resolution), model, p, cache, device, workers, as_json)


@eval_app.command("inaug")
@user_errors
def eval_inaug(
    root: Annotated[Path, typer.Argument(help="Any image folder, or ImageFolder layout.")],
    resolution: ResolutionOption = DEFAULT_RESOLUTION,
    model: ModelOption = None,
    k: KOption = None, seed: SeedOption = 0, layout: LayoutOption = "auto",
    per_class: PerClassOption = 2, exclude: ExcludeOption = None,
    p: POption = None, cache: CacheOption = None, device: DeviceOption = "cpu",
    workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """IN-aug surrogate (paper 4.2): k images x 5 'full'-augmented copies; score /5, mAP,
    micro-AP. Example: mgdedup eval inaug /data/imagenet/train -r 500"""
    from mgdedup.evaluation.inaug import DEFAULT_K

    _evaluate("IN-aug", "inaug", (root, resolution), model, p, cache, device, workers, as_json,
              k=DEFAULT_K if k is None else k, seed=seed, layout=layout, per_class=per_class,
              exclude=tuple(exclude or ()))


@eval_app.command("pairs")
@user_errors
def eval_pairs(
    ground_truth: Annotated[Path, typer.Argument(
        help='JSON {"groups": [["a.jpg", "a_copy.jpg"], ...]}, paths relative to DIR.')],
    root: Annotated[Path, typer.Argument(help="Folder of the images (all are scored).")],
    resolution: ResolutionOption = DEFAULT_RESOLUTION,
    model: ModelOption = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help="Cosine threshold for precision/recall. Default: the "
                                  "model's measured one.")] = None,
    p: POption = None, cache: CacheOption = None, device: DeviceOption = "cpu",
    workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """Copy detection on any folder: micro-AP over all pairs, mAP, precision/recall.
    Example: mgdedup eval pairs gt.json photos/"""
    _evaluate("pairs", "pairs", (ground_truth, root, resolution), model, p, cache, device,
              workers, as_json, threshold=threshold)


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MgdedupError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise MgdedupError(f"{what} must be positive numbers, got {text!r}")
    return values


@app.command("tune-p")
@user_errors
def tune_p(
    images: Annotated[Path, typer.Argument(help="Folder of images to build IN-aug from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (never "
                                                          "overwritten).")],
    resolutions: Annotated[str, typer.Option("--resolutions", help="Comma-separated s*.")
                           ] = "224,500,800",
    grid: Annotated[str, typer.Option("--grid", help="Comma-separated p values.")
                    ] = "1,2,3,4,5,6,7,8,9,10",
    model: ModelOption = None,
    k: KOption = None, seed: SeedOption = 0, layout: LayoutOption = "auto",
    per_class: PerClassOption = 2, exclude: ExcludeOption = None,
    device: DeviceOption = "cpu", workers: WorkersOption = None, as_json: JsonOption = False,
) -> None:
    """Pick p* per resolution on IN-aug built from IMAGES and write a model file with it.

    A whitening fitted at a tuned resolution with another p is dropped (printed).
    Example: mgdedup tune-p photos/ --resolutions 224,500 --out model.pt
    """
    from mgdedup.evaluation.inaug import DEFAULT_K, build_inaug
    from mgdedup.model.registry import load_model
    from mgdedup.tuning import p_star as tuning

    sizes = _numbers(resolutions, int, "--resolutions")
    values = _numbers(grid, float, "--grid")
    if out.exists():
        raise MgdedupError(f"{out} already exists; choose another --out (it is never "
                           "overwritten)")
    check_writable(out, "model file")
    loaded = load_model(model)
    inaug = build_inaug(images, DEFAULT_K if k is None else k, seed, layout=layout,
                        per_class=per_class, exclude=tuple(exclude or ()))
    say(f"IN-aug: {len(inaug.sources)} images x {inaug.copies} copies from "
              f"{inaug.root}")
    with progress_bar("tune-p") as progress:
        def on_resolution(size: int) -> Callable[[int], None]:
            task = progress.add_task(f"s*={size}", total=len(inaug.sources))
            return lambda n: progress.advance(task, n)

        result = tuning.tune(loaded, inaug, sizes, values, on_resolution=on_resolution,
                             device=device, workers=workers)
    messages = tuning.write_tuned(loaded, result.table, out)
    if as_json:
        typer.echo(json.dumps({
            "p_star": {str(s): r.best for s, r in result.per_resolution.items()},
            "images": len(inaug.sources), "copies": inaug.copies, "seed": seed,
            "resolutions": {str(s): {"previous": r.previous, "rows": r.images,
                                     "metrics": {f"{p:g}": m for p, m in r.metrics.items()}}
                            for s, r in result.per_resolution.items()},
            "out": str(out)}, indent=1))
    else:
        console = Console(width=160)
        for size, r in result.per_resolution.items():
            table = Table(title=f"s*={size}: p*={r.best:g} ({r.images} copies)",
                          title_justify="left")
            for column in ("p", "IN-aug score /5", "mAP", "micro-AP"):
                table.add_column(column, justify="right")
            for p_value, m in r.metrics.items():
                mark = " *" if p_value == r.best else ""
                table.add_row(f"{p_value:g}{mark}", f"{m['score']:.4f}", f"{m['map']:.4f}",
                              f"{m['micro_ap']:.4f}")
            console.print(table)
    for message in messages:
        say(message)

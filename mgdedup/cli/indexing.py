"""`mgdedup index` and `mgdedup merge`: building an index, on one machine or as N shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mgdedup.cli.shell import (
    DEFAULT_RESOLUTION,
    ModelOption,
    UsageError,
    WorkersOption,
    app,
    elapsed_and_rate,
    progress_bar,
    say,
    user_errors,
)


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
    precision: Annotated[str | None, typer.Option(
        "--precision", help="fp32|int8: what the trunk computes the rows in. int8 (ONNX "
                            "Runtime on CPU, the default model): about twice as fast, the "
                            "same copy decisions, but ImageNet classes of the rows differ "
                            "from fp32's for 5-15 % of photos. Default: an existing index's "
                            "own, fp32 for a new one (change it with --rebuild).")] = None,
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
    remember: Annotated[bool | None, typer.Option(
        "--remember/--no-remember",
        help="Make this the index later commands use when not told --index. Default: yes, "
             "unless only single files are indexed.")] = None,
    engine: Annotated[str, typer.Option(
        "--engine", metavar="local|ray",
        help="Where images are embedded: local (this machine's cores) or ray (a Ray "
             "cluster; pip install 'mgdedup[ray]'). The index written is the same.")
    ] = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", metavar="ADDRESS",
        help="Ray cluster to join, e.g. HOST:6379 or ray://HOST:10001. Default: "
             "$RAY_ADDRESS, else one started with `ray start` here, else a new one on "
             "this machine.")] = None,
    ray_actors: Annotated[int | None, typer.Option(
        "--ray-actors", min=1,
        help="Model actors on the Ray cluster. Default: one per CPU (one per GPU with "
             "--device cuda).")] = None,
) -> None:
    """Embed every image below FOLDERS; re-running only embeds new or changed files.

    Examples: mgdedup index ~/photos --resolution 500;
    N workers: mgdedup index ~/photos --shard K/N (K = 1..N), then
    mgdedup merge ~/photos/.mgdedup/shard-*-of-N --out ~/photos/.mgdedup
    """
    from mgdedup.files.roots import check_roots

    check_roots(folders)  # a mistyped folder answers before the index machinery is imported
    from mgdedup.distributed.options import RayOptions, check_engine
    from mgdedup.embedding.backend_choice import preferred_backend
    from mgdedup.embedding.onnx_cache import PRECISIONS
    from mgdedup.index.build import ProgressHooks, Shard, update_index
    from mgdedup.index.layout import default_index_dir
    from mgdedup.model.registry import canonical_spec

    parsed = Shard.parse(shard) if shard is not None else None
    check_engine(engine)
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"--precision must be {' or '.join(PRECISIONS)}, not {precision!r}")
    if engine != "ray" and (ray_address is not None or ray_actors is not None):
        raise UsageError("--ray-address and --ray-actors need --engine ray")
    if engine == "ray" and parsed is not None:
        raise UsageError("--engine ray shares the files among the cluster's actors "
                           "itself: drop --shard")
    ray = RayOptions(address=ray_address, actors=ray_actors) if engine == "ray" else None
    spec = canonical_spec(model)  # checked now; loaded only when something is embedded
    if out is not None:
        index_dir = out.expanduser()
    elif parsed is not None:  # N workers must not share one folder: one index each
        index_dir = default_index_dir(folders) / f"shard-{parsed.k}-of-{parsed.n}"
    else:
        index_dir = default_index_dir(folders)
    started = time.perf_counter()
    with preferred_backend(backend), progress_bar("embedding") as progress:
        task = progress.add_task("starting", total=None, unit=" img/s")
        hooks = ProgressHooks(
            start=lambda total: progress.update(task, total=total, description="embedding"),
            advance=lambda count: progress.advance(task, count),
            status=lambda text: progress.update(task, description=text))
        summary = update_index(folders, index_dir, None, spec, resolution,
                               batch_size=batch_size, workers=workers, rebuild=rebuild,
                               device=device, progress=hooks, shard=parsed, factory=factory,
                               remember=remember, ray=ray, precision=precision)
    if summary.salvaged is not None:
        kept, aside = summary.salvaged
        say(f"warning: the index was damaged; {kept if kept is not None else 'no'} rows could "
            f"be kept and the other files were embedded again (damaged file kept as {aside})")
    line = (f"{summary.embedded} indexed, {summary.skipped} skipped"
            + (f" (see {summary.errors_path})" if summary.skipped else "")
            + f"; {summary.unchanged} unchanged, {summary.removed} removed; "
              f"{summary.total} images in {summary.index_dir}; "
            + elapsed_and_rate(time.perf_counter() - started, summary.embedded))
    say(line)



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
    from mgdedup.index.merge import merge_indexes

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
    say(line)

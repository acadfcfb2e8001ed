"""`mgdedup search` and `mgdedup classify`: what an index or a model says about some images."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mgdedup.cli.shell import IndexOption, ModelOption, app, say, user_errors
from mgdedup.errors import MgdedupError
from mgdedup.files.names import json_text, printable


class SearchScore(str, Enum):
    copy = "copy"
    cosine = "cosine"


@app.command()
@user_errors
def search(
    images: Annotated[list[Path], typer.Argument(help="Query images.")],
    index_dir: IndexOption = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 10,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    score: Annotated[SearchScore | None, typer.Option(
        "--score", "-s",
        help="copy: rank by the probability that the result is a copy of the query (each "
             "candidate verified, as `dedup` scores pairs); cosine: by descriptor cosine "
             "only. Default: copy where the model has a copy score.")] = None,
) -> None:
    """Indexed images most likely to be copies of each query image, best first: the score
    (P(copy), or the cosine with --score cosine), then the cosine.

    Example: mgdedup search some.jpg -k 10
    """
    from mgdedup.index.layout import find_index
    from mgdedup.queries.search import search_index

    where = find_index(index_dir)
    if all(not path.expanduser().exists() for path in images):
        raise MgdedupError("no such file: " + ", ".join(str(p) for p in images))
    results = search_index(where, images, k=k, model_spec=model,
                           scoring=None if score is None else score.value)
    say(f"index: {where}")
    for result in results:
        if result.error:
            say(f"skipped {result.query}: {result.error}")
    if as_json:
        typer.echo(json_text([{"query": r.query, "score": r.score_kind,
                               "results": [{"path": p, "score": round(s, 6),
                                            "cosine": round(c, 6)}
                                           for (p, s), c in zip(r.results, r.cosines)]}
                              for r in results if r.error is None], indent=2))
    else:
        for result in results:
            if result.error is None:
                typer.echo(printable(result.query))
                for (path, value), cosine in zip(result.results, result.cosines):
                    shown = f"P(copy) {value:.3f}  cosine {cosine:.3f}" \
                        if result.score_kind == "copy" else f"{value:.3f}"
                    typer.echo(f"  {shown}  {printable(path)}")
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
    from mgdedup.queries.classify import Prediction, classify_files, classify_index

    if images:
        from mgdedup.imaging.sniffing import probe
        from mgdedup.model.registry import canonical_spec

        spec = canonical_spec(model)  # a wrong --model is told before anything loads
        # files that cannot be images are told at once, before the model (or numpy) loads
        reasons = [probe(path) for path in images]
        readable = [path for path, reason in zip(images, reasons) if reason is None]
        found = iter(classify_files(spec, readable, resolution, k=k) if readable else [])
        predictions = [next(found) if reason is None else Prediction(str(path), [], reason)
                       for path, reason in zip(images, reasons)]
    elif index_dir is not None:
        from mgdedup.index.layout import find_index

        predictions = classify_index(find_index(index_dir), k=k, model_spec=model)
    else:
        raise MgdedupError("give images to classify, or --index to classify an index")
    for prediction in predictions:
        if prediction.error:
            say(f"skipped {prediction.path}: {prediction.error}")
    good = [p for p in predictions if p.error is None]
    if as_json:
        typer.echo(json_text([{"path": p.path, "top": [{"index": i, "label": label,
                                                         "prob": round(q, 6)}
                                                        for i, label, q in p.top]}
                               for p in good], indent=2))
    else:
        for prediction in good:
            typer.echo(printable(prediction.path))
            for _, label, probability in prediction.top:
                typer.echo(f"  {probability:6.1%}  {label}")
    if not good:
        raise typer.Exit(1)

"""What every `mgdedup` command shares: the Typer app, stderr console, error handling,
progress bars and common options. Command modules (`mgdedup.cli.*`) register on `app`.

Data (tables, JSON, CSV) goes to stdout; messages and progress bars go to stderr. A user
mistake prints one line and exits with 1; a usage error (an unknown option, a value out of
range) prints one line `error: ...` and exits with 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from typer.core import TyperGroup

try:  # Typer >= 0.20 carries its own copy of Click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer on Click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from mgdedup.errors import MgdedupError
from mgdedup.files.names import printable


class OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr (`error: ...`, exit code 2) instead of Typer's
    framed box: what a person can read at a glance and a script can grep."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as error:
            print(error.format_message(), file=sys.stderr)
            sys.exit(error.exit_code)
        except UsageError as error:
            where = error.ctx.command_path if error.ctx is not None else "mgdedup"
            message = error.format_message().replace("Value error, ", "")
            _one_line_error(f"{message} (see: {where} --help)")
            sys.exit(error.exit_code)
        except ClickException as error:
            _one_line_error(error.format_message())
            sys.exit(error.exit_code)
        except typer.Abort:
            _one_line_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _one_line_error(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ",
                            " ".join(printable(message).split())), soft_wrap=True)


app = typer.Typer(
    name="mgdedup", cls=OneLineErrors, no_args_is_help=True, add_completion=False,
    help="Find copies and near-duplicates in image collections, and classify images, "
         "from one MultiGrain embedding.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
#: messages: never rich markup (a path like ``dir[/]x.jpg`` or ``[bold]x.jpg`` is text)
#: soft-wrapped: a long line piped to a file or a log stays one line
err = Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)
log = logging.getLogger("mgdedup")

F = TypeVar("F", bound=Callable[..., object])

DEFAULT_RESOLUTION = 500

ModelOption = Annotated[str | None, typer.Option(
    "--model", "-m", help="Built-in name, name of a file in a weights folder, or a model file "
                          "path. Default: the embedded EfficientNet-Lite0.")]
IndexOption = Annotated[Path | None, typer.Option(
    "--index", "-i", help="Index folder. Default: one in the current directory, else the one "
                          "written last.")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=0,
    help="Worker processes (default: one per core with ONNX Runtime, which run decoding and "
         "the model; else cores - 1 decoding for the main process). 0: all in this process.")]


def say(message: str) -> None:
    """One message line on stderr, as plain text with control characters escaped."""
    err.print(printable(message), soft_wrap=True)


def user_errors(command: F) -> F:
    """Turn MgdedupError into one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except MgdedupError as error:
            _one_line_error(str(error))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            say("interrupted; finished batches are saved, run the command again to resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_version(value: bool) -> None:
    if value:
        from mgdedup import __version__

        print(f"mgdedup {__version__}")
        raise typer.Exit(0)


@app.callback()
def configure(verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                                    help="Log details to stderr.")] = False,
              version: Annotated[bool, typer.Option(
                  "--version", callback=_print_version, is_eager=True,
                  help="Print the version and exit.")] = False,
              ) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", force=True,
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])


class RateColumn(ProgressColumn):
    """Items per second (images, pairs, steps), as the task's own unit says."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "/s")
        if speed is None:
            return Text(f"-{unit}", style="progress.data.speed")
        shown = f"{speed:,.0f}" if speed >= 10 else f"{speed:.1f}"
        return Text(f"{shown}{unit}", style="progress.data.speed")


@contextmanager
def progress_bar(description: str) -> Iterator[Progress]:
    """A progress bar on stderr with percentage, count, rate, elapsed and remaining time,
    hidden when stderr is not a terminal."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=err, transient=True,
                        disable=not err.is_terminal)
    with progress:
        yield progress


def elapsed_and_rate(seconds: float, count: int, unit: str = "images") -> str:
    """"in 12.3 s, 25.1 images/s": the end of a summary line."""
    rate = f", {count / seconds:.1f} {unit}/s" if count and seconds > 0 else ""
    return f"in {seconds:.1f} s{rate}"


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    html = "html"



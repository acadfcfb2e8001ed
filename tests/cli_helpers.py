"""Running the CLI in tests, and what a user error must look like from the outside."""

from __future__ import annotations

from typer.testing import CliRunner

from mgdedup.cli import app

runner = CliRunner()


def run(*args: object):
    """The CLI in-process; an exception escaping a command fails the test (no traceback hides)."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    """Exit code 1, no traceback, one non-blank line of output starting 'error:' and holding
    every fragment; returns that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]

"""The write-ahead record of an applied action: ``IDX/actions/<run id>.jsonl``.

One JSON object per line, each line flushed and fsynced before the file operation it
announces starts (format version 2):

- a header, written when the run starts, before any file is touched::

      {"manifest": "mgdedup-actions", "version": 2, "run": ID, "index": DIR,
       "roots": [resolved indexed folders], "created": ISO-TIME}

- per step, its intent, before the step touches anything::

      {"step": N, "state": "intent", "op": "move|delete|hardlink|symlink",
       "source": PATH, "stored": PATH or null (a permanent delete),
       "link": link text or null, "tmp_link": PATH or null, "keeper": PATH,
       "digest": blake2b-128, "size": BYTES, "mtime_ns": NS, "time": ISO-TIME}

  ``stored`` is where the source's bytes go; ``tmp_link`` the hidden name under which the
  link to the keeper is made before it takes the source's name;

- then its outcome: ``{"step": N, "state": "done"}`` or ``{"step": N, "state": "failed",
  "reason": TEXT}`` (a failed step moved nothing).

Version 1 files (one line per completed step, no header) are read too. A line that cannot be
read (a hand-edited entry) is reported and passed over, and the other steps are still undone;
a torn last line (the run was killed while writing it) announced a step that never started.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mgdedup.duplicates.actions.kinds import Action
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import describe_os_error, fsync_dir
from mgdedup.files.names import json_text

MANIFEST_FORMAT = "mgdedup-actions"
MANIFEST_VERSION = 2
SUFFIX = ".jsonl"
_DIGEST = re.compile(r"[0-9a-f]{32}")


@dataclass
class RecordedStep:
    """One step of a manifest, with the last state recorded for it."""

    number: int
    op: str
    source: Path
    stored: Path | None
    link: str | None
    tmp_link: Path | None
    keeper: Path
    digest: str
    size: int
    mtime_ns: int
    state: str = "intent"  # "intent" (started, outcome unknown), "done" or "failed"


@dataclass
class ReadManifest:
    path: Path
    header: dict[str, Any] | None
    steps: list[RecordedStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # lines passed over, and why
    #: a torn last line: written while the run was killed, so it announced nothing that
    #: happened (a step starts only once its intent is whole on disk)
    torn_last_line: int | None = None

    @property
    def roots(self) -> list[Path] | None:
        roots = (self.header or {}).get("roots")
        if isinstance(roots, list) and all(isinstance(r, str) for r in roots):
            return [Path(r) for r in roots]
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ManifestWriter:
    """Appends lines, each on disk before `append` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.steps = 0  # step intents written

    @classmethod
    def create(cls, path: Path, run_id: str, index_dir: Path, roots: list[Path]
               ) -> ManifestWriter:
        """The file with its header, on disk (file and folder entry) before anything else
        happens; a folder that cannot hold it is a one-line MgdedupError, and then nothing
        was touched."""
        writer = cls(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            writer._write({"manifest": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                           "run": run_id, "index": str(index_dir),
                           "roots": [str(r) for r in roots], "created": _now()})
            fsync_dir(path.parent)
        except OSError as error:
            writer.close()
            raise MgdedupError(f"cannot record the actions in {path}: "
                               f"{describe_os_error(error)}; nothing was changed") from None
        return writer

    def _write(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            raise MgdedupError(f"manifest {self.path} is closed")
        data = (json_text(entry) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def intent(self, number: int, entry: dict[str, Any]) -> None:
        self._write({"step": number, "state": "intent", **entry, "time": _now()})
        self.steps += 1

    def outcome(self, number: int, state: str, reason: str = "") -> None:
        self._write({"step": number, "state": state, **({"reason": reason} if reason else {})})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _path(value: object, what: str, optional: bool = False) -> Path | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"{what} is not an absolute path")
    return Path(value)


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} is not a whole number")
    return value


def _step(entry: dict[str, Any], number: int, state: str) -> RecordedStep:
    op = entry.get("op")
    if op not in {a.value for a in Action}:
        raise ValueError(f"unknown operation {op!r}")
    digest = entry.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError("no valid digest")
    link = entry.get("link")
    if link is not None and not isinstance(link, str):
        raise ValueError("link is not text")
    stored = _path(entry.get("stored"), "stored", optional=True)
    if stored is None and op != Action.DELETE.value:
        raise ValueError(f"a {op} step without a stored copy")
    return RecordedStep(
        number=number, op=op, source=_path(entry.get("source"), "source"),  # type: ignore[arg-type]
        stored=stored, link=link,
        tmp_link=_path(entry.get("tmp_link"), "tmp_link", optional=True),
        keeper=_path(entry.get("keeper"), "keeper"),  # type: ignore[arg-type]
        digest=digest, size=_int(entry.get("size"), "size"),
        mtime_ns=_int(entry.get("mtime_ns"), "mtime_ns"), state=state)


def read_manifest(path: Path) -> ReadManifest:
    """Every step of a manifest (version 1 or 2) with its last recorded state; unreadable
    lines become `problems`, never an exception. A manifest that cannot be read at all is a
    one-line MgdedupError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise MgdedupError(f"cannot read manifest {path}: {describe_os_error(error)}") from None
    lines = raw.decode("utf-8", "surrogateescape").split("\n")
    complete = raw.endswith(b"\n")
    result = ReadManifest(Path(path), None)
    by_number: dict[int, RecordedStep] = {}
    for index, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = index == len(lines) or (index == len(lines) - 1 and not lines[-1])
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
            if entry.get("manifest") == MANIFEST_FORMAT:
                if entry.get("version") != MANIFEST_VERSION:
                    raise ValueError(f"manifest version {entry.get('version')!r} is not "
                                     f"{MANIFEST_VERSION}")
                result.header = entry
            elif "step" in entry:  # version 2
                number = _int(entry["step"], "step")
                state = entry.get("state")
                if state == "intent":
                    if number in by_number:
                        raise ValueError(f"step {number} announced twice")
                    by_number[number] = _step(entry, number, "intent")
                elif state in ("done", "failed"):
                    if number not in by_number:
                        raise ValueError(f"outcome of step {number}, which was never announced")
                    by_number[number].state = state
                else:
                    raise ValueError(f"unknown state {state!r}")
            else:  # version 1: one line per completed step
                number = -index
                by_number[number] = _step(entry, number, "done")
        except (ValueError, KeyError, TypeError) as error:
            if last and not complete:
                result.torn_last_line = index
            else:
                result.problems.append(f"line {index} passed over: {error}")
    result.steps = sorted(by_number.values(), key=lambda s: (s.number >= 0, abs(s.number)))
    return result


def manifests_of(actions_dir: Path) -> list[Path]:
    """The manifests of an index, oldest first: run ids sort by time (to the second; the
    file's mtime breaks ties between runs started in the same second)."""
    if not actions_dir.is_dir():
        return []

    def key(path: Path) -> tuple[str, int]:
        try:
            return path.name[:16], path.stat().st_mtime_ns
        except OSError:
            return path.name[:16], 0

    return sorted((p for p in actions_dir.glob(f"*{SUFFIX}") if p.is_file()), key=key)

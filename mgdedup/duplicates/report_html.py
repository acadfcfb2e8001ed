"""Duplicate groups as ONE self-contained HTML page with thumbnails, to look at before acting.

The page works offline and never touches the network: the CSS is inline, there is no script,
and every thumbnail is a JPEG data URI (a Content-Security-Policy forbids anything else).
Paths come from the file system and are untrusted: every piece of text and every attribute
goes through `html.escape`. A file that cannot be read (deleted since indexing, damaged) gets
a grey placeholder with the reason; it never stops the report.

Each thumbnail enlarges on click (CSS `:target`, no script) and the groups sit in a grid of
cards, several per screen; the header says which index, when, at which threshold chosen how,
and each group why its keeper is kept. `mgdedup review` is the interactive page (full-size
compare, decisions).

Large reports stay quick to open: thumbnails are small, `loading="lazy"`, and group cards use
`content-visibility: auto` so the browser only lays out the cards on screen. Each file is
decoded once (draft-decoded for JPEG) even when it appears in several places.

Stable hooks for tests and scripts: `<section class="group" data-group="N" data-size=".."
data-reclaimable-bytes="..">` (N from 1, in the order of `DedupResult.groups`, as the CSV
report numbers them), `<figure class="image" data-role="keeper|member" data-path="..."
data-width data-height data-bytes [data-score data-cosine]>` (members only: the score and the
raw cosine to the keeper), and on `<dl class="summary">` the exact summary: data-images,
data-groups, data-duplicates, data-reclaimable-bytes, data-threshold, data-threshold-source,
data-target-precision, data-score (copy | cosine | sscd-normalised). These carry the same
facts as the JSON/CSV reports.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html import escape
from pathlib import Path

from mgdedup.cpus import available_cpus
from mgdedup.duplicates.find import THRESHOLD_ORIGINS, DedupResult
from mgdedup.duplicates.report_text import FileFacts
from mgdedup.files.atomic import write_text
from mgdedup.files.names import printable
from mgdedup.imaging.reading import ImageReadError
from mgdedup.imaging.thumbnails import jpeg_thumbnail

log = logging.getLogger(__name__)

JPEG_QUALITY = 70
DATA_URI_PREFIX = "data:image/jpeg;base64,"


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG data URI and its size, or the reason there is none."""

    uri: str | None
    width: int = 0
    height: int = 0
    reason: str = ""


def make_thumbnail(path: str | Path, thumb_px: int = 160) -> Thumbnail:
    """Upright RGB thumbnail of `path`, longest side at most `thumb_px`, as a JPEG data URI.

    Never raises for a bad file: the reason is returned instead.
    """
    try:
        jpeg, width, height = jpeg_thumbnail(path, thumb_px, JPEG_QUALITY, optimize=True)
    except ImageReadError as error:
        return Thumbnail(None, reason=error.reason)
    except Exception as error:  # a report must never die on one file
        log.debug("thumbnail of %s failed", path, exc_info=True)
        return Thumbnail(None, reason=f"cannot make a thumbnail ({type(error).__name__})")
    return Thumbnail(DATA_URI_PREFIX + base64.b64encode(jpeg).decode("ascii"), width, height)


def human_bytes(count: int) -> str:
    """Decimal units as the table report prints them: 999 B, 1.2 kB, 3.4 MB, 5.6 GB."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _thumbnails(paths: Iterable[str], thumb_px: int, workers: int) -> dict[str, Thumbnail]:
    """One thumbnail per distinct path; decoding releases the GIL, so threads help."""
    unique = list(dict.fromkeys(paths))
    if workers <= 1 or len(unique) < 2:
        return {path: make_thumbnail(path, thumb_px) for path in unique}
    with ThreadPoolExecutor(max_workers=min(workers, len(unique))) as pool:
        return dict(zip(unique, pool.map(lambda p: make_thumbnail(p, thumb_px), unique)))


#: the tooltip of a duplicate's score, by the kind of score the report shows
SCORE_TITLES = {
    "copy": "probability that this is a copy of the keeper (copy score)",
    "cosine": "cosine similarity to the keeper",
    "sscd-normalised": "similarity to the keeper minus the two images' mean similarity to "
                       "their other neighbours (SSCD-style normalised score)",
}


def _figure(facts: FileFacts, thumb: Thumbnail, role: str, score: float | None,
            thumb_px: int, score_kind: str = "cosine", cosine: float | None = None,
            anchor: str = "") -> str:
    shown = printable(facts.path)  # control characters and undecodable bytes escaped
    path = escape(shown, quote=True)
    name = escape(os.path.basename(shown) or shown, quote=True)
    if thumb.uri is not None:
        picture = (f'<a class="enlarge" href="#{anchor}" title="enlarge">'
                   f'<img src="{thumb.uri}" width="{thumb.width}" height="{thumb.height}" '
                   f'loading="lazy" decoding="async" alt="{name}"></a>'
                   '<a class="close" href="#_" title="close">\u00d7</a>')
    else:
        reason = escape(thumb.reason or "unreadable", quote=True)
        picture = (f'<div class="placeholder" role="img" aria-label="{name}: {reason}">'
                   f'{reason}</div>')
    if role == "keeper":
        badge = '<span class="badge keep">keep</span>'
        similarity = ""
    else:
        badge = '<span class="badge dup">duplicate</span>'
        title = escape(SCORE_TITLES[score_kind], quote=True)
        similarity = f'<span class="score" title="{title}">{score:.3f}</span>'
        if cosine is not None and score_kind != "cosine":
            similarity += (f'<span class="cosine" title="{escape(SCORE_TITLES["cosine"])}">'
                           f'cos {cosine:.3f}</span>')
    score_attr = f' data-score="{score:.6f}"' if score is not None else ""
    if cosine is not None:
        score_attr += f' data-cosine="{cosine:.6f}"'
    return (
        f'<figure class="image" id="{anchor}" data-role="{role}" data-path="{path}" '
        f'data-width="{facts.width}" data-height="{facts.height}" data-bytes="{facts.size}"'
        f'{score_attr}>'
        f'<div class="thumb" style="height:{thumb_px}px">{picture}</div>'
        f'<figcaption><div class="line">{badge}{similarity}</div>'
        f'<div class="facts">{facts.width}\u00d7{facts.height} \u00b7 '
        f'{escape(human_bytes(facts.size))}</div>'
        f'<div class="path" title="{path}">{path}</div></figcaption></figure>'
    )


_CSS = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5b6475; --line: #d9dde5;
  --card: #fff; --page: #f3f5f8; --keep: #17803d; --dup: #a35b00; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { padding: 20px 24px 12px; background: var(--card); border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 10px; font-size: 20px; }
.summary { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 0; }
.summary div { display: flex; flex-direction: column; }
.summary dt { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.summary dd { margin: 0; font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
main { padding: 16px 24px 40px; display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fill, minmax(min(100%, 600px), 1fr)); align-items: start; }
.where { margin: 0 0 10px; color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
.reason { color: var(--keep); font-weight: 400; }
.enlarge { display: contents; cursor: zoom-in; }
.close { display: none; }
.image:target .thumb { position: fixed; inset: 0; z-index: 10; height: auto !important;
  background: rgba(10, 14, 22, .88); }
.image:target .thumb img { width: auto; height: auto; max-width: 96vw; max-height: 92vh;
  min-width: min(96vw, calc(2 * var(--thumb, 240px))); object-fit: contain; cursor: default; }
.image:target .close { display: block; position: fixed; top: 12px; right: 20px; color: #fff;
  font-size: 34px; text-decoration: none; line-height: 1; }
.empty { color: var(--muted); font-size: 16px; grid-column: 1 / -1; }
.group { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  margin: 0; padding: 12px 16px 14px;
  content-visibility: auto; contain-intrinsic-size: auto 300px; }
.group h2 { margin: 0 0 10px; font-size: 15px; }
.group h2 small { color: var(--muted); font-weight: 400; }
.images { display: flex; flex-wrap: wrap; gap: 12px; }
.image { margin: 0; width: max(200px, calc(var(--thumb, 240px) + 20px)); padding: 8px;
  border: 1px solid var(--line); border-radius: 6px; background: var(--card); }
.image[data-role="keeper"] { border: 2px solid var(--keep); background: #f2fbf5; }
.thumb { display: flex; align-items: center; justify-content: center; overflow: hidden; }
.thumb img { max-width: 100%; max-height: 100%; display: block; }
.placeholder { width: 100%; height: 100%; display: flex; align-items: center;
  justify-content: center; text-align: center; padding: 8px; background: #c9ccd2;
  color: #3a3f49; font-size: 12px; border-radius: 4px; overflow-wrap: anywhere; }
figcaption { margin-top: 6px; }
.line { display: flex; justify-content: space-between; align-items: center; }
.badge { font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: .05em;
  padding: 1px 6px; border-radius: 3px; color: #fff; }
.badge.keep { background: var(--keep); }
.badge.dup { background: var(--dup); }
.score { font-weight: 600; font-variant-numeric: tabular-nums; }
.cosine { margin-left: .5em; color: #666; font-variant-numeric: tabular-nums; }
.facts { color: var(--muted); font-variant-numeric: tabular-nums; }
.path { font: 11px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  overflow-wrap: anywhere; user-select: all; }
@media print {
  body { background: #fff; }
  header { border: 0; }
  .group { content-visibility: visible; break-inside: avoid; border-color: #999; }
  .image { break-inside: avoid; }
}
"""

# no scripts, no fonts, no fetches: images only from data: URIs, styles only inline
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(result: DedupResult, title: str = "mgdedup duplicates",
                thumb_px: int = 240, *, workers: int | None = None,
                index_dir: str | Path | None = None) -> str:
    """The whole report as one HTML document (a string; see `write_html`).

    `workers` threads decode thumbnails (default: up to 8, by CPU count); `index_dir` is
    named in the header.
    """
    if thumb_px < 1:
        raise ValueError("thumb_px must be positive")
    if workers is None:
        workers = min(8, available_cpus())
    facts = result.facts
    score_kind = result.score_kind
    rows = [row for group in result.groups
            for row in (group.keeper, *(member for member, _ in group.members))]
    thumbs = _thumbnails((facts[row].path for row in rows), thumb_px, workers)

    summary = [
        ("images indexed", f"{len(facts):,}"),
        ("groups", f"{len(result.groups):,}"),
        ("duplicates", f"{result.duplicate_count:,}"),
        ("reclaimable", human_bytes(result.reclaimable_bytes)),
        ("threshold", f"{result.threshold:.3f}"),
    ]
    # the exact numbers behind the summary, for programs (the JSON/CSV reports carry them too)
    target = result.target_precision
    exact = {
        "images": len(facts), "groups": len(result.groups),
        "duplicates": result.duplicate_count, "reclaimable-bytes": result.reclaimable_bytes,
        "threshold": f"{result.threshold:g}",
        "threshold-source": result.threshold_source,
        "target-precision": "" if target is None else f"{target:g}",
        "score": score_kind,
    }
    data = " ".join(f'data-{key}="{escape(str(value), quote=True)}"'
                    for key, value in exact.items())
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        '<meta name="generator" content="mgdedup">\n',
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n",
        f'<body style="--thumb: {thumb_px}px">\n',
        f"<header>\n<h1>{escape(title)}</h1>\n<dl class=\"summary\" {data}>",
        "".join(f'<div data-key="{escape(key, quote=True)}"><dt>{escape(key)}</dt>'
                f"<dd>{escape(value)}</dd></div>" for key, value in summary),
        "</dl>\n", _where(result, index_dir), "</header>\n<main>\n",
    ]
    if not result.groups:
        parts.append('<p class="empty">No duplicate groups at this threshold.</p>\n')
    for number, group in enumerate(result.groups, start=1):
        count = len(group.members)
        keeper = facts[group.keeper]
        parts.append(
            f'<section class="group" data-group="{number}" data-size="{count + 1}" '
            f'data-reclaimable-bytes="{sum(facts[r].size for r, _ in group.members)}">'
            f'<h2>Group {number} '
            f"<small>\u00b7 keep 1, {count} duplicate{'s' if count != 1 else ''} \u00b7 "
            f"{escape(human_bytes(sum(facts[r].size for r, _ in group.members)))} "
            f"reclaimable</small></h2>"
            + (f'<p class="where reason">keeper: {escape(printable(group.keeper_reason))}</p>'
               if group.keeper_reason else "")
            + '<div class="images">')
        parts.append(_figure(keeper, thumbs[keeper.path], "keeper", None, thumb_px,
                             anchor=f"g{number}-0"))
        for place, (row, score) in enumerate(group.members, start=1):
            member = facts[row]
            parts.append(_figure(member, thumbs[member.path], "member", score, thumb_px,
                                 score_kind, group.cosines.get(row), anchor=f"g{number}-{place}"))
        parts.append("</div></section>\n")
    parts.append("</main>\n</body>\n</html>\n")
    return "".join(parts)


def _where(result: DedupResult, index_dir: str | Path | None) -> str:
    """The line saying what the report is of: index, date, threshold and its origin, rule."""
    from datetime import datetime

    origin = f"precision {result.target_precision}" if result.threshold_source == "precision" \
        else THRESHOLD_ORIGINS.get(result.threshold_source, result.threshold_source)
    parts = ([f"index {printable(str(index_dir))}"] if index_dir is not None else []) + [
        f"made {datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"threshold {result.threshold:g} ({origin}, {result.score_kind} score)",
        f"keeper rule {result.keep_rule}"]
    if result.gone:
        parts.append(f"{result.gone} files moved away by an applied action left out")
    line = " \u00b7 ".join(parts)
    return f'<p class="where">{escape(line)}</p>\n'


def write_html(result: DedupResult, path: str | Path, title: str = "mgdedup duplicates",
               thumb_px: int = 240, index_dir: str | Path | None = None) -> Path:
    """Render and write the report atomically (`mgdedup.files.atomic`); a folder that cannot
    be written is a one-line MgdedupError. Whether an existing file may be replaced is the
    caller's decision."""
    path = Path(path)
    write_text(path, render_html(result, title=title, thumb_px=thumb_px, index_dir=index_dir),
               "report")
    return path

"""The HTML report: one offline file, structure matching the groups, escaped paths, a browser."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html import escape
from html.parser import HTMLParser

import pytest
from PIL import Image

from mgdedup.duplicates.find import DedupResult, find_duplicates
from mgdedup.duplicates.grouping import Group
from mgdedup.duplicates.report_html import DATA_URI_PREFIX, human_bytes, render_html, write_html
from mgdedup.duplicates.report_text import FileFacts
from mgdedup.imaging.synthetic import make_collection
from mgdedup.index.build import update_index
from mgdedup.model.registry import load_model

THUMB_PX = 96


@dataclass
class Figure:
    group: int
    role: str
    path: str
    imgs: list[dict[str, str]] = field(default_factory=list)
    placeholders: int = 0


class ReportParser(HTMLParser):
    """Groups, figures and every URL-bearing attribute of a report."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.groups: list[int] = []
        self.figures: list[Figure] = []
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            if name in attrs and not (tag == "figure" and name == "data"):
                self.urls.append(attrs[name] or "")
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "group" in classes:
            self.groups.append(int(attrs["data-group"]))
        elif tag == "figure" and "image" in classes:
            self.figures.append(Figure(self.groups[-1], attrs["data-role"], attrs["data-path"]))
        elif tag == "img":
            self.figures[-1].imgs.append(attrs)
        elif tag == "div" and "placeholder" in classes:
            self.figures[-1].placeholders += 1


def parse(document: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(document)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> DedupResult:
    folder = tmp_path_factory.mktemp("report") / "collection"
    make_collection(folder, originals=6, copies_per_edit=1, seed=3, size=(480, 360))
    index_dir = folder / ".mgdedup"
    update_index([folder], index_dir, load_model(), "efficientnet-lite0", 224, workers=0)
    found = find_duplicates(index_dir)
    assert found.groups, "the planted copies must form groups"
    return found


@pytest.fixture(scope="module")
def document(result) -> str:
    return render_html(result, thumb_px=THUMB_PX)


def test_structure_matches_the_groups(result, document):
    parsed = parse(document)
    assert parsed.groups == list(range(1, len(result.groups) + 1))
    expected = []
    for number, group in enumerate(result.groups, start=1):
        expected.append((number, "keeper", result.facts[group.keeper].path))
        expected += [(number, "member", result.facts[row].path) for row, _ in group.members]
    assert [(f.group, f.role, f.path) for f in parsed.figures] == expected
    assert len(parsed.figures) == len(result.groups) + result.duplicate_count


def test_header_says_what_the_report_is_of(result):
    page = render_html(result, thumb_px=THUMB_PX, index_dir="/data/idx")
    where = re.search(r'<p class="where">([^<]*)</p>', page).group(1)
    assert where.startswith("index /data/idx \u00b7 made ")
    assert f"threshold {result.threshold:g} (measured for the model, copy score)" in where
    assert "keeper rule original" in where
    for group in result.groups:  # each group says why its keeper is kept
        assert f"keeper: {escape(group.keeper_reason)}</p>" in page


def test_summary_and_member_facts(result, document):
    text = re.sub(r"<[^>]+>", " ", document)
    assert f"{result.threshold:.3f}" in text
    assert human_bytes(result.reclaimable_bytes) in text
    summary = dict(re.findall(r'<div data-key="([^"]+)"><dt>[^<]*</dt><dd>([^<]*)</dd>',
                              document))
    assert summary["images indexed"] == str(len(result.facts))
    assert summary["groups"] == str(len(result.groups))
    assert summary["duplicates"] == str(result.duplicate_count)
    for group in result.groups:
        for row, score in group.members:
            assert f"{score:.3f}" in text
            facts = result.facts[row]
            assert f"{facts.width}\u00d7{facts.height}" in text
    assert document.count('class="badge keep"') == len(result.groups)


def test_thumbnails_are_small_embedded_jpegs(document):
    parsed = parse(document)
    srcs = [img["src"] for figure in parsed.figures for img in figure.imgs]
    assert len(srcs) == len(parsed.figures)  # every planted file is readable
    for figure in parsed.figures:
        assert figure.placeholders == 0
        (img,) = figure.imgs
        assert img["loading"] == "lazy"
        assert img["src"].startswith(DATA_URI_PREFIX)
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"][len(DATA_URI_PREFIX):])))
        assert thumb.format == "JPEG"
        assert max(thumb.size) <= THUMB_PX
        assert (int(img["width"]), int(img["height"])) == thumb.size


def test_nothing_is_fetched_from_anywhere(document):
    parsed = parse(document)
    # images are data URIs; the only links are fragments of this page (enlarge, close)
    assert all(url.startswith(("data:image/jpeg;base64,", "#")) for url in parsed.urls), \
        [u[:60] for u in parsed.urls if not u.startswith(("data:", "#"))]
    ids = set(re.findall(r'<figure class="image" id="([^"]+)"', document))
    enlarge = re.findall(r'<a class="enlarge" href="#([^"]+)"', document)
    assert enlarge and set(enlarge) == ids and len(ids) == len(parsed.figures)
    lowered = document.lower()
    for needle in ("http://", "https://", 'src="/', "src='/", "url(", "@import", "//fonts."):
        assert needle not in lowered, needle
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert "content-visibility: auto" in document


def test_thumbnail_computed_once_per_file(result, monkeypatch):
    import mgdedup.duplicates.report_html as module

    calls: list[str] = []
    real = module.make_thumbnail
    monkeypatch.setattr(module, "make_thumbnail",
                        lambda path, px: calls.append(path) or real(path, px))
    group = result.groups[0]
    doubled = DedupResult(result.threshold, [group, Group(group.keeper, group.members[:1])],
                          result.facts)
    render_html(doubled, thumb_px=32, workers=1)
    paths = [result.facts[group.keeper].path] + [result.facts[r].path for r, _ in group.members]
    assert sorted(calls) == sorted(paths)


def test_hostile_and_missing_paths_are_escaped_placeholders(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(good)
    evil = str(tmp_path / 'x"><script>alert(1)</script><img src=x onerror=alert(2)>.jpg')
    notimage = tmp_path / "notes.jpg"
    notimage.write_text("not an image at all")
    facts = [FileFacts(str(good), 300, 200, good.stat().st_size),
             FileFacts(evil, 640, 480, 12345),
             FileFacts(str(notimage), 10, 10, notimage.stat().st_size)]
    result = DedupResult(0.5, [Group(0, [(1, 0.91234), (2, 0.5)])], facts)
    document = render_html(result, title="<b>mine</b> & co", thumb_px=64)
    assert "<script" not in document.lower()
    assert "<b>mine" not in document
    assert "&lt;script&gt;" in document
    parsed = parse(document)
    assert "script" not in parsed.tags
    assert [(f.role, f.path) for f in parsed.figures] == \
        [("keeper", str(good)), ("member", evil), ("member", str(notimage))]
    keeper, missing, broken = parsed.figures
    assert len(keeper.imgs) == 1 and keeper.placeholders == 0
    assert missing.imgs == [] and missing.placeholders == 1
    assert broken.imgs == [] and broken.placeholders == 1
    assert "file disappeared" in document
    assert "not an image" in document
    assert "0.912" in document


def test_empty_result_renders(tmp_path):
    document = render_html(DedupResult(0.488, [], []))
    parsed = parse(document)
    assert parsed.groups == [] and parsed.figures == []
    assert "No duplicate groups" in document


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(1500) == "1.5 kB"
    assert human_bytes(999_960) == "1.0 MB"
    assert human_bytes(3_400_000_000) == "3.4 GB"


def test_write_html_is_atomic_and_replaces(result, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old")
    assert write_html(result, out) == out
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left behind


def _chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_renders_in_a_headless_browser(result, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    report = write_html(result, tmp_path / "report.html", thumb_px=THUMB_PX)
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--disable-dev-shm-usage"]
    screenshot = tmp_path / "report.png"
    run = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={screenshot}",
         "--window-size=1200,900", report.resolve().as_uri()],
        check=False, capture_output=True, text=True, timeout=60)
    assert screenshot.is_file(), run.stderr[-2000:]
    print(f"\nHTML report screenshot: {screenshot}")
    with Image.open(screenshot) as shot:
        rgb = shot.convert("RGB")
        assert rgb.size == (1200, 900)
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, "the screenshot looks blank"
        assert rgb.getextrema() != ((255, 255), (255, 255), (255, 255))

    dump = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom",
         report.resolve().as_uri()],
        check=False, capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr[-2000:]
    parsed = parse(dump.stdout)
    assert len(parsed.groups) == len(result.groups)
    assert len(parsed.figures) == len(result.groups) + result.duplicate_count

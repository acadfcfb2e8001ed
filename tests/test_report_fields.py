"""JSON, CSV and HTML reports carry the same facts: per file, per group and in the summary."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser

import pytest
from PIL import Image
from typer.testing import CliRunner

from mgdedup.cli import app
from mgdedup.duplicates.find import DedupResult
from mgdedup.duplicates.grouping import Group
from mgdedup.duplicates.report_html import render_html
from mgdedup.duplicates.report_text import CSV_COLUMNS, FileFacts, groups_to_csv, groups_to_json
from mgdedup.duplicates.score_norm import ScoreNorm
from mgdedup.imaging.synthetic import make_collection
from mgdedup.index.build import update_index
from mgdedup.model.registry import load_model


class Facts(HTMLParser):
    """The machine-readable attributes of a report."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.summary: dict[str, str] = {}
        self.groups: dict[int, dict[str, str]] = {}
        self.files: list[tuple] = []
        self.score_titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "dl" and "summary" in classes:
            self.summary = {k[5:]: v for k, v in attrs.items() if k.startswith("data-")}
        elif tag == "section" and "group" in classes:
            self.groups[int(attrs["data-group"])] = attrs
        elif tag == "span" and "score" in classes:
            self.score_titles.append(attrs["title"])
        elif tag == "figure" and "image" in classes:
            score, cosine = attrs.get("data-score"), attrs.get("data-cosine")
            self.files.append((max(self.groups), attrs["data-role"], attrs["data-path"],
                               int(attrs["data-width"]), int(attrs["data-height"]),
                               int(attrs["data-bytes"]),
                               None if score is None else round(float(score), 6),
                               None if cosine is None else round(float(cosine), 6)))


def html_facts(document: str) -> Facts:
    parser = Facts()
    parser.feed(document)
    parser.close()
    return parser


def json_facts(text: str) -> tuple[list[tuple], dict, dict[int, tuple[int, int]]]:
    document = json.loads(text)
    files = [(g["group"], f["role"], f["path"], f["width"], f["height"], f["bytes"],
              f["score"], None if f["role"] == "keeper" else f["cosine"])
             for g in document["groups"] for f in g["files"]]
    assert all(f["cosine"] == 1.0 for g in document["groups"] for f in g["files"]
               if f["role"] == "keeper")
    # the old keys say the same as the new ones
    for g in document["groups"]:
        assert g["keeper"] == g["files"][0]["path"] and g["files"][0]["role"] == "keeper"
        assert [(m["path"], m["score"], m["width"], m["height"], m["bytes"], m["cosine"])
                for m in g["members"]] == [(f["path"], f["score"], f["width"], f["height"],
                                            f["bytes"], f["cosine"]) for f in g["files"][1:]]
    groups = {g["group"]: (g["size"], g["reclaimable_bytes"]) for g in document["groups"]}
    return files, document, groups


def csv_facts(text: str, score_kind: str) -> tuple[list[tuple], list[dict[str, str]]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    files = []
    for row in rows:
        keeper = row["role"] == "keeper"
        assert row["score_kind"] == score_kind
        if keeper:
            assert row["score"] == ("1.0" if score_kind == "cosine" else "")
            assert row["cosine"] == "1.0"
        files.append((int(row["group"]), row["role"], row["path"], int(row["width"]),
                      int(row["height"]), int(row["bytes"]),
                      None if keeper else round(float(row["score"]), 6),
                      None if keeper or not row["cosine"] else round(float(row["cosine"]), 6)))
    return files, rows


def assert_same_facts(result: DedupResult, html: str, json_text: str, csv_text: str) -> None:
    parsed = html_facts(html)
    from_json, document, json_groups = json_facts(json_text)
    from_csv, rows = csv_facts(csv_text, result.score_kind)
    assert parsed.files == from_json == from_csv
    assert len(parsed.files) == len(result.groups) + result.duplicate_count
    # per group: size and reclaimable bytes
    html_groups = {n: (int(a["data-size"]), int(a["data-reclaimable-bytes"]))
                   for n, a in parsed.groups.items()}
    csv_groups = {int(r["group"]): (int(r["group_size"]), int(r["group_reclaimable_bytes"]))
                  for r in rows}
    assert html_groups == json_groups == csv_groups
    # the summary, against the result itself
    summary = document["summary"]
    expected = {"images": len(result.facts), "groups": len(result.groups),
                "duplicates": result.duplicate_count,
                "reclaimable-bytes": result.reclaimable_bytes}
    assert {k: int(parsed.summary[k]) for k in expected} == expected
    assert {"images": summary["images"], "groups": summary["groups"],
            "duplicates": summary["duplicates"],
            "reclaimable-bytes": summary["reclaimable_bytes"]} == expected
    assert float(parsed.summary["threshold"]) == pytest.approx(result.threshold)
    assert summary["threshold"] == document["threshold"] == pytest.approx(result.threshold)
    assert parsed.summary["threshold-source"] == summary["threshold_source"] == \
        document["threshold_source"] == result.threshold_source
    target = result.target_precision
    assert parsed.summary["target-precision"] == ("" if target is None else f"{target:g}")
    assert summary["target_precision"] == target
    assert parsed.summary["score"] == document["score"] == result.score_kind
    # each duplicate's tooltip names the score it shows
    assert len(parsed.score_titles) == result.duplicate_count
    words = {"cosine": "cosine similarity", "sscd-normalised": "normalised",
             "copy": "probability"}[result.score_kind]
    assert all(words in title for title in parsed.score_titles)
    for row in rows:
        assert int(row["images_indexed"]) == len(result.facts)
        assert float(row["threshold"]) == pytest.approx(result.threshold)
        assert row["threshold_source"] == result.threshold_source


def _csv(result: DedupResult) -> str:
    return groups_to_csv(result.groups, result.facts, result.threshold,
                         threshold_source=result.threshold_source,
                         score_kind=result.score_kind)


def _json(result: DedupResult) -> str:
    return groups_to_json(result.groups, result.facts, result.threshold,
                          threshold_source=result.threshold_source,
                          target_precision=result.target_precision,
                          score_kind=result.score_kind)


@pytest.mark.parametrize("norm, kind", [(None, "cosine"), (ScoreNorm(), "sscd-normalised"),
                                        (None, "copy")])
def test_hand_made_result_with_awkward_paths(tmp_path, norm, kind):
    names = ["plain.png", 'quote " and, comma.png', "été/日本 space.png", "<b>&amp;.png"]
    facts = []
    for number, name in enumerate(names):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40 + number, 30), (number * 50, 90, 90)).save(path)
        facts.append(FileFacts(str(path), 40 + number, 30, path.stat().st_size))
    facts.append(FileFacts(str(tmp_path / "gone.jpg"), 7, 5, 123))  # missing: a placeholder
    groups = [Group(0, [(1, 0.9123456), (4, 0.5)], {1: 0.81, 4: 0.3333333}),
              Group(2, [(3, 0.25)], {3: -0.125})]
    result = DedupResult(0.4567, groups, facts, threshold_source="precision",
                         target_precision=0.95, score_norm=norm, score_kind=kind)
    html = render_html(result, thumb_px=24, workers=1)
    assert_same_facts(result, html, _json(result), _csv(result))
    # scores and cosines as given, in the keeper-then-members order of the groups
    assert [f[6:] for f in html_facts(html).files] == [
        (None, None), (0.912346, 0.81), (0.5, 0.333333), (None, None), (0.25, -0.125)]


def test_old_keys_and_columns_are_kept():
    facts = [FileFacts("/a.jpg", 10, 10, 100), FileFacts("/b.jpg", 5, 5, 40)]
    groups = [Group(0, [(1, 0.75)])]
    document = json.loads(groups_to_json(groups, facts, 0.5))  # the original call
    assert document["threshold"] == 0.5
    assert document["groups"][0]["keeper"] == "/a.jpg"
    assert document["groups"][0]["members"][0] == {"path": "/b.jpg", "score": 0.75, "width": 5,
                                                    "height": 5, "bytes": 40, "cosine": None}
    text = groups_to_csv(groups, facts)  # the original call
    header = text.splitlines()[0].split(",")
    assert tuple(header[:7]) == ("group", "role", "path", "score", "width", "height", "bytes")
    assert tuple(header) == CSV_COLUMNS


def test_cli_formats_agree(tmp_path):
    folder = tmp_path / "photos"
    make_collection(folder, originals=6, copies_per_edit=1, seed=3, size=(320, 240))
    update_index([folder], folder / ".mgdedup", load_model(), "efficientnet-lite0", 128,
                 workers=0)
    runner = CliRunner()
    base = ["dedup", "--index", str(folder / ".mgdedup"), "--threshold", "0.5"]
    page = tmp_path / "report.html"
    outputs = {}
    for fmt in ("json", "csv", "html"):
        extra = ["--out", str(page)] if fmt == "html" else []
        result = runner.invoke(app, [*base, "--format", fmt, *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[fmt] = page.read_text(encoding="utf-8") if fmt == "html" else result.stdout
    from mgdedup.duplicates.find import find_duplicates

    result = find_duplicates(folder / ".mgdedup", 0.5)
    assert result.groups, "planted copies must group at 0.5"
    assert_same_facts(result, outputs["html"], outputs["json"], outputs["csv"])

"""`mgdedup review`: loopback only, a token on every request, decisions written to the index
and honoured by `dedup`, apply only of the dry run that was shown."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import run

from mgdedup.duplicates.keepers import KeeperRule
from mgdedup.review.server import TOKEN_HEADER, ReviewServer
from mgdedup.review.session import ReviewSession


@pytest.fixture
def served(lib):
    root, index_dir = lib
    server = ReviewServer(ReviewSession(index_dir, None, KeeperRule()))
    server.serve_in_thread()
    yield root, index_dir, server
    server.shutdown()
    server.server_close()


def call(server: ReviewServer, path: str, body: dict | None = None, *, token: str | None = "",
         host: str | None = None) -> tuple[int, dict | bytes]:
    port = server.server_address[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    if token is not None:
        request.add_header(TOKEN_HEADER, token or server.token)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
            kind = response.headers["Content-Type"]
            return response.status, json.loads(data) if kind.startswith("application/json") \
                else data
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def dedup_json(index_dir: Path) -> dict:
    done = run("dedup", "--index", index_dir, "--format", "json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_listens_on_loopback_only_with_a_token(served):
    _, _, server = served
    assert server.server_address[0] == "127.0.0.1"
    assert server.url.startswith(f"http://127.0.0.1:{server.server_address[1]}/?token=")
    assert call(server, "/api/groups", token=None)[0] == 403
    assert call(server, "/api/groups", token="wrong")[0] == 403
    assert call(server, "/api/groups", host="evil.example:80")[0] == 403  # DNS rebinding
    status, document = call(server, "/api/groups")
    assert status == 200 and len(document["groups"]) == 3
    status, page = call(server, "/?token=" + server.token, token=None)
    assert status == 200 and server.token.encode() in page
    # a POST must carry the token in its header: a token in the URL (a link) is not enough
    port = server.server_address[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/decision?token="
                                     f"{server.token}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403


def test_images_only_of_group_files_inside_the_roots(served, tmp_path):
    root, index_dir, server = served
    document = call(server, "/api/groups")[1]
    row = document["groups"][0]["files"][1]["row"]
    status, jpeg = call(server, f"/api/image/{row}?size=thumb")
    assert status == 200 and jpeg[:3] == b"\xff\xd8\xff"
    assert call(server, "/api/image/99999?size=full")[0] == 409
    assert call(server, "/api/image/abc")[0] == 400
    # a group file whose folder now leads outside the indexed folder is not served
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    member = Path(document["groups"][0]["files"][1]["path"])
    shutil.move(member.parent, outside / "moved")
    member.parent.symlink_to(outside / "moved")
    status, body = call(server, f"/api/image/{row}?size=full")
    assert status == 409 and "outside the indexed folders" in body["error"]


def test_decisions_are_written_and_dedup_honours_them(served):
    _, index_dir, server = served
    groups = call(server, "/api/groups")[1]["groups"]
    first, second = groups[0]["files"], groups[1]["files"]
    new_keeper, not_dup = first[1], second[1]
    assert call(server, "/api/decision", {"kind": "keeper", "row": new_keeper["row"]})[0] == 200
    assert call(server, "/api/decision", {"kind": "not-duplicate", "row": not_dup["row"]}
                )[0] == 200
    assert call(server, "/api/decision", {"kind": "not-duplicate",
                                          "row": second[0]["row"]})[0] == 409  # the keeper
    assert call(server, "/api/decision", {"kind": "nonsense", "row": 0})[0] in (400, 409)
    after = dedup_json(index_dir)
    keepers = {g["keeper"]: g for g in after["groups"]}
    assert new_keeper["path"] in keepers
    assert keepers[new_keeper["path"]]["keeper_reason"] == "chosen in review"
    grouped = {f["path"] for g in after["groups"] for f in g["files"]}
    assert not_dup["path"] not in grouped
    stored = json.loads((index_dir / "decisions.json").read_text())
    assert stored["keeper"] == [new_keeper["path"]]
    # swapping again within the group replaces the earlier choice
    third = next(f for f in first if f["path"] not in (new_keeper["path"],))
    row = next(f["row"] for g in call(server, "/api/groups")[1]["groups"] for f in g["files"]
               if f["path"] == third["path"])
    assert call(server, "/api/decision", {"kind": "keeper", "row": row})[0] == 200
    assert json.loads((index_dir / "decisions.json").read_text())["keeper"] == [third["path"]]


def test_apply_needs_the_dry_run_that_was_shown(served, tmp_path):
    root, index_dir, server = served
    to = tmp_path / "dups"
    status, plan = call(server, "/api/plan", {"action": "move", "to": str(to)})
    assert status == 200 and plan["changes"] == 6
    assert all(line.startswith("keep ") and " <- move " in line for line in plan["lines"])
    # a decision changes the groups, so the shown dry run no longer applies
    member = call(server, "/api/groups")[1]["groups"][0]["files"][1]
    call(server, "/api/decision", {"kind": "not-duplicate", "row": member["row"]})
    status, body = call(server, "/api/apply", {"action": "move", "to": str(to),
                                               "fingerprint": plan["fingerprint"]})
    assert status == 409 and "changed" in body["error"]
    assert not to.exists()
    status, plan = call(server, "/api/plan", {"action": "move", "to": str(to)})
    status, done = call(server, "/api/apply", {"action": "move", "to": str(to),
                                               "fingerprint": plan["fingerprint"]})
    assert status == 200 and done["ok"] and "mgdedup undo" in done["lines"][-1]
    assert len(list(to.rglob("*.*"))) == plan["changes"] == 5
    assert call(server, "/api/groups")[1]["groups"] == []  # moved files are gone from groups
    assert call(server, "/api/plan", {"action": "rm -rf", "to": ""})[0] == 409

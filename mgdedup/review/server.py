"""The review page's server: the standard library's threading HTTP server on 127.0.0.1 only.

Nothing but this machine can reach it: it binds the loopback address (a random free port by
default), answers only requests whose Host is that address, and every request must carry
the per-run token (in the page URL, then in a header for the page's own calls), compared
in constant time. Responses are never cached and send no referrer; the page's Content
Security Policy allows only its own inline code (by nonce) and requests to this server.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from mgdedup.errors import MgdedupError
from mgdedup.review.session import ReviewSession

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TOKEN_HEADER = "X-Mgdedup-Token"
MAX_BODY = 64 * 1024  # a decision or an action request is a few hundred bytes


def _page_template() -> str:
    return resources.files("mgdedup.review").joinpath("page.html").read_text("utf-8")


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, session: ReviewSession, port: int = 0) -> None:
        super().__init__((HOST, port), _Handler)
        self.session = session
        self.token = secrets.token_urlsafe(24)
        self.template = _page_template()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/?token={self.token}"

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="mgdedup-review",
                                  daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "mgdedup-review"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
        log.debug("review: " + format, *args)

    # -- checks -----------------------------------------------------------------------
    def _allowed(self, query: dict[str, list[str]]) -> bool:
        port = self.server.server_address[1]
        if self.headers.get("Host") not in (f"{HOST}:{port}", f"localhost:{port}"):
            self._send_json({"error": "wrong host"}, HTTPStatus.FORBIDDEN)
            return False  # a page elsewhere reaching us through a rebound DNS name
        given = self.headers.get(TOKEN_HEADER) or (query.get("token") or [""])[0]
        if not secrets.compare_digest(given.encode(), self.server.token.encode()):
            self._send_json({"error": "missing or wrong token"}, HTTPStatus.FORBIDDEN)
            return False
        return True

    # -- responses ----------------------------------------------------------------------
    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK,
              csp: str = "default-src 'none'") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", csp)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: object, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(data).encode(), "application/json; charset=utf-8", status)

    # -- routes -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (the base's name)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._allowed(query):
            return
        try:
            if url.path == "/":
                nonce = secrets.token_urlsafe(16)
                page = self.server.template.replace("{{TOKEN}}", self.server.token)
                page = page.replace("{{NONCE}}", nonce)
                csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; "
                       f"style-src 'nonce-{nonce}'; img-src 'self'; connect-src 'self'; "
                       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
                self._send(page.encode(), "text/html; charset=utf-8", csp=csp)
            elif url.path == "/api/groups":
                self._send_json(self.server.session.groups_document())
            elif url.path.startswith("/api/image/"):
                row = int(url.path.rsplit("/", 1)[1])
                size = (query.get("size") or ["thumb"])[0]
                self._send(self.server.session.image(row, size), "image/jpeg")
            else:
                self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND)
        except ValueError:
            self._send_json({"error": "bad request"}, HTTPStatus.BAD_REQUEST)
        except MgdedupError as error:
            self._send_json({"error": str(error)}, HTTPStatus.CONFLICT)
        except Exception as error:  # one bad file must never stop the review
            log.warning("review: %s failed: %s", url.path, error)
            self._send_json({"error": f"{type(error).__name__}: {error}"},
                            HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if not self._allowed({}):  # the token must come in the header: no form can post
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY or \
                    not self.headers.get("Content-Type", "").startswith("application/json"):
                self._send_json({"error": "expected a small JSON body"},
                                HTTPStatus.BAD_REQUEST)
                return
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
            session = self.server.session
            if url.path == "/api/decision":
                session.decide(str(body.get("kind", "")), int(body["row"]))
                self._send_json({"ok": True})
            elif url.path == "/api/plan":
                lines, fingerprint, count = session.plan(str(body.get("action", "")),
                                                         body.get("to") or None)
                self._send_json({"lines": lines, "fingerprint": fingerprint,
                                 "changes": count})
            elif url.path == "/api/apply":
                lines, ok = session.apply(str(body.get("action", "")), body.get("to") or None,
                                          str(body.get("fingerprint", "")))
                self._send_json({"lines": lines, "ok": ok})
            else:
                self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND)
        except (ValueError, KeyError, TypeError):
            self._send_json({"error": "bad request"}, HTTPStatus.BAD_REQUEST)
        except MgdedupError as error:
            self._send_json({"error": str(error)}, HTTPStatus.CONFLICT)

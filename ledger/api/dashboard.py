"""The risk dashboard, served read-only over plain HTTP on a loopback port (`--dashboard-port`).

The maintenance port (`--health-port`) speaks gRPC (HTTP/2 health checks), so it cannot also
answer a browser's HTTP/1.1 GET; the dashboard gets its own small port instead, with the same
rule: it binds to 127.0.0.1 only, never to another address. What it serves:

- `GET /dashboard` (and `HEAD`): `risk.dashboard.render` for every platform of the ledger;
- `GET /dashboard?platform=<id>`: one platform. The id must be a valid platform id of this
  ledger (checked against the ledger's own list before anything is read); it reaches the read
  model's SQL only as a bound parameter, never as text;
- anything else: 404; any other method: 405 (nothing here writes). No other parameter is
  accepted (400).

The page is self-contained (no script, no external asset); the answer forbids every external
load with a Content-Security-Policy, and is never cached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from ledger.service import LedgerService
from ledger.validate import is_platform_id
from risk import store as rs
from risk.dashboard import render

log = logging.getLogger("ledger.api.dashboard")

PATH: Final = "/dashboard"
HOST: Final = "127.0.0.1"
_HEADERS: Final = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


class DashboardError(Exception):
    """A request the dashboard refuses: (HTTP status, short text)."""

    def __init__(self, status: HTTPStatus, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def page_for(service: LedgerService, db: rs.RiskDb, target: str) -> bytes:
    """The page for a request target (path and query), or DashboardError."""
    parts = urlsplit(target)
    if parts.path not in (PATH, PATH + "/"):
        raise DashboardError(HTTPStatus.NOT_FOUND, "not found")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise DashboardError(HTTPStatus.BAD_REQUEST, "malformed query") from None
    if set(query) - {"platform"}:
        raise DashboardError(HTTPStatus.BAD_REQUEST, "the only parameter is platform")
    known = service.platform_ids()
    platforms = sorted(known)
    if "platform" in query:
        wanted = query["platform"]
        if any(not is_platform_id(p) or p not in known for p in wanted):
            raise DashboardError(HTTPStatus.NOT_FOUND, "no such platform")
        platforms = sorted(set(wanted))
    return render(db, platforms, time.time_ns() // 1_000_000).encode("utf-8")


def _handler(page: Callable[[str], bytes]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "custody-dashboard"
        sys_version = ""

        def _answer(self, status: HTTPStatus, body: bytes, ctype: str, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in _HEADERS:
                self.send_header(name, value)
            if status is HTTPStatus.METHOD_NOT_ALLOWED:
                self.send_header("Allow", "GET, HEAD")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            try:
                body = page(self.path)
            except DashboardError as exc:
                text = f"{exc.status.value} {exc.text}\n".encode()
                self._answer(exc.status, text, "text/plain; charset=utf-8", head)
                return
            except Exception:
                log.exception("dashboard failed")
                text = b"500 the dashboard could not be rendered\n"
                self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, text, "text/plain", head)
                return
            self._answer(HTTPStatus.OK, body, "text/html; charset=utf-8", head)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _refuse(self) -> None:
            text = b"405 the dashboard is read-only\n"
            self._answer(HTTPStatus.METHOD_NOT_ALLOWED, text, "text/plain", False)

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard %s %s", self.address_string(), format % args)

    return Handler


class DashboardServer:
    """`ThreadingHTTPServer` on 127.0.0.1:port in a daemon thread; `close()` stops it."""

    def __init__(self, service: LedgerService, port: int) -> None:
        self._db: rs.RiskDb | None = None
        self._lock = threading.Lock()
        self.service = service

        def page(target: str) -> bytes:
            return page_for(service, self.db(), target)

        try:
            self.httpd = ThreadingHTTPServer((HOST, port), _handler(page))
        except OSError as exc:
            raise OSError(f"cannot bind the dashboard port {port}: {exc}") from None
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="dashboard", daemon=True
        )

    def db(self) -> rs.RiskDb:
        with self._lock:
            if self._db is None:
                self._db = rs.open_db(self.service.store)
            return self._db

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()

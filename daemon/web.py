"""The status page's HTTP server ([web] in the config): the page, its JSON API, outbox files and /metrics.

Runs in threads of `wanbox serve` (stdlib ThreadingHTTPServer) with its own ledger connections and short
read transactions, so it never slows the supervisor's loop nor holds its locks. Read-only unless a token
is configured; it must serve files from the outbox only and never move a job except by cancel/retry.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from daemon.config import Config

log = logging.getLogger("wanbox.web")
STATIC = Path(__file__).resolve().parent / "web"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8")}  # fmt: skip
FILE_TYPES = {".mp4": "video/mp4", ".json": "application/json", ".jpg": "image/jpeg", ".png": "image/png"}
SNAPSHOT_SECONDS = 1.0  # /api/status is rebuilt at most this often, however many browsers poll it
LOOPBACK = ("127.0.0.1", "::1", "localhost")
JOB_ROUTE = re.compile(r"^/api/jobs/([0-9A-Za-z-]{1,40})(?:/(cancel|retry))?$")
CSP = "default-src 'self'; img-src 'self'; media-src 'self'; object-src 'none'; frame-ancestors 'none'"


class Reply(Exception):
    """An HTTP answer other than 200, with the reason shown to the caller."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class StatusSite:
    """What each route answers; `WebServer` puts it behind HTTP."""

    def __init__(self, config: Config, host_id: str, ledger: Any) -> None:
        self.cfg = config
        self.host_id = host_id
        self.ledger = ledger
        self._snapshot: tuple[float, bytes] = (-SNAPSHOT_SECONDS, b"")
        self._snapshot_lock = threading.Lock()
        self._registry: Any = None

    def status(self) -> bytes:
        with self._snapshot_lock:  # concurrent pollers share one rebuild per second
            made, body = self._snapshot
            if time.monotonic() - made >= SNAPSHOT_SECONDS:
                from daemon.webdata import status_json

                p = self.cfg.paths
                body = _json(status_json(self.ledger, p.root, p.state, p.outbox, self.cfg.web.recent,
                                         bool(self.cfg.web.token)))  # fmt: skip
                self._snapshot = (time.monotonic(), body)
            return body

    def job(self, job_id: str) -> bytes:
        from daemon.ledger import AmbiguousJobId, JobNotFound
        from daemon.webdata import job_detail_json

        p = self.cfg.paths
        try:
            return _json(job_detail_json(self.ledger, job_id, p.root, p.state, p.outbox))
        except (JobNotFound, AmbiguousJobId) as exc:
            raise Reply(HTTPStatus.NOT_FOUND, str(exc)) from None

    def act(self, job_id: str, action: str, authorization: str | None) -> bytes:
        """cancel or retry, only with the configured token as `Authorization: Bearer <token>`."""
        from daemon.ledger import AmbiguousJobId, IllegalTransition, JobNotFound

        self._authorize(authorization)
        try:
            if action == "cancel":
                was = self.ledger.cancel(job_id, "cancelled by user (web page)")
                result = {"id": self.ledger.get(job_id).id, "cancelled_from": was.value}
            else:
                job = self.ledger.retry(job_id, "retried by user (web page)")
                result = {"id": job.id, "state": job.state.value}
        except (JobNotFound, AmbiguousJobId) as exc:
            raise Reply(HTTPStatus.NOT_FOUND, str(exc)) from None
        except IllegalTransition as exc:
            raise Reply(HTTPStatus.CONFLICT, str(exc)) from None
        with self._snapshot_lock:
            self._snapshot = (-SNAPSHOT_SECONDS, b"")  # the next poll shows the change
        return _json(result)

    def _authorize(self, authorization: str | None) -> None:
        token = self.cfg.web.token
        if not token:
            raise Reply(HTTPStatus.FORBIDDEN, "read-only: set [web] token in the config to allow cancel and retry")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Reply(HTTPStatus.UNAUTHORIZED, "send the configured token as the header 'Authorization: Bearer <token>'")

    def metrics(self) -> bytes:
        from daemon.metrics import exposition, registry_for

        if not self.cfg.web.metrics:
            raise Reply(HTTPStatus.NOT_FOUND, "metrics are off ([web] metrics = false)")
        if self._registry is None:
            self._registry = registry_for(self.ledger, self.host_id)
        return exposition(self._registry)

    def outbox_file(self, name: str) -> Path:
        """A regular file directly in the outbox, by its name; anything else (a path, a link, a dotfile) is 404."""
        if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            raise Reply(HTTPStatus.NOT_FOUND, "no such file in the outbox")
        path = self.cfg.paths.outbox / name
        try:
            mode = os.lstat(path).st_mode  # lstat: a symlink is refused, never followed out of the outbox
        except OSError:
            raise Reply(HTTPStatus.NOT_FOUND, "no such file in the outbox") from None
        if not stat.S_ISREG(mode):
            raise Reply(HTTPStatus.NOT_FOUND, "no such file in the outbox")
        return path


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _get(self, path: str) -> None:
        site = self.server.site
        if path in PAGES:
            name, ctype = PAGES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype)
        elif path == "/api/status":
            self._send(HTTPStatus.OK, site.status(), "application/json")
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            self._send(HTTPStatus.OK, site.metrics(), CONTENT_TYPE_LATEST)
        elif path.startswith("/files/"):
            self._send_file(site.outbox_file(unquote(path[len("/files/"):])))
        elif (match := JOB_ROUTE.match(path)) and match[2] is None:
            self._send(HTTPStatus.OK, site.job(match[1]), "application/json")
        else:
            raise Reply(HTTPStatus.NOT_FOUND, f"nothing at {path}")

    def _post(self, path: str) -> None:
        match = JOB_ROUTE.match(path)
        if not match or match[2] is None:
            raise Reply(HTTPStatus.NOT_FOUND, f"nothing to POST at {path}")
        self._send(HTTPStatus.OK, self.server.site.act(match[1], match[2], self.headers.get("Authorization")),
                   "application/json")

    def _answer(self, route: Any) -> None:
        try:
            self._check_host()
            route(urlsplit(self.path).path)
        except Reply as reply:
            self._send(reply.status, _json({"error": str(reply)}), "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away mid-answer
        except Exception as exc:  # one bad request must not take the server (or the daemon) down
            log.exception("web: %s %s failed", self.command, self.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _json({"error": f"internal error: {exc}"}), "application/json")

    def _check_host(self) -> None:
        """Bound to loopback, answer only requests addressed to loopback: a web page elsewhere cannot read the
        queue through a DNS name that resolves to 127.0.0.1 (DNS rebinding)."""
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if host not in LOOPBACK:
                raise Reply(HTTPStatus.MISDIRECTED_REQUEST, f"this server answers only to {', '.join(LOOPBACK)}")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, path: Path) -> None:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", FILE_TYPES.get(path.suffix.lower(), "application/octet-stream"))
            self.send_header("Content-Length", str(size))
            self._common_headers()
            self.end_headers()
            while chunk := fh.read(1 << 20):
                self.wfile.write(chunk)

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("web: %s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow browser never holds up the daemon's stop
    site: StatusSite
    loopback: bool


class _Server6(_Server):
    address_family = socket.AF_INET6  # bind = "::" or another IPv6 address


class WebServer:
    """Starts and stops the status page's server; does nothing with [web] enabled = false."""

    def __init__(self, config: Config, host_id: str) -> None:
        self.cfg = config
        self.host_id = host_id
        self._server: _Server | None = None
        self._ledger: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> str | None:
        """Listen; returns the page's URL, or None when off or when it cannot listen (logged: the daemon
        goes on making videos without its page)."""
        web = self.cfg.web
        if not web.enabled:
            return None
        from daemon.ledger import Ledger

        try:
            server = (_Server6 if ":" in web.bind else _Server)((web.bind, web.port), _Handler)
        except OSError as exc:
            log.error("web: cannot listen on %s:%d (%s); serving without the status page", web.bind, web.port, exc)
            return None
        self._ledger = Ledger(self.cfg.paths.ledger, migrate=False)  # its own connections, separate from the loop's
        server.site = StatusSite(self.cfg, self.host_id, self._ledger)
        server.loopback = web.bind in LOOPBACK
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="web",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        host, port = server.server_address[:2]
        url = f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/"
        if not server.loopback:
            log.warning("web: listening on every interface of %s (%s)%s", host, url,
                        "; the token travels in clear over plain HTTP" if web.token else ", read-only")
        log.info("web: status page at %s (%s)", url, "cancel/retry with the token" if web.token else "read-only")
        return url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._ledger.close()
        self._server = None


def _json(value: Any) -> bytes:
    return json.dumps(value, default=_plain, separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)

"""Webhook requests: the signed JSON body, one HTTP POST with a timeout, and the receiver's check of a signature.

Standard library only (urllib): one POST per attempt needs no session, pool or retry machinery of a client
library, and the daemon gains no dependency. It must not retry or touch the ledger: notifications.py does.

Verifying on the receiving side (Python; any language with HMAC-SHA256 works the same way):

    expected = "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, request.headers["X-Wanbox-Signature"])
    # then: json.loads(raw_body)["timestamp"] == int(request.headers["X-Wanbox-Timestamp"]) and it is recent
    # (e.g. within 5 minutes), so an old body cannot be replayed; X-Wanbox-Delivery repeats on a retry.

The signature covers the exact bytes received, and the timestamp is inside them, so it is signed too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Wanbox-Signature"
TIMESTAMP_HEADER = "X-Wanbox-Timestamp"
DELIVERY_HEADER = "X-Wanbox-Delivery"
EVENT_HEADER = "X-Wanbox-Event"
MAX_REPLY_BYTES = 2000  # of the receiver's answer kept with the attempt


@dataclass(frozen=True)
class Outcome:
    """What one POST got: ok is a 2xx answer; status is None when no HTTP answer came at all."""

    ok: bool
    status: int | None
    detail: str
    seconds: float


def body(event: str, delivery: int, job: dict[str, Any], timestamp: int) -> bytes:
    """The JSON document a receiver gets: which end, which delivery (stable across retries), when, the job."""
    document = {"event": event, "delivery": delivery, "timestamp": timestamp, "job": job}
    return json.dumps(document, sort_keys=True, default=str).encode("utf-8")


def signature(data: bytes, secret: str) -> str:
    """The X-Wanbox-Signature value: sha256=<hex HMAC-SHA256 of the body, keyed with the secret>."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), data, hashlib.sha256).hexdigest()


def verify(data: bytes, secret: str, header: str) -> bool:
    """True when `header` is the signature of `data` with `secret` (constant-time comparison)."""
    return hmac.compare_digest(signature(data, secret), header)


def headers(event: str, delivery: int, timestamp: int, data: bytes, secret: str, agent: str) -> dict[str, str]:
    found = {"Content-Type": "application/json", "User-Agent": agent, EVENT_HEADER: event,
             DELIVERY_HEADER: str(delivery), TIMESTAMP_HEADER: str(timestamp)}  # fmt: skip
    if secret:
        found[SIGNATURE_HEADER] = signature(data, secret)
    return found


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET without the body: report the redirect instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(url: str, data: bytes, header_values: dict[str, str], timeout: float) -> Outcome:
    """POST `data` to `url`; never raises for network or HTTP trouble (the Outcome says what happened)."""
    started = time.monotonic()
    if _scheme(url) not in ("http", "https"):  # urllib would also open file:, ftp: and data: URLs
        return Outcome(False, None, f"not an http(s) URL: {display_url(url)}", 0.0)
    request = urllib.request.Request(url, data=data, headers=header_values, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as reply:
            text = reply.read(MAX_REPLY_BYTES).decode("utf-8", "replace")
            return Outcome(200 <= reply.status < 300, reply.status, text, time.monotonic() - started)
    except urllib.error.HTTPError as exc:
        where = f" to {exc.headers.get('Location')}" if 300 <= exc.code < 400 else ""
        text = _read_error(exc)
        detail = f"HTTP {exc.code} {exc.reason}{where}" + (f": {text}" if text else "")
        return Outcome(False, exc.code, detail, time.monotonic() - started)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return Outcome(False, None, _network_error(exc, timeout), time.monotonic() - started)


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError:
        return ""


def _read_error(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read(MAX_REPLY_BYTES).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _network_error(exc: BaseException, timeout: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host ({reason.strerror or reason})"
    return str(getattr(reason, "strerror", None) or reason)


def display_url(url: str) -> str:
    """The URL as shown in `wanbox show` and logs: without user:password and the query string (tokens)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(not a valid URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?…" if parts.query else "")

"""A job's own notifications (the manifest's [notify]: webhook URLs and the end states they are for), and what a
webhook URL must look like; the server's [notify] settings use the same words.

Plain data and text checks; it must not send anything (daemon/notifications.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from inbox_schema.reader import Reader

NOTIFY_EVENTS = ("done", "failed", "rejected")  # the end states a notification can be sent for
MAX_JOB_URLS = 5


@dataclass(frozen=True)
class NotifyTargets:
    """A job's own wishes: webhook URLs and the end states they are sent for.

    The post-job command and the signing secret are the server's alone: an uploaded manifest must not be able
    to run commands on the host or choose how its notifications are signed.
    """

    urls: tuple[str, ...] = ()
    events: tuple[str, ...] = NOTIFY_EVENTS

    def to_dict(self) -> dict[str, object]:
        return {"urls": list(self.urls), "events": list(self.events)}


def webhook_url_problem(url: str) -> str | None:
    """What is wrong with a webhook URL (None when it is an http(s) URL with a host)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL with a host, e.g. https://example.org/hooks/wanbox"
    return None


def read_notify(r: Reader, table: dict) -> NotifyTargets:
    """The manifest's [notify] table (keys urls, events), problems reported through the reader `r`."""
    urls, events = table.get("urls", []), table.get("events", list(NOTIFY_EVENTS))
    good_urls: list[str] = []
    if not isinstance(urls, list) or len(urls) > MAX_JOB_URLS or not all(isinstance(u, str) for u in urls):
        r.error("notify.urls", urls, f'a list of at most {MAX_JOB_URLS} URLs, e.g. ["https://example.org/hook"]')
    else:
        for url in urls:
            problem = webhook_url_problem(url)
            if problem:  # the problem's own words start with "expected" or "not a URL": one sentence here
                detail = f" ({problem})" if problem.startswith("not a URL") else ""
                r.error("notify.urls", url, f"an http:// or https:// URL with a host, e.g. "
                                            f"https://example.org/hooks/wanbox{detail}")
            else:
                good_urls.append(url)
    if not isinstance(events, list) or not events or not all(e in NOTIFY_EVENTS for e in events):
        r.error("notify.events", events, f"a list of some of {', '.join(NOTIFY_EVENTS)}")
        events = list(NOTIFY_EVENTS)
    return NotifyTargets(tuple(good_urls), tuple(dict.fromkeys(events)))

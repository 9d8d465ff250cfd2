"""Where alert events go: sinks (log, JSON lines, webhook) and the durable outbox that feeds them.

An event is a JSON-safe dict with an ``event_id``; :class:`Outbox` stores each one as a file until every sink has
taken it (see ``docs/alerts.md``). :mod:`pipeline.monitoring.alerts` decides *what* to send; this module only delivers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from filelock import FileLock

from pipeline.common import atomic

log = logging.getLogger("pipeline.monitoring.alerts")


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically and flushed to disk (``pipeline.common.atomic``)."""
    atomic.write_json(path, obj, indent=2, fsync=True)


# ------------------------------------------------------------------------------------------------ sinks


class DeliveryError(RuntimeError):
    """A sink could not deliver an event."""


@runtime_checkable
class Sink(Protocol):
    """Somewhere events go. ``name`` must be stable across restarts (the outbox tracks delivery per name)."""

    name: str

    def send(self, event: dict[str, Any]) -> None:
        """Deliver one event or raise."""
        ...


class LogSink:
    """Log each event as one line through :mod:`logging` (``pipeline.monitoring.alerts`` logger by default)."""

    def __init__(
        self, logger: logging.Logger | None = None, level: int = logging.WARNING, name: str = "log"
    ) -> None:
        self.logger = logger or log
        self.level = level
        self.name = name

    def send(self, event: dict[str, Any]) -> None:
        """Log the event (a drift-alert event or an operations event)."""
        if "alert" not in event:  # an operations event (AlertManager.notify_ops)
            ops = event.get("ops", {})
            self.logger.log(self.level, "OPS %s: %s", ops.get("type", event.get("kind")), ops.get("message", ""))
            return
        a = event["alert"]
        axes = ", ".join(f"z_{x['axis']} {x['effect']:+.2f} sd" for x in a["top_axes"]) or "no single axis"
        serials = ",".join(a.get("example_serials", ())[:4]) or "-"
        self.logger.log(
            self.level,
            "ALERT %s [%s] line=%s window=%s cause=%s model=%s tests=%s axes: %s; %s%s; examples: %s (alert %s)",
            event["kind"].upper(),
            a["severity"],
            a["line"],
            event["window_id"],
            a.get("cause", ""),
            a["model_version"],
            ",".join(a["tests"]),
            axes,
            a["summary"],
            f" ({event['reason']})" if event.get("reason") else "",
            serials,
            a["id"],
        )


class JsonlSink:
    """Append each event as one JSON line to a file (flushed and fsynced)."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or f"jsonl:{self.path}"

    def send(self, event: dict[str, Any]) -> None:
        """Append the event."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class WebhookSink:
    """POST each event as a JSON body to an HTTP(S) URL (stdlib ``urllib``; no extra dependency).

    Args:
        url: the endpoint.
        timeout: seconds per request.
        retries: extra attempts after a failed one (so at most ``retries + 1`` requests per send).
        backoff: seconds before the first retry; doubled each retry.
        headers: extra headers (e.g. an authorisation token).
        name: stable sink name (default ``"webhook:<url>"``).
        sleep: the sleep function (tests pass a no-op).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("webhook timeout must be > 0, retries >= 0 and backoff >= 0")
        self.url = url
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.headers = dict(headers or {})
        self.name = name or f"webhook:{url}"
        self._sleep = sleep

    def send(self, event: dict[str, Any]) -> None:
        """POST the event; retry with exponential backoff; raise :class:`DeliveryError` when every attempt fails."""
        body = json.dumps(event).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "linewatch-alerts/1", **self.headers}
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (configured URL)
                    if 200 <= resp.status < 300:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            log.info("webhook %s attempt %d/%d failed: %s", self.url, attempt + 1, self.retries + 1, last)
        raise DeliveryError(f"webhook {self.url} failed after {self.retries + 1} attempts: {last}")


# ------------------------------------------------------------------------------------------------ outbox


@dataclass(frozen=True)
class FlushReport:
    """Outcome of :meth:`Outbox.flush`.

    Attributes:
        delivered: event ids that reached every sink (moved to ``sent/``).
        pending: event ids still pending, with the last error per sink.
    """

    delivered: tuple[str, ...]
    pending: dict[str, dict[str, str]]


class Outbox:
    """Durable store-and-forward queue of alert events: one JSON file per event.

    ``<dir>/pending/<event_id>.json`` holds ``{"event", "queued_at", "delivered_to", "attempts", "errors"}``;
    once every sink has the event the file moves to ``<dir>/sent/``. Delivery is tracked per sink name, so a sink
    that already took an event is not sent it again when another sink failed. Within one flush, a sink that fails
    is not tried on later events, which keeps each sink's events in order.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.sent_dir = self.root / "sent"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.sent_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".outbox.lock"))

    def put(self, event: Mapping[str, Any]) -> bool:
        """Queue an event; returns False (and writes nothing) when its id is already pending or sent."""
        eid = str(event["event_id"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", eid):
            raise ValueError(f"event_id {eid!r} must be a plain file name")
        with self._lock:
            if (self.pending_dir / f"{eid}.json").exists() or (self.sent_dir / f"{eid}.json").exists():
                return False
            entry = {
                "event": dict(event),
                "queued_at": time.time(),
                "delivered_to": [],
                "attempts": 0,
                "errors": {},
            }
            _atomic_write_json(self.pending_dir / f"{eid}.json", entry)
        return True

    def _entries(self, folder: Path) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for p in folder.glob("*.json"):
            try:
                out.append((p, json.loads(p.read_text(encoding="utf-8"))))
            except (OSError, json.JSONDecodeError) as exc:  # a foreign or damaged file: leave it, say so
                log.error("outbox: cannot read %s: %s", p, exc)
        out.sort(key=lambda e: (e[1].get("queued_at", 0.0), e[0].name))
        return out

    def pending(self) -> list[dict[str, Any]]:
        """Pending events (oldest first)."""
        return [e["event"] for _, e in self._entries(self.pending_dir)]

    def sent(self) -> list[dict[str, Any]]:
        """Delivered events (oldest first)."""
        return [e["event"] for _, e in self._entries(self.sent_dir)]

    def flush(self, sinks: Sequence[Sink]) -> FlushReport:
        """Try to deliver every pending event to every sink that has not taken it yet.

        Args:
            sinks: the sinks (matched to earlier deliveries by ``name``).

        Returns:
            :class:`FlushReport`.
        """
        delivered: list[str] = []
        still: dict[str, dict[str, str]] = {}
        with self._lock:
            failed_sinks: set[str] = set()
            for path, entry in self._entries(self.pending_dir):
                event = entry["event"]
                eid = str(event["event_id"])
                done = set(entry.get("delivered_to", []))
                errors = dict(entry.get("errors", {}))
                tried = False
                for sink in sinks:
                    if sink.name in done:
                        continue
                    if sink.name in failed_sinks:
                        errors[sink.name] = "skipped: an earlier event to this sink is still pending"
                        continue
                    tried = True
                    try:
                        sink.send(event)
                    except Exception as exc:  # any sink failure keeps the event pending
                        failed_sinks.add(sink.name)
                        errors[sink.name] = f"{type(exc).__name__}: {exc}"
                        log.warning("alert event %s not delivered to %s: %s", eid, sink.name, exc)
                    else:
                        done.add(sink.name)
                        errors.pop(sink.name, None)
                entry["delivered_to"] = sorted(done)
                entry["errors"] = errors
                entry["attempts"] = int(entry.get("attempts", 0)) + int(tried)
                if all(s.name in done for s in sinks):
                    entry["sent_at"] = time.time()
                    _atomic_write_json(self.sent_dir / path.name, entry)
                    path.unlink(missing_ok=True)
                    delivered.append(eid)
                else:
                    _atomic_write_json(path, entry)
                    still[eid] = errors
        return FlushReport(tuple(delivered), still)


__all__ = ["DeliveryError", "FlushReport", "JsonlSink", "LogSink", "Outbox", "Sink", "WebhookSink"]

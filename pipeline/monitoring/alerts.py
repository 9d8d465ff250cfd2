"""Alerting on drifted windows: policy, persisted per-line state, sinks and a durable outbox.

Flow of one window (:meth:`AlertManager.update`):

1. retry whatever is still in the outbox (:meth:`Outbox.flush`);
2. load the line's state (JSON, one file per line); a window id already processed returns ``[]`` (idempotent, so a
   restart that re-processes a window neither re-alerts nor forgets);
3. apply the :class:`AlertPolicy`: hysteresis (``k_consecutive`` drifted windows before an alert opens), one open
   alert per line (later drifted windows are deduplicated into it; a rise to ``critical`` is an *escalation*),
   resolution after ``resolve_after`` clear windows, and a cooldown: the same drift (dedup key = line, top axes,
   tests fired) re-appearing within ``cooldown_windows`` windows (or ``cooldown_minutes``) of its last alert is
   *suppressed*;
4. write the deliverable events (opened / escalated / resolved) to the outbox, **then** save the state atomically
   (temp file + ``os.replace``); ids are deterministic, so a crash between the two cannot duplicate an event;
5. deliver the outbox to every sink. An event leaves the outbox (moves to ``sent/``) only when every sink has taken
   it; a failing webhook keeps it pending and the next update (or :meth:`AlertManager.flush`) retries it.

See ``docs/alerts.md`` for the alert JSON schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from filelock import FileLock

__all__ = [
    "POLICIES",
    "SEVERITIES",
    "Alert",
    "AlertEvent",
    "AlertManager",
    "AlertPolicy",
    "AlertState",
    "DeliveryError",
    "FlushReport",
    "JsonlSink",
    "LogSink",
    "Outbox",
    "Sink",
    "WebhookSink",
    "get_policy",
]

log = logging.getLogger(__name__)

#: Severities, mildest first.
SEVERITIES: tuple[str, ...] = ("warning", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
#: Event kinds. ``suppressed`` events are returned and recorded in the state, never delivered.
EVENT_KINDS: tuple[str, ...] = ("opened", "escalated", "resolved", "suppressed")
_DELIVERED_KINDS = frozenset({"opened", "escalated", "resolved"})
STATE_VERSION = 1


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_iso(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _jsonable(v: Any) -> Any:
    """Window bounds and other values as JSON-safe scalars (timestamps become ISO strings)."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):  # numpy scalar
        return _jsonable(v.item())
    return str(v)


def _digest(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class AlertPolicy:
    """When to open, escalate, suppress and resolve alerts.

    Attributes:
        k_consecutive: drifted windows in a row before an alert opens (hysteresis; 1 = alert at once).
        resolve_after: clear windows in a row before an open alert resolves.
        cooldown_windows: after an alert for a dedup key opened or resolved, the same key re-appearing within this
            many windows is suppressed (0 = no cooldown).
        cooldown_minutes: the same in wall-clock minutes (None = off); either cooldown suppresses.
        critical_effect: |effect| (reference sd) of a top axis at or above which the alert is ``critical``.
        critical_p: a test-family p-value (or a top axis's adjusted p) below which the alert is ``critical``.
        top_n: axes listed in an alert.
        dedup_axes: leading axes that form the dedup key (with the line and the tests fired).
        max_history: windows kept in the state's history.
        max_processed: window ids remembered for idempotency.
    """

    k_consecutive: int = 2
    resolve_after: int = 2
    cooldown_windows: int = 6
    cooldown_minutes: float | None = None
    critical_effect: float = 2.0
    critical_p: float = 1e-6
    top_n: int = 3
    dedup_axes: int = 1
    max_history: int = 500
    max_processed: int = 10_000

    def __post_init__(self) -> None:
        for name in ("k_consecutive", "resolve_after", "top_n", "dedup_axes", "max_history", "max_processed"):
            if getattr(self, name) < 1:
                raise ValueError(f"AlertPolicy.{name} must be >= 1, got {getattr(self, name)}")
        if self.cooldown_windows < 0:
            raise ValueError(f"AlertPolicy.cooldown_windows must be >= 0, got {self.cooldown_windows}")
        if self.cooldown_minutes is not None and self.cooldown_minutes < 0:
            raise ValueError(
                f"AlertPolicy.cooldown_minutes must be >= 0 or None, got {self.cooldown_minutes}"
            )
        if self.critical_effect <= 0 or not 0 < self.critical_p < 1:
            raise ValueError("AlertPolicy.critical_effect must be > 0 and critical_p in (0, 1)")

    def severity(self, top_axes: Sequence[Mapping[str, Any]], p_values: Iterable[float]) -> str:
        """``critical`` when a top axis moved by >= ``critical_effect`` sd or a p-value is < ``critical_p``."""
        effects = [abs(float(a["effect"])) for a in top_axes if a.get("effect") is not None]
        ps = [float(p) for p in p_values if p is not None and p == p]
        if (effects and max(effects) >= self.critical_effect) or (ps and min(ps) < self.critical_p):
            return "critical"
        return "warning"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for logging and the state file)."""
        return asdict(self)


#: Named policies.
POLICIES: dict[str, AlertPolicy] = {
    "default": AlertPolicy(),
    "sensitive": AlertPolicy(k_consecutive=1, resolve_after=1, cooldown_windows=2),
    "conservative": AlertPolicy(k_consecutive=3, resolve_after=3, cooldown_windows=12),
}


def get_policy(name: str) -> AlertPolicy:
    """A named policy from :data:`POLICIES`."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown alert policy {name!r}; choose from {', '.join(POLICIES)}") from None


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Alert:
    """An alert record (the ``alert`` object of every event; see ``docs/alerts.md``).

    Attributes:
        id: stable id (line, opening window and dedup key).
        line: production line.
        window: the window that opened it: ``{"id", "start", "end"}``.
        model_version: model that encoded the window.
        tests: test families that fired (``"axes"``, ``"mmd"``, ``"scores"``).
        top_axes: ``[{"axis", "effect", "p", "description"}]``, largest |effect| first.
        severity: ``"warning"`` or ``"critical"``.
        status: ``"open"``, ``"resolved"`` or ``"suppressed"``.
        summary: one line (the attribution text).
        card_paths: axis card files (PNG/JSON) of the top axes.
        example_images: paths of example images of the window.
        dedup_key: the key used for deduplication and cooldown.
        created_at: ISO time the alert opened.
        updated_at: ISO time of the last change.
        last_window: id of the last window that changed it.
        resolved_at: ISO time it resolved (None while open).
        n_windows: drifted windows seen while open.
    """

    id: str
    line: str
    window: dict[str, Any]
    model_version: str | None
    tests: tuple[str, ...]
    top_axes: tuple[dict[str, Any], ...]
    severity: str
    status: str
    summary: str
    card_paths: tuple[str, ...]
    example_images: tuple[str, ...]
    dedup_key: str
    created_at: str
    updated_at: str
    last_window: str
    resolved_at: str | None = None
    n_windows: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        d = asdict(self)
        for k in ("tests", "top_axes", "card_paths", "example_images"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict`."""
        kw = dict(d)
        for k in ("tests", "card_paths", "example_images"):
            kw[k] = tuple(kw.get(k, ()))
        kw["top_axes"] = tuple(dict(a) for a in kw.get("top_axes", ()))
        return cls(**kw)


@dataclass(frozen=True)
class AlertEvent:
    """Something that happened to an alert in one window.

    Attributes:
        kind: ``"opened"``, ``"escalated"``, ``"resolved"`` or ``"suppressed"``.
        event_id: deterministic id (alert id, kind, window id).
        window_id: the window that caused it.
        created_at: ISO time.
        alert: the alert after the event.
    """

    kind: str
    event_id: str
    window_id: str
    created_at: str
    alert: Alert

    def to_dict(self) -> dict[str, Any]:
        """JSON body sent to the sinks."""
        return {
            "event_id": self.event_id,
            "kind": self.kind,
            "window_id": self.window_id,
            "created_at": self.created_at,
            "alert": self.alert.to_dict(),
        }


@dataclass
class AlertState:
    """Persisted alerting state of one line (``<state_dir>/lines/<line>.json``).

    Attributes:
        line: production line.
        n_windows: windows processed so far (the next window's index).
        consecutive_drift: drifted windows in a row.
        consecutive_clear: clear windows in a row.
        active: the open alert (``Alert.to_dict()``), or None.
        last_sent: per dedup key, ``{"window_index", "at", "alert_id", "kind"}`` of its last opened/resolved event.
        processed: window id -> window index, for idempotency (oldest dropped past ``max_processed``).
        history: one entry per window (``window_id, index, detected, severity, events, at``), bounded.
    """

    line: str
    n_windows: int = 0
    consecutive_drift: int = 0
    consecutive_clear: int = 0
    active: dict[str, Any] | None = None
    last_sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (with a format version)."""
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlertState:
        """Inverse of :meth:`to_dict`."""
        if d.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(
                f"alert state version {d.get('version')} is not supported (expected {STATE_VERSION})"
            )
        kw = {k: v for k, v in d.items() if k != "version"}
        return cls(**kw)


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
        """Log the event."""
        a = event["alert"]
        axes = ", ".join(f"z_{x['axis']} {x['effect']:+.2f} sd" for x in a["top_axes"]) or "no single axis"
        self.logger.log(
            self.level,
            "ALERT %s [%s] line=%s window=%s model=%s tests=%s axes: %s; %s (alert %s)",
            event["kind"].upper(),
            a["severity"],
            a["line"],
            event["window_id"],
            a["model_version"],
            ",".join(a["tests"]),
            axes,
            a["summary"],
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


# ------------------------------------------------------------------------------------------------ manager


def _safe_name(line: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", line)
    return safe if safe == line else f"{safe}-{_digest(line)[:8]}"


class AlertManager:
    """Applies an :class:`AlertPolicy` to drift results, per line, with persisted state, sinks and an outbox.

    Args:
        state_dir: folder of the per-line state files (``lines/``) and, by default, the outbox (``outbox/``).
        policy: the policy (default :class:`AlertPolicy`).
        sinks: where events go (LogSink, JsonlSink, WebhookSink, ...).
        outbox_dir: outbox folder (default ``<state_dir>/outbox``).
        clock: returns the current time (tests inject one).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        policy: AlertPolicy | None = None,
        sinks: Sequence[Sink] = (),
        *,
        outbox_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.lines_dir = self.state_dir / "lines"
        self.lines_dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy or AlertPolicy()
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique (delivery is tracked per name), got {names}")
        self.sinks = list(sinks)
        self.outbox = Outbox(outbox_dir if outbox_dir is not None else self.state_dir / "outbox")
        self.clock = clock

    # ---- state -------------------------------------------------------------------------------------------
    def _state_path(self, line: str) -> Path:
        return self.lines_dir / f"{_safe_name(line)}.json"

    def state(self, line: str) -> AlertState:
        """The persisted state of a line (a fresh one when none exists)."""
        path = self._state_path(line)
        if not path.exists():
            return AlertState(line=line)
        return AlertState.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def active(self, line: str) -> Alert | None:
        """The open alert of a line, if any."""
        a = self.state(line).active
        return None if a is None else Alert.from_dict(a)

    def flush(self) -> FlushReport:
        """Retry delivery of every pending event."""
        return self.outbox.flush(self.sinks)

    # ---- policy ------------------------------------------------------------------------------------------
    def _top_axes(self, attribution: Any) -> list[dict[str, Any]]:
        return [
            {
                "axis": int(a.axis),
                "effect": _jsonable(float(a.effect)),
                "p": _jsonable(float(a.p_adjusted if a.p_adjusted == a.p_adjusted else a.p_value)),
                "description": a.description,
            }
            for a in list(getattr(attribution, "axes", ()))[: self.policy.top_n]
        ]

    def _dedup_key(self, line: str, top_axes: Sequence[Mapping[str, Any]], tests: Sequence[str]) -> str:
        axes = sorted(int(a["axis"]) for a in top_axes[: self.policy.dedup_axes])
        return f"{line}|axes={','.join(map(str, axes)) or '-'}|tests={','.join(sorted(tests)) or '-'}"

    def _in_cooldown(self, last: Mapping[str, Any] | None, index: int, now: datetime) -> bool:
        if last is None:
            return False
        p = self.policy
        if p.cooldown_windows and index - int(last["window_index"]) <= p.cooldown_windows:
            return True
        if p.cooldown_minutes is not None and last.get("at"):
            return (now - _parse_iso(last["at"])).total_seconds() < 60.0 * p.cooldown_minutes
        return False

    def update(
        self,
        line: str,
        window_id: Any,
        drift_result: Any,
        attribution: Any = None,
        *,
        model_version: str | None = None,
        card_paths: Sequence[str | os.PathLike[str]] = (),
        example_images: Sequence[str | os.PathLike[str]] = (),
        window_start: Any = None,
        window_end: Any = None,
    ) -> list[AlertEvent]:
        """Process one window of one line.

        Args:
            line: production line id.
            window_id: the window's id (a string), or a :class:`pipeline.analysis.drift.Window` (id, start and end taken
                from it).
            drift_result: a :class:`pipeline.analysis.drift.DriftResult` (``detected``, ``fired``, ``family_p``,
                ``per_axis``; duck-typed).
            attribution: a :class:`pipeline.analysis.axes.Attribution` (computed from ``drift_result`` when None).
            model_version: model id / registry version that encoded the window.
            card_paths: axis card files to cite in an alert.
            example_images: example image paths of the window.
            window_start: window start (default: from ``window_id`` when it is a Window).
            window_end: window end.

        Returns:
            The events of this window (opened / escalated / resolved / suppressed); ``[]`` when nothing changed or
            the window id was already processed.
        """
        if not isinstance(line, str) or not line:
            raise ValueError("line must be a non-empty string")
        if hasattr(window_id, "window_id"):
            window_start = getattr(window_id, "start", None) if window_start is None else window_start
            window_end = getattr(window_id, "end", None) if window_end is None else window_end
            window_id = window_id.window_id
        window_id = str(window_id)
        if not hasattr(drift_result, "detected"):
            raise ValueError("drift_result must have a 'detected' flag (pipeline.analysis.drift.DriftResult)")

        self.flush()  # earlier events first
        events: list[AlertEvent] = []
        lock = FileLock(str(self._state_path(line)) + ".lock")
        with lock:
            st = self.state(line)
            if window_id in st.processed:
                log.info("alerts: line %s window %s already processed; nothing to do", line, window_id)
                return []
            if attribution is None:
                from pipeline.analysis.axes import attribute

                attribution = attribute(drift_result)
            now = self.clock()
            now_s = _iso(now)
            index = st.n_windows
            st.n_windows += 1
            detected = bool(drift_result.detected)
            severity = None

            if detected:
                st.consecutive_drift += 1
                st.consecutive_clear = 0
                tests = tuple(getattr(drift_result, "fired", ()) or ()) or ("drift",)
                top = self._top_axes(attribution)
                p_values = list(getattr(drift_result, "family_p", {}).values()) + [a["p"] for a in top]
                severity = self.policy.severity(top, p_values)
                key = self._dedup_key(line, top, tests)
                if st.active is None and st.consecutive_drift >= self.policy.k_consecutive:
                    alert = Alert(
                        id=_digest(line, window_id, key),
                        line=line,
                        window={
                            "id": window_id,
                            "start": _jsonable(window_start),
                            "end": _jsonable(window_end),
                        },
                        model_version=model_version,
                        tests=tests,
                        top_axes=tuple(top),
                        severity=severity,
                        status="open",
                        summary=str(getattr(attribution, "text", "")),
                        card_paths=tuple(str(p) for p in card_paths),
                        example_images=tuple(str(p) for p in example_images),
                        dedup_key=key,
                        created_at=now_s,
                        updated_at=now_s,
                        last_window=window_id,
                    )
                    if self._in_cooldown(st.last_sent.get(key), index, now):
                        alert = replace(alert, status="suppressed")
                        events.append(self._event("suppressed", alert, window_id, now_s))
                    else:
                        st.active = alert.to_dict()
                        st.last_sent[key] = {
                            "window_index": index,
                            "at": now_s,
                            "alert_id": alert.id,
                            "kind": "opened",
                        }
                        events.append(self._event("opened", alert, window_id, now_s))
                elif st.active is not None:
                    alert = Alert.from_dict(st.active)
                    alert = replace(
                        alert, n_windows=alert.n_windows + 1, last_window=window_id, updated_at=now_s
                    )
                    if _RANK[severity] > _RANK[alert.severity]:
                        alert = replace(
                            alert,
                            severity=severity,
                            top_axes=tuple(top),
                            tests=tuple(sorted(set(alert.tests) | set(tests))),
                            summary=str(getattr(attribution, "text", alert.summary)),
                            card_paths=tuple(str(p) for p in card_paths) or alert.card_paths,
                            example_images=tuple(str(p) for p in example_images) or alert.example_images,
                        )
                        events.append(self._event("escalated", alert, window_id, now_s))
                    st.active = alert.to_dict()
            else:
                st.consecutive_drift = 0
                st.consecutive_clear += 1
                if st.active is not None and st.consecutive_clear >= self.policy.resolve_after:
                    alert = Alert.from_dict(st.active)
                    alert = replace(
                        alert, status="resolved", resolved_at=now_s, updated_at=now_s, last_window=window_id
                    )
                    st.last_sent[alert.dedup_key] = {
                        "window_index": index,
                        "at": now_s,
                        "alert_id": alert.id,
                        "kind": "resolved",
                    }
                    st.active = None
                    events.append(self._event("resolved", alert, window_id, now_s))

            st.processed[window_id] = index
            while len(st.processed) > self.policy.max_processed:
                st.processed.pop(next(iter(st.processed)))
            st.history.append(
                {
                    "window_id": window_id,
                    "index": index,
                    "detected": detected,
                    "severity": severity,
                    "events": [e.kind for e in events],
                    "alert_ids": [e.alert.id for e in events],
                    "at": now_s,
                }
            )
            del st.history[: max(0, len(st.history) - self.policy.max_history)]
            # Outbox first, then state: a crash in between re-processes the window and re-creates the same event
            # ids, which the outbox ignores.
            for ev in events:
                if ev.kind in _DELIVERED_KINDS:
                    self.outbox.put(ev.to_dict())
                else:
                    log.info(
                        "alert suppressed (cooldown) line=%s window=%s key=%s",
                        line,
                        window_id,
                        ev.alert.dedup_key,
                    )
            _atomic_write_json(self._state_path(line), st.to_dict())
        if any(e.kind in _DELIVERED_KINDS for e in events):
            self.flush()
        return events

    @staticmethod
    def _event(kind: str, alert: Alert, window_id: str, now_s: str) -> AlertEvent:
        return AlertEvent(kind, _digest(alert.id, kind, window_id), window_id, now_s, alert)

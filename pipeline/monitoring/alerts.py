"""Alerting on drifted windows: policy, persisted per-line state, one alert per cause, and delivery.

Flow of one window (:meth:`AlertManager.update`):

1. retry whatever is still in the outbox (:meth:`Outbox.flush`);
2. load the line's state (JSON, one file per line); a window id already processed returns ``[]`` (idempotent, so a
   restart that re-processes a window, or a later model re-testing it, neither re-alerts nor forgets);
3. name the window's causes (:func:`pipeline.monitoring.causes.window_causes`: one per family group that fired, and
   one per significant image-quality channel, e.g. ``axes:z_3``, ``quality:noise_level``, ``scores``) and apply the
   :class:`AlertPolicy` **per alert group** (:func:`pipeline.monitoring.causes.alert_group`: ``latent``,
   ``quality:<channel>``, ``scores``, ``spc``, ``camera``): hysteresis (``k_consecutive`` drifted windows of the group
   in a row before its alert opens; groups still short of it join an alert of an immediate family that opens in the
   same window), one open alert per group (its later drifted windows fold into it; a new cause, such as another top
   axis, or a rise to ``critical`` is an *escalation*, notified), resolution after
   ``resolve_after`` windows in a row without that group's drift, and a cooldown: the same cause re-opening within ``cooldown_windows`` windows (or
   ``cooldown_minutes``) of its last alert is *suppressed*. A window the drift test could not compare with the
   reference (too few cells of a product it knows; ``meta["comparable"]`` False) is recorded but skipped by the
   policy: it neither extends a drifted run, nor breaks it, nor counts towards a resolution;
4. write the deliverable events (opened / escalated / resolved) to the outbox, **then** save the state atomically
   (temp file + ``os.replace``); ids are deterministic, so a crash between the two cannot duplicate an event;
5. deliver the outbox to every sink (:mod:`pipeline.monitoring.delivery`). An event leaves the outbox (moves to
   ``sent/``) only when every sink has taken it; a failing webhook keeps it pending and the next update (or
   :meth:`AlertManager.flush`) retries it.

Operations events (a retrained model not promoted, no candidate trained) go through the same outbox and sinks
(:meth:`AlertManager.notify_ops`).

See ``docs/alerts.md`` for the alert JSON schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.monitoring.delivery import (
    DeliveryError,
    FlushReport,
    JsonlSink,
    LogSink,
    Outbox,
    Sink,
    WebhookSink,
    _atomic_write_json,
)

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
STATE_VERSION = 2


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


# ------------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class AlertPolicy:
    """When to open, escalate, suppress and resolve alerts.

    Every rule applies per line and alert group (``latent``, ``quality:<channel>``, ``scores``, ...;
    :func:`pipeline.monitoring.causes.alert_group`).

    Attributes:
        k_consecutive: windows in a row in which the group fired before its alert opens (hysteresis; 1 = at once).
        resolve_after: windows in a row without the group's drift before its open alert resolves.
        cooldown_windows: after an alert for a cause opened or resolved, the same cause re-opening within this
            many windows is suppressed (0 = no cooldown). With one window a line-day, the default 2 stops an alert
            from re-opening the window after it resolved, and no longer: a suppressed cause is neither notified nor
            under an alert, so a longer cooldown hides a real fault of the same cause days later (and lets the
            nightly learn its windows).
        cooldown_minutes: the same in wall-clock minutes (None = off); either cooldown suppresses.
        critical_effect: |effect| (reference sd) of a top axis at or above which the alert is ``critical``.
        critical_p: a test-family p-value (or a top axis's adjusted p) below which the alert is ``critical``.
        top_n: axes listed in an alert.
        dedup_axes: ignored: alerts are keyed by cause (``"<line>|<cause>"``, the cause naming the top axis);
            accepted so that stored policies naming it still load.
        max_history: windows kept in the state's history.
        max_processed: window ids remembered for idempotency.
        immediate_families: family groups whose alert opens at the first window that fired, whatever
            ``k_consecutive`` says: ``camera`` (the golden-sample check, :mod:`pipeline.monitoring.golden`) is
            already calibrated to one false alarm in 500 shifts, and its point is to say so in the first shift;
            ``scores`` ("defect rate up": more unusual cells than the lot-to-lot variation explains) is scrap the
            line makes while the alert waits, and a surge of defective cells does not always show in two windows
            in a row; ``spc`` (the line's control chart, :mod:`pipeline.monitoring.charts`) has already weighed
            the windows before its alarm against its in-control average run length, so a second window would count
            the same evidence twice, and a chart alarm that comes on a fault's last day would never open.
    """

    k_consecutive: int = 2
    resolve_after: int = 2
    cooldown_windows: int = 2
    cooldown_minutes: float | None = None
    critical_effect: float = 2.0
    critical_p: float = 1e-6
    top_n: int = 3
    dedup_axes: int = 1
    max_history: int = 500
    max_processed: int = 10_000
    immediate_families: tuple[str, ...] = ("camera", "scores", "spc")

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

    One alert per line and alert group (``latent``, ``quality:<channel>``, ``scores``, ...;
    :func:`pipeline.monitoring.causes.alert_group`) can be open at a time, so a defect surge while a camera alert is
    open is its own alert with its own notification, and so is darker corners while a blur alert is open.

    Attributes:
        id: stable id (line, opening window and dedup key).
        line: production line.
        window: the window that opened it: ``{"id", "start", "end"}``.
        model_version: model that encoded the window.
        tests: test families that fired (``"axes"``, ``"mmd"``, ``"scores"``, ``"quality"``).
        top_axes: ``[{"axis", "effect", "p", "description"}]``, largest |effect| first (latent alerts).
        severity: ``"warning"`` or ``"critical"``.
        status: ``"open"``, ``"resolved"`` or ``"suppressed"``.
        summary: one line on the cause (e.g. ``"anomaly scores up: 23% of the window's cells ..."``).
        card_paths: pictures of the window: axis cards (PNG/JSON) of the top axes and, on a control-chart alarm, the
            chart (latent and ``spc`` alerts; other families cite none).
        example_images: paths of example images of the window (highest anomaly scores first).
        dedup_key: the key used for deduplication and cooldown (``"<line>|<cause>"``).
        created_at: ISO time the alert opened.
        updated_at: ISO time of the last change.
        last_window: id of the last window that changed it.
        resolved_at: ISO time it resolved (None while open).
        n_windows: drifted windows seen while open.
        family: the family group (``"latent"``, ``"quality"``, ``"scores"``, ...).
        cause: the cause that opened it (``"axes:z_3"``, ``"mmd"``, ``"quality:noise_level"``, ``"scores"``).
        causes: every cause seen while open, in order (a new one escalates the alert).
        example_serials: MES serials of the example images (same order), what a person finds on the line.
        details: the whole window's attribution line (every family that fired, and the product mix when it moved).
        heatmaps: heatmap overlays (PNG) of the window's top flagged cells, highest anomaly score first: where on
            the cell each is unusual (``pipeline.monitoring.heatmaps``; every family cites them; empty when the
            monitor's heatmaps are off or could not be drawn).
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
    family: str = "latent"
    cause: str = ""
    causes: tuple[str, ...] = ()
    example_serials: tuple[str, ...] = ()
    details: str = ""
    heatmaps: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        d = asdict(self)
        for k in _TUPLE_FIELDS:
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict` (an alert written before causes existed gets them from its tests)."""
        kw = dict(d)
        for k in _TUPLE_FIELDS:
            if k != "top_axes":
                kw[k] = tuple(kw.get(k, ()))
        kw["top_axes"] = tuple(dict(a) for a in kw.get("top_axes", ()))
        if not kw.get("cause"):
            kw["family"] = _legacy_family(kw["tests"])
            kw["cause"] = kw["family"]
        if not kw["causes"]:
            kw["causes"] = (kw["cause"],)
        return cls(**kw)


_TUPLE_FIELDS = ("tests", "top_axes", "card_paths", "example_images", "causes", "example_serials", "heatmaps")


# families whose alerts cite the window's pictures (axis cards, control chart)
_PICTURED_FAMILIES = frozenset({"latent", "spc"})


def _legacy_family(tests: Sequence[str]) -> str:
    """The family group of an alert from before per-cause alerts (its first fired test decides)."""
    from pipeline.monitoring.causes import family_group

    return family_group(tests[0]) if tests else "drift"


@dataclass(frozen=True)
class AlertEvent:
    """Something that happened to an alert in one window.

    Attributes:
        kind: ``"opened"``, ``"escalated"``, ``"resolved"`` or ``"suppressed"``.
        event_id: deterministic id (alert id, kind, window id).
        window_id: the window that caused it.
        created_at: ISO time.
        alert: the alert after the event.
        reason: why, in words (``"new cause scores"``, ``"severity warning -> critical"``, ``"2 clear windows"``).
    """

    kind: str
    event_id: str
    window_id: str
    created_at: str
    alert: Alert
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON body sent to the sinks."""
        return {
            "event_id": self.event_id,
            "kind": self.kind,
            "window_id": self.window_id,
            "created_at": self.created_at,
            "reason": self.reason,
            "alert": self.alert.to_dict(),
        }


@dataclass
class AlertState:
    """Persisted alerting state of one line (``<state_dir>/lines/<line>.json``).

    Attributes:
        line: production line.
        n_windows: windows processed so far (the next window's index).
        counters: per alert group, ``{"drift": drifted windows in a row, "clear": clear windows in a row}``.
        open: per alert group, its open alert (``Alert.to_dict()``).
        last_sent: per dedup key, ``{"window_index", "at", "alert_id", "kind"}`` of its last opened/resolved event.
        processed: window id -> window index, for idempotency (oldest dropped past ``max_processed``).
        history: one entry per window (``window_id, index, detected, causes, events, at``), bounded.
    """

    line: str
    n_windows: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    open: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (with a format version)."""
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlertState:
        """Inverse of :meth:`to_dict`; a version-1 state (one alert per line) is migrated."""
        version = d.get("version", STATE_VERSION)
        if version == 1:
            return cls._from_v1(d)
        if version != STATE_VERSION:
            raise ValueError(
                f"alert state version {d.get('version')} is not supported (expected {STATE_VERSION})"
            )
        kw = {k: v for k, v in d.items() if k != "version"}
        return _per_channel_groups(cls(**kw))

    @classmethod
    def _from_v1(cls, d: Mapping[str, Any]) -> AlertState:
        """A version-1 state: its one open alert and line-wide counters go to the alert's family group."""
        active = d.get("active")
        group = _legacy_family(tuple(active.get("tests", ()))) if active else "latent"
        st = cls(line=d["line"], n_windows=int(d.get("n_windows", 0)), last_sent=dict(d.get("last_sent", {})),
                 processed=dict(d.get("processed", {})), history=list(d.get("history", [])))
        st.counters[group] = {"drift": int(d.get("consecutive_drift", 0)), "clear": int(d.get("consecutive_clear", 0))}
        if active:
            st.open[group] = Alert.from_dict(active).to_dict()
        return st


def _credit_open_alerts(st: AlertState, causes: Sequence[Any]) -> dict[str, Any]:
    """The window's causes by alert group; a cause held by an open alert of another group is credited to that alert.

    A per-channel cause (one image-quality channel) is held by its key; any other cause by its group (a latent alert
    names whichever axis moves most, so any latent cause counts for the alert that holds the latent group).
    """
    from pipeline.monitoring.causes import alert_group, key_group

    by_key = {key: g for g, a in st.open.items() for key in a.get("causes", ())}
    by_group = {key_group(key): g for g, a in st.open.items() for key in a.get("causes", ()) if key_group(key) != key}
    fired: dict[str, Any] = {}
    credited: list[tuple[str, Any]] = []
    for c in causes:
        g = alert_group(c)
        holder = None if g in st.open else by_key.get(c.key, by_group.get(g))
        if holder is None or holder == g:
            fired.setdefault(g, c)
        else:
            st.counters.pop(g, None)
            credited.append((holder, c))
    for holder, c in credited:  # the holder's own cause, when it fired too, speaks for it
        fired.setdefault(holder, c)
    return fired


def _per_channel_groups(st: AlertState) -> AlertState:
    """A state saved when image quality was one alert group: its open alert is kept under its channel's group."""
    from pipeline.monitoring.causes import PER_CHANNEL_FAMILIES

    for family in PER_CHANNEL_FAMILIES:
        counter, alert = st.counters.pop(family, None), st.open.pop(family, None)
        if alert is not None:
            group = str(alert.get("cause") or family)
            st.open[group] = alert
            st.counters[group] = counter or {"drift": 0, "clear": 0}
    return st


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

    def open_alerts(self, line: str) -> list[Alert]:
        """The open alerts of a line (one per alert group), oldest first."""
        alerts = [Alert.from_dict(a) for a in self.state(line).open.values()]
        return sorted(alerts, key=lambda a: (a.created_at, a.id))

    def active(self, line: str) -> Alert | None:
        """The most recently changed open alert of a line, if any (:meth:`open_alerts` lists them all)."""
        alerts = self.open_alerts(line)
        return max(alerts, key=lambda a: (a.updated_at, a.created_at)) if alerts else None

    def flush(self) -> FlushReport:
        """Retry delivery of every pending event."""
        return self.outbox.flush(self.sinks)

    def notify_ops(self, kind: str, message: str, *, key: str, **payload: Any) -> dict[str, Any]:
        """Send an operations event (e.g. a model not promoted) through the outbox and every sink.

        Args:
            kind: what happened, e.g. ``"model.not_promoted"`` or ``"model.no_candidate"``.
            message: one line for people.
            key: what makes the event unique (e.g. the model version): the same kind and key are sent once.
            **payload: JSON-safe details, sent under ``ops``.

        Returns:
            The event (``{"event_id", "kind": "ops", "window_id": None, "created_at", "ops": {...}}``).
        """
        now_s = _iso(self.clock())
        ops = {"type": kind, "message": message, **{k: _plain(v) for k, v in payload.items()}}
        event = {"event_id": _digest("ops", kind, key), "kind": "ops", "window_id": None, "created_at": now_s,
                 "ops": ops}
        self.outbox.put(event)
        self.flush()
        return event

    # ---- policy ------------------------------------------------------------------------------------------
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
        self, line: str, window_id: Any, drift_result: Any, attribution: Any = None, *,
        model_version: str | None = None, card_paths: Sequence[str | os.PathLike[str]] = (),
        example_images: Sequence[str | os.PathLike[str]] = (), example_serials: Sequence[str] = (),
        window_start: Any = None, window_end: Any = None, heatmaps: Sequence[str | os.PathLike[str]] = (),
    ) -> list[AlertEvent]:
        """Process one window of one line.

        Args:
            line: production line id.
            window_id: the window's id (a string), or a :class:`pipeline.analysis.drift.Window` (id, start and end taken
                from it).
            drift_result: a :class:`pipeline.analysis.drift.DriftResult` (``detected``, ``fired``, ``family_p``,
                ``per_axis``; duck-typed).
            attribution: the window's :class:`pipeline.analysis.axes.Attribution` (``attribute(drift_result,
                cards)``): its text becomes the alert's ``details``, its axes the latent cause's top axes.
                Required for a detected window; None is allowed for a window that did not drift.
            model_version: model id / registry version that encoded the window.
            card_paths: axis card files to cite in an alert.
            example_images: example image paths of the window.
            example_serials: the MES serials of the example images (same order).
            window_start: window start (default: from ``window_id`` when it is a Window).
            window_end: window end.
            heatmaps: heatmap overlays of the window's top flagged cells, cited by an alert it opens or escalates.

        Returns:
            The events of this window (opened / escalated / resolved / suppressed); ``[]`` when nothing changed or
            the window id was already processed.

        Raises:
            ValueError: an empty ``line``, a ``drift_result`` without a ``detected`` flag, or a detected window
                without its ``attribution``.
        """
        if not isinstance(line, str) or not line:
            raise ValueError("line must be a non-empty string")
        if not hasattr(drift_result, "detected"):
            raise ValueError("drift_result must have a 'detected' flag (pipeline.analysis.drift.DriftResult)")
        if attribution is None and bool(drift_result.detected):
            raise ValueError("a detected window needs its attribution: pass attribution="
                             "pipeline.analysis.axes.attribute(drift_result, cards)")
        self.flush()  # earlier events first
        with FileLock(str(self._state_path(line)) + ".lock"):
            st = self.state(line)
            ctx = self._context(st, line, window_id, window_start, window_end, model_version, card_paths,
                                example_images, example_serials)
            if ctx.window_id in st.processed:
                log.info("alerts: line %s window %s already processed; nothing to do", line, ctx.window_id)
                return []
            from pipeline.monitoring.causes import window_causes

            ctx = replace(ctx, details=str(getattr(attribution, "text", "")), heatmaps=tuple(str(p) for p in heatmaps))
            st.n_windows += 1
            causes = window_causes(drift_result, attribution, top_n=self.policy.top_n)
            tested = _was_tested(drift_result)
            events = self._apply_policy(st, causes, ctx) if tested else []
            self._record(st, ctx, bool(drift_result.detected), causes, events, untested=not tested)
            self._persist(st, events)
        if any(e.kind in _DELIVERED_KINDS for e in events):
            self.flush()
        return events

    def _context(self, st: AlertState, line: str, window_id: Any, window_start: Any, window_end: Any,
                 model_version: str | None, card_paths: Sequence[Any], example_images: Sequence[Any],
                 example_serials: Sequence[str]) -> _Window:
        """What :meth:`update` knows about the window (a ``Window`` object gives its id, start and end)."""
        if hasattr(window_id, "window_id"):
            window_start = getattr(window_id, "start", None) if window_start is None else window_start
            window_end = getattr(window_id, "end", None) if window_end is None else window_end
            window_id = window_id.window_id
        window_id = str(window_id)
        now = self.clock()
        return _Window(line=line, window_id=window_id, index=st.n_windows, now=now, now_s=_iso(now),
                       model_version=model_version,
                       bounds={"id": window_id, "start": _jsonable(window_start), "end": _jsonable(window_end)},
                       card_paths=tuple(str(p) for p in card_paths),
                       example_images=tuple(str(p) for p in example_images),
                       example_serials=tuple(str(s) for s in example_serials), details="")

    def _apply_policy(self, st: AlertState, causes: Sequence[Any], ctx: _Window) -> list[AlertEvent]:
        """Advance every alert group's counters by one window and return the events (groups in a fixed order).

        Causes that an open alert already holds count for that alert; the other channels of its family, and groups
        short of their own hysteresis, that fire in the window an alert opens join it (one fault that moves several
        channels or families is one alert).
        """
        from pipeline.monitoring.causes import group_rank

        fired = _credit_open_alerts(st, causes)
        groups = set(st.counters) | set(st.open) | set(fired)
        events: list[AlertEvent] = []
        joined: set[str] = set()
        counted: set[str] = set()
        for g in sorted(groups, key=group_rank):
            if g in joined:
                continue
            counted.add(g)
            counter = st.counters.setdefault(g, {"drift": 0, "clear": 0})
            cause = fired.get(g)
            if cause is not None:
                counter["drift"], counter["clear"] = counter["drift"] + 1, 0
                new = self._on_drift(st, g, cause, ctx)
                if any(e.kind == "opened" for e in new):
                    mates = self._join_companions(st, g, fired, joined, counted)
                    joined |= mates
                    if mates:  # the notification names the whole alert
                        alert = Alert.from_dict(st.open[g])
                        new = [replace(e, alert=alert, reason=f"{e.reason}; with {', '.join(sorted(mates))}")
                               if e.kind == "opened" else e for e in new]
                events += new
            else:
                counter["drift"], counter["clear"] = 0, counter["clear"] + 1
                events += self._on_clear(st, g, ctx)
            if g not in st.open and counter["drift"] == 0 and counter["clear"] >= self.policy.resolve_after:
                del st.counters[g]  # quiet and settled: nothing to remember
        return events

    def _join_companions(self, st: AlertState, group: str, fired: Mapping[str, Any], joined: set[str],
                         counted: set[str]) -> set[str]:
        """Fold into a just-opened alert the window's other fired groups it speaks for; returns the groups folded.

        Those are the other channels of its per-channel family and, when it is of an immediate family (one that
        opens at its first window), any group that fired but is still short of its own hysteresis: a camera gain
        drop raises the anomaly scores, whose alert opens at once, and moves a latent axis, which would wait for a
        second window. One fault seen by several families is then one alert, named by all of them. Groups in
        ``counted`` have had this window added to their counters already.
        """
        from pipeline.monitoring.causes import PER_CHANNEL_FAMILIES

        alert = Alert.from_dict(st.open[group])
        early = alert.family in self.policy.immediate_families
        mates = [h for h, c in fired.items() if h != group and h not in st.open and h not in joined
                 and ((alert.family in PER_CHANNEL_FAMILIES and c.family == alert.family)
                      or (early and self._short_of_hysteresis(st, h, c, counted=h in counted)))]
        for h in mates:
            st.counters.pop(h, None)
            alert = replace(alert, causes=(*alert.causes, fired[h].key),
                            tests=tuple(dict.fromkeys((*alert.tests, *(fired[h].tests or (fired[h].family,))))),
                            summary=f"{alert.summary}; with {fired[h].summary.removeprefix('image quality: ')}")
        st.open[group] = alert.to_dict()
        return set(mates)

    def _need(self, cause: Any) -> int:
        """Windows in a row a cause's group must fire before its alert opens."""
        return 1 if cause.family in self.policy.immediate_families else self.policy.k_consecutive

    def _short_of_hysteresis(self, st: AlertState, group: str, cause: Any, *, counted: bool) -> bool:
        """True when ``group`` firing in this window does not yet open its own alert."""
        drift = st.counters.get(group, {}).get("drift", 0) + (0 if counted else 1)
        return drift < self._need(cause)

    def _on_drift(self, st: AlertState, group: str, cause: Any, ctx: _Window) -> list[AlertEvent]:
        """A window in which ``group`` fired: open (after hysteresis), fold into the open alert, or escalate."""
        severity = self.policy.severity(
            [{"effect": e} for e in cause.effects], cause.p_values)
        if group not in st.open:
            if st.counters[group]["drift"] < self._need(cause):
                return []
            alert = self._new_alert(cause, severity, ctx)
            if self._in_cooldown(st.last_sent.get(alert.dedup_key), ctx.index, ctx.now):
                alert = replace(alert, status="suppressed")
                return [self._event("suppressed", alert, ctx, f"{cause.key} is in its cooldown")]
            st.open[group] = alert.to_dict()
            st.last_sent[alert.dedup_key] = {"window_index": ctx.index, "at": ctx.now_s, "alert_id": alert.id,
                                             "kind": "opened"}
            return [self._event("opened", alert, ctx, f"{cause.key}: {cause.summary}")]
        alert = Alert.from_dict(st.open[group])
        alert = replace(alert, n_windows=alert.n_windows + 1, last_window=ctx.window_id, updated_at=ctx.now_s,
                        tests=tuple(dict.fromkeys((*alert.tests, *cause.tests))))
        changes = []
        if cause.key not in alert.causes:
            changes.append(f"new cause {cause.key}: {cause.summary}")
            alert = replace(alert, causes=(*alert.causes, cause.key), summary=f"{alert.summary}; then {cause.summary}")
        if _RANK[severity] > _RANK[alert.severity]:
            changes.append(f"severity {alert.severity} -> {severity}")
            alert = replace(alert, severity=severity, top_axes=cause.top_axes or alert.top_axes,
                            card_paths=ctx.card_paths or alert.card_paths)
        if changes:
            alert = replace(alert, example_images=ctx.example_images or alert.example_images,
                            heatmaps=ctx.heatmaps or alert.heatmaps,
                            example_serials=ctx.example_serials or alert.example_serials, details=ctx.details)
        st.open[group] = alert.to_dict()
        return [self._event("escalated", alert, ctx, "; ".join(changes))] if changes else []

    def _on_clear(self, st: AlertState, group: str, ctx: _Window) -> list[AlertEvent]:
        """A window in which ``group`` did not fire: resolve its open alert after ``resolve_after`` in a row."""
        clear = st.counters[group]["clear"]
        if group not in st.open or clear < self.policy.resolve_after:
            return []
        alert = Alert.from_dict(st.open.pop(group))
        alert = replace(alert, status="resolved", resolved_at=ctx.now_s, updated_at=ctx.now_s,
                        last_window=ctx.window_id)
        st.last_sent[alert.dedup_key] = {"window_index": ctx.index, "at": ctx.now_s, "alert_id": alert.id,
                                         "kind": "resolved"}
        return [self._event("resolved", alert, ctx, f"{clear} windows in a row without {group} drift")]

    def _new_alert(self, cause: Any, severity: str, ctx: _Window) -> Alert:
        key = f"{ctx.line}|{cause.key}"
        return Alert(
            id=_digest(ctx.line, ctx.window_id, key), line=ctx.line, window=dict(ctx.bounds),
            model_version=ctx.model_version, tests=cause.tests or (cause.family,), top_axes=cause.top_axes,
            severity=severity, status="open", summary=cause.summary,
            card_paths=ctx.card_paths if cause.family in _PICTURED_FAMILIES else (), example_images=ctx.example_images,
            dedup_key=key, created_at=ctx.now_s, updated_at=ctx.now_s, last_window=ctx.window_id,
            family=cause.family, cause=cause.key, causes=(cause.key,), example_serials=ctx.example_serials,
            details=ctx.details, heatmaps=ctx.heatmaps,
        )

    def _record(self, st: AlertState, ctx: _Window, detected: bool, causes: Sequence[Any],
                events: Sequence[AlertEvent], *, untested: bool = False) -> None:
        """Remember the window (idempotency) and append it to the bounded history (``untested`` marked)."""
        st.processed[ctx.window_id] = ctx.index
        while len(st.processed) > self.policy.max_processed:
            st.processed.pop(next(iter(st.processed)))
        st.history.append({
            "window_id": ctx.window_id, "index": ctx.index, "detected": detected,
            "causes": [c.key for c in causes], "events": [e.kind for e in events],
            "alert_ids": [e.alert.id for e in events], "at": ctx.now_s, **({"untested": True} if untested else {}),
        })
        del st.history[: max(0, len(st.history) - self.policy.max_history)]

    def _persist(self, st: AlertState, events: Sequence[AlertEvent]) -> None:
        """Queue the deliverable events, then save the state.

        Outbox first, then state: a crash in between re-processes the window and re-creates the same event ids,
        which the outbox ignores.
        """
        for ev in events:
            if ev.kind in _DELIVERED_KINDS:
                self.outbox.put(ev.to_dict())
            else:
                log.info("alert suppressed (cooldown) line=%s window=%s key=%s", st.line, ev.window_id,
                         ev.alert.dedup_key)
        _atomic_write_json(self._state_path(st.line), st.to_dict())

    @staticmethod
    def _event(kind: str, alert: Alert, ctx: _Window, reason: str = "") -> AlertEvent:
        return AlertEvent(kind, _digest(alert.id, kind, ctx.window_id), ctx.window_id, ctx.now_s, alert, reason)


@dataclass(frozen=True)
class _Window:
    """What :meth:`AlertManager.update` knows about the window it processes."""

    line: str
    window_id: str
    index: int
    now: datetime
    now_s: str
    model_version: str | None
    bounds: dict[str, Any]
    card_paths: tuple[str, ...]
    example_images: tuple[str, ...]
    example_serials: tuple[str, ...]
    details: str
    heatmaps: tuple[str, ...] = ()


def _was_tested(drift_result: Any) -> bool:
    """False for a window the drift test could not compare with the reference (``meta["comparable"]`` False).

    Such a window (too few cells of a product the reference knows) says nothing about a fault: it neither counts
    towards an alert's hysteresis nor towards its resolution, so the policy skips it.
    """
    meta = getattr(drift_result, "meta", None) or {}
    return bool(meta.get("comparable", True)) if isinstance(meta, Mapping) else True


def _plain(v: Any) -> Any:
    """A JSON-safe copy of ``v`` (dataclasses and mappings recursively, timestamps as ISO strings)."""
    if hasattr(v, "__dataclass_fields__"):
        v = asdict(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return _jsonable(v)

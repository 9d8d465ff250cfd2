"""Alert policy (hysteresis, dedup, escalation, cooldown, resolution), persistence, sinks, outbox, webhook."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.axes import attribute
from pipeline.monitoring import alerts as AL


@dataclass(frozen=True)
class FakeDrift:
    detected: bool
    per_axis: pd.DataFrame
    fired: tuple[str, ...] = ()
    family_p: dict = field(default_factory=dict)


def drift(axis: int = 3, effect: float = -1.5, d: int = 6, p: float = 1e-4) -> FakeDrift:
    eff = np.zeros(d)
    eff[axis] = effect
    sig = np.zeros(d, bool)
    sig[axis] = True
    table = pd.DataFrame(
        {
            "axis": np.arange(d),
            "ks_stat": np.abs(eff) / 3,
            "p_value": np.where(sig, p / 10, 0.6),
            "p_adjusted": np.where(sig, p, 0.9),
            "effect_size": eff,
            "psi": 0.0,
            "psi_band": "stable",
            "significant": sig,
            "rank": np.arange(d),
        }
    )
    return FakeDrift(True, table, ("axes",), {"axes": p})


def clear(d: int = 6) -> FakeDrift:
    t = drift(d=d).per_axis.assign(effect_size=0.0, significant=False, p_adjusted=0.9)
    return FakeDrift(False, t, (), {"axes": 0.9})


def manager(tmp_path: Path, sinks=None, **policy) -> AL.AlertManager:
    sinks = [AL.JsonlSink(tmp_path / "alerts.jsonl")] if sinks is None else sinks
    return AL.AlertManager(tmp_path / "state", AL.AlertPolicy(**policy), sinks)


def att(r: FakeDrift):
    """The attribution the monitor hands the alert manager with a window (None for one that did not drift)."""
    return attribute(r) if r.detected else None


def run(m: AL.AlertManager, windows: list[FakeDrift], start: int = 0, line: str = "L1") -> list[list[str]]:
    """Feed windows w<start>.. and return the event kinds per window."""
    return [
        [e.kind for e in m.update(line, f"w{start + i}", r, att(r), model_version="m1")]
        for i, r in enumerate(windows)
    ]


def jsonl(tmp_path: Path) -> list[dict]:
    p = tmp_path / "alerts.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


# ------------------------------------------------------------------------------------------------ policy


def test_hysteresis_needs_k_consecutive_drifted_windows(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=3)
    kinds = run(m, [drift(), drift(), clear(), drift(), drift(), drift()])
    assert kinds == [[], [], [], [], [], ["opened"]]  # the clear window reset the count
    assert [e["kind"] for e in jsonl(tmp_path)] == ["opened"]


def test_open_alert_deduplicates_then_resolves(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=2, resolve_after=2)
    kinds = run(m, [drift(), drift(), drift(), drift(), clear(), drift(), clear(), clear(), clear()])
    assert kinds == [[], ["opened"], [], [], [], [], [], ["resolved"], []]
    sent = jsonl(tmp_path)
    assert [e["kind"] for e in sent] == ["opened", "resolved"]
    assert sent[0]["alert"]["id"] == sent[1]["alert"]["id"]
    assert sent[1]["alert"]["status"] == "resolved" and sent[1]["alert"]["n_windows"] == 4
    assert m.active("L1") is None


def untested(d: int = 6) -> object:
    """A window with too few cells of a product the reference knows: not tested (``meta["comparable"] = False``)."""
    from types import SimpleNamespace

    return SimpleNamespace(**vars(clear(d)), meta={"comparable": False}, n_untested=120)


def test_an_untested_window_neither_resolves_nor_breaks_the_run(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=2, resolve_after=2)
    # a drifted window, an untested one, a drifted one: two drifted windows in a row as far as anyone can tell
    assert run(m, [drift(), untested(), drift()]) == [[], [], ["opened"]]
    # two untested windows say nothing about the fault: the alert stays open until two tested clear windows
    assert run(m, [untested(), untested(), clear(), clear()], start=3) == [[], [], [], ["resolved"]]
    hist = m.state("L1").history
    assert [h["window_id"] for h in hist if h.get("untested")] == ["w1", "w3", "w4"]
    assert m.update("L1", "w4", untested()) == []  # processed once, like any window


def test_escalation_to_critical_happens_once(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=1)
    kinds = run(m, [drift(effect=1.2), drift(effect=1.3), drift(effect=2.6), drift(effect=3.0)])
    assert kinds == [["opened"], [], ["escalated"], []]
    a = m.active("L1")
    assert a is not None and a.severity == "critical" and a.top_axes[0]["effect"] == pytest.approx(2.6)


def test_severity_rules() -> None:
    pol = AL.AlertPolicy()
    assert pol.severity([{"effect": -2.1}], [0.01]) == "critical"
    assert pol.severity([{"effect": 0.5}], [1e-7]) == "critical"
    assert pol.severity([{"effect": 1.9}], [1e-3]) == "warning"
    assert pol.severity([], []) == "warning"
    with pytest.raises(ValueError, match="k_consecutive"):
        AL.AlertPolicy(k_consecutive=0)
    assert AL.get_policy("sensitive").k_consecutive == 1
    with pytest.raises(ValueError, match="unknown alert policy"):
        AL.get_policy("loud")


def test_cooldown_suppresses_the_same_drift_but_not_a_new_one(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=1, resolve_after=1, cooldown_windows=4)
    kinds = run(m, [drift(), clear(), drift(), drift(), clear(), clear(), clear(), drift()])
    # w0 opens, w1 resolves, w2/w3 are the same drift inside the cooldown, w7 is past it
    assert kinds == [["opened"], ["resolved"], ["suppressed"], ["suppressed"], [], [], [], ["opened"]]
    assert [e["kind"] for e in jsonl(tmp_path)] == ["opened", "resolved", "opened"]  # suppressed never sent
    # another axis is another drift: not suppressed by axis 3's cooldown
    kinds = run(m, [clear(), drift(axis=1)], start=8)
    assert kinds == [["resolved"], ["opened"]]
    hist = m.state("L1").history
    assert [h["events"] for h in hist][2] == ["suppressed"] and len(hist) == 10


def test_cooldown_in_minutes(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    t = [datetime(2026, 1, 1, tzinfo=UTC)]
    m = AL.AlertManager(
        tmp_path / "s",
        AL.AlertPolicy(k_consecutive=1, resolve_after=1, cooldown_windows=0, cooldown_minutes=30),
        [],
        clock=lambda: t[0],
    )
    assert run(m, [drift(), clear()]) == [["opened"], ["resolved"]]
    t[0] += timedelta(minutes=10)
    assert run(m, [drift()], start=2) == [["suppressed"]]
    t[0] += timedelta(minutes=31)
    assert run(m, [drift()], start=3) == [["opened"]]


def test_lines_are_independent(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=2)
    assert run(m, [drift()], line="A") == [[]]
    assert run(m, [drift()], line="B/2") == [[]]  # a line name that is not a file name
    assert run(m, [drift()], start=1, line="A") == [["opened"]]
    assert m.active("B/2") is None and m.active("A") is not None


# ------------------------------------------------------------------------------------------------ persistence


def test_restart_neither_realerts_nor_forgets(tmp_path: Path) -> None:
    m1 = manager(tmp_path, k_consecutive=2, resolve_after=2)
    assert run(m1, [drift(), drift()]) == [[], ["opened"]]
    m2 = manager(tmp_path, k_consecutive=2, resolve_after=2)  # a restart: same state dir
    assert m2.active("L1") is not None
    assert run(m2, [drift(), drift()], start=2) == [[], []]  # still the same open alert
    assert m2.update("L1", "w1", drift(), att(drift())) == []  # re-processing an old window is a no-op
    assert run(m2, [clear(), clear()], start=4) == [[], ["resolved"]]
    assert [e["kind"] for e in jsonl(tmp_path)] == ["opened", "resolved"]
    # hysteresis counters survive a restart too
    m3 = manager(tmp_path, k_consecutive=2, resolve_after=2)
    assert run(m3, [drift()], start=6) == [[]]
    m4 = manager(tmp_path, k_consecutive=2, resolve_after=2, cooldown_windows=0)
    assert run(m4, [drift()], start=7) == [["opened"]]


def test_a_detected_window_needs_its_attribution(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=1)
    with pytest.raises(ValueError, match="detected window needs its attribution"):
        m.update("L1", "w0", drift())
    assert m.state("L1").n_windows == 0 and jsonl(tmp_path) == []  # refused before anything was recorded
    assert m.update("L1", "w0", clear()) == []  # a window that did not drift needs none
    (ev,) = m.update("L1", "w1", drift(), att(drift()))
    assert ev.kind == "opened" and ev.alert.details.startswith("axis 3 moved by")


def test_reprocessing_a_window_is_idempotent(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=1)
    first = m.update("L1", "2026-11-27/S1", drift(), att(drift()))
    assert [e.kind for e in first] == ["opened"]
    before = m.state("L1")
    assert m.update("L1", "2026-11-27/S1", drift(), att(drift())) == []
    assert m.update("L1", "2026-11-27/S1", clear()) == []
    after = m.state("L1")
    assert after.n_windows == before.n_windows == 1 and after.open == before.open
    assert len(jsonl(tmp_path)) == 1


def test_crash_between_outbox_and_state_does_not_duplicate(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=1)
    run(m, [clear()])
    state_file = next((tmp_path / "state" / "lines").glob("*.json"))
    backup = state_file.read_bytes()
    run(m, [drift()], start=1)
    state_file.write_bytes(backup)  # as if the process died after the outbox write, before the state write
    m2 = manager(tmp_path, k_consecutive=1)
    assert run(m2, [drift()], start=1) == [["opened"]]  # re-derived, same deterministic event id
    assert len(jsonl(tmp_path)) == 1 and len(m2.outbox.sent()) == 1


def test_alert_record_contents(tmp_path: Path) -> None:
    from pipeline.analysis.drift import Window

    m = manager(tmp_path, k_consecutive=1)
    res = drift(axis=2, effect=-2.4)
    att = attribute(res, cards={2: "axis 2: brightness (r = 0.94)"})
    win = Window(
        "2026-11-27/S2", pd.Timestamp("2026-11-27 14:00"), pd.Timestamp("2026-11-27 22:00"), pd.DataFrame()
    )
    (ev,) = m.update(
        "line-7",
        win,
        res,
        att,
        model_version="abc123",
        card_paths=[tmp_path / "axis_02.png"],
        example_images=["/data/img1.png"],
    )
    d = ev.to_dict()
    assert set(d) == {"event_id", "kind", "window_id", "created_at", "reason", "alert"}
    a = d["alert"]
    assert a["line"] == "line-7" and a["model_version"] == "abc123" and a["status"] == "open"
    assert a["window"] == {
        "id": "2026-11-27/S2",
        "start": "2026-11-27T14:00:00",
        "end": "2026-11-27T22:00:00",
    }
    assert a["tests"] == ["axes"] and a["severity"] == "critical"
    assert a["top_axes"] == [
        {"axis": 2, "effect": -2.4, "p": 1e-4, "description": "axis 2: brightness (r = 0.94)"}
    ]
    assert a["card_paths"] == [str(tmp_path / "axis_02.png")] and a["example_images"] == ["/data/img1.png"]
    assert "axis 2" in a["summary"] and a["created_at"].endswith("Z")
    assert AL.Alert.from_dict(a) == ev.alert
    assert json.loads(json.dumps(d)) == d == jsonl(tmp_path)[0]


def test_log_sink_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = manager(tmp_path, sinks=[AL.LogSink()], k_consecutive=1)
    with caplog.at_level("WARNING", logger="pipeline.monitoring.alerts"):
        run(m, [drift()])
    assert any("ALERT OPENED [warning] line=L1 window=w0" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ webhook


class _Server:
    """A local HTTP endpoint that answers 500 to the first ``fail_first`` POSTs, then 200."""

    def __init__(self, port: int = 0, fail_first: int = 0) -> None:
        self.bodies: list[dict] = []
        self.hits = 0
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.hits += 1
                if outer.hits <= outer.fail_first:
                    self.send_response(500)
                else:
                    outer.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server(fail_first=2)
    yield s
    s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webhook_retries_past_two_failures(tmp_path: Path, server: _Server) -> None:
    sleeps: list[float] = []
    hook = AL.WebhookSink(server.url, timeout=2, retries=3, backoff=0.5, sleep=sleeps.append)
    m = manager(tmp_path, sinks=[hook, AL.JsonlSink(tmp_path / "alerts.jsonl")], k_consecutive=1)
    (ev,) = m.update("L1", "w0", drift(), att(drift()), model_version="m1")
    assert server.hits == 3 and sleeps == [0.5, 1.0]  # two failures, exponential backoff, then delivered
    assert server.bodies == [ev.to_dict()]
    assert m.outbox.pending() == [] and len(m.outbox.sent()) == 1


def test_webhook_gives_up_after_retries(server: _Server) -> None:
    hook = AL.WebhookSink(server.url, retries=1, backoff=0.0)
    with pytest.raises(AL.DeliveryError, match="2 attempts: HTTP 500"):
        hook.send({"event_id": "x"})
    with pytest.raises(ValueError, match="http"):
        AL.WebhookSink("ftp://example")


def test_down_webhook_keeps_event_in_outbox_until_flush(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/hook"
    hook = AL.WebhookSink(url, timeout=1, retries=1, backoff=0.0)
    m = manager(
        tmp_path, sinks=[AL.JsonlSink(tmp_path / "alerts.jsonl"), hook], k_consecutive=1, resolve_after=1
    )
    (opened,) = m.update("L1", "w0", drift(), att(drift()))
    pending = m.outbox.pending()
    assert [e["event_id"] for e in pending] == [opened.event_id]  # not lost
    assert len(jsonl(tmp_path)) == 1  # the working sink already has it
    (resolved,) = m.update("L1", "w1", clear())  # queued behind the first, in order
    assert [e["kind"] for e in m.outbox.pending()] == ["opened", "resolved"]
    # a restart does not lose the outbox either
    m2 = manager(tmp_path, sinks=[AL.JsonlSink(tmp_path / "alerts.jsonl"), hook], k_consecutive=1)
    srv = _Server(port=port)
    try:
        report = m2.flush()
        assert report.delivered == (opened.event_id, resolved.event_id) and report.pending == {}
        assert [b["kind"] for b in srv.bodies] == ["opened", "resolved"]
    finally:
        srv.close()
    assert m2.outbox.pending() == [] and len(m2.outbox.sent()) == 2
    assert [e["kind"] for e in jsonl(tmp_path)] == ["opened", "resolved"]  # no duplicates on the working sink


def test_outbox_put_is_idempotent_and_checks_ids(tmp_path: Path) -> None:
    box = AL.Outbox(tmp_path / "box")
    ev = {"event_id": "abc", "kind": "opened"}
    assert box.put(ev) is True and box.put(ev) is False
    box.flush([])  # no sinks: delivered to all of them
    assert box.put(ev) is False and box.sent() == [ev]
    with pytest.raises(ValueError, match="file name"):
        box.put({"event_id": "../evil"})


def test_state_file_is_written_atomically(tmp_path: Path) -> None:
    m = manager(tmp_path, k_consecutive=1)
    run(m, [drift()])
    lines = tmp_path / "state" / "lines"
    assert sorted(p.name for p in lines.iterdir() if not p.name.endswith(".lock")) == ["L1.json"]
    st = json.loads((lines / "L1.json").read_text())
    assert st["version"] == 2 and st["open"]["latent"]["status"] == "open" and st["processed"] == {"w0": 0}
    shutil.copy(lines / "L1.json", tmp_path / "copy.json")  # plain JSON, readable by anyone


# ------------------------------------------------------------------------------------------------ causes


def quality(channel: str = "detail_ratio", effect: float = -1.6, p: float = 1e-3) -> object:
    """A window whose image-quality family fired on ``channel`` (no latent axis significant)."""
    from types import SimpleNamespace

    table = pd.DataFrame({"channel": [channel, "noise_level" if channel != "noise_level" else "rotation"],
                          "ks_stat": [0.5, 0.1], "p_value": [1e-4, 0.5], "effect_size": [effect, 0.1],
                          "significant": [True, False]})
    return SimpleNamespace(detected=True, per_axis=clear().per_axis, fired=("quality",),
                           family_p={"axes": 0.5, "mmd": 0.4, "quality": p}, per_channel=table)


def surge(p: float = 1e-3) -> object:
    """A window whose anomaly-score family fired: more defective-looking cells."""
    from types import SimpleNamespace

    return SimpleNamespace(detected=True, per_axis=clear().per_axis, fired=("scores",),
                           family_p={"axes": 0.5, "mmd": 0.4, "scores": p}, score_stat=0.68, score_p=p,
                           score_tail=0.24, score_tail_expected=0.1)


def test_window_causes_name_family_and_axis_or_channel() -> None:
    from types import SimpleNamespace

    from pipeline.monitoring.causes import window_causes

    assert window_causes(clear()) == []
    (lat,) = window_causes(drift(axis=4))
    assert (lat.key, lat.family, lat.tests) == ("axes:z_4", "latent", ("axes",))
    (q,) = window_causes(quality("noise_level"))
    assert (q.key, q.family) == ("quality:noise_level", "quality") and "noise" in q.summary
    (s,) = window_causes(surge())
    assert s.key == "scores" and "anomaly scores up" in s.summary
    mmd_only = SimpleNamespace(detected=True, per_axis=clear().per_axis, fired=("mmd",), family_p={"mmd": 1e-3})
    (m,) = window_causes(mmd_only)
    assert m.key == "mmd" and m.family == "latent" and "no single axis" in m.summary
    both = SimpleNamespace(**{**vars(surge()), "fired": ("axes", "scores"), "per_axis": drift(axis=2).per_axis})
    assert [c.key for c in window_causes(both)] == ["axes:z_2", "scores"]


def test_a_defect_surge_during_an_open_alert_is_its_own_notified_alert_and_both_resolve(tmp_path: Path) -> None:
    """Compression fault (image quality) for 3 days, a defect surge two days after it began, then healthy days."""
    m = manager(tmp_path)  # the default policy: 2 windows to open (a defect surge: 1), 2 to resolve
    days = [clear(), quality(), quality(), quality(), surge(), surge(), clear(), clear(), clear()]
    kinds = run(m, days)
    assert kinds == [[], [], ["opened"], [], ["opened"], ["resolved"], [], ["resolved"], []]
    sent = jsonl(tmp_path)
    assert [(e["kind"], e["alert"]["cause"]) for e in sent] == [
        ("opened", "quality:detail_ratio"), ("opened", "scores"),
        ("resolved", "quality:detail_ratio"), ("resolved", "scores")]
    a_id, b_id = sent[0]["alert"]["id"], sent[1]["alert"]["id"]
    assert a_id != b_id and sent[2]["alert"]["id"] == a_id and sent[3]["alert"]["id"] == b_id
    assert "anomaly scores up" in sent[1]["alert"]["summary"] and sent[1]["reason"].startswith("scores")
    assert m.open_alerts("L1") == [] and m.active("L1") is None


def test_a_new_top_axis_while_the_latent_alert_is_open_escalates_with_a_notification(tmp_path: Path) -> None:
    m = manager(tmp_path)
    kinds = run(m, [drift(axis=3), drift(axis=3), drift(axis=5), drift(axis=5), clear(), clear()])
    assert kinds == [[], ["opened"], ["escalated"], [], [], ["resolved"]]
    esc = jsonl(tmp_path)[1]
    assert esc["kind"] == "escalated" and "new cause axes:z_5" in esc["reason"]
    assert esc["alert"]["causes"] == ["axes:z_3", "axes:z_5"]


def two_channels(first: str, second: str, effects: tuple[float, float] = (-1.6, 2.4)) -> object:
    """A quality window in which two channels are significant."""
    w = quality(first, effects[0])
    w.per_channel = pd.DataFrame({"channel": [first, second], "ks_stat": [0.5, 0.6], "p_value": [1e-4, 1e-5],
                                  "effect_size": list(effects), "significant": [True, True]})
    return w


def test_every_significant_quality_channel_is_a_cause_largest_shift_first() -> None:
    from pipeline.monitoring.causes import alert_group, window_causes

    causes = window_causes(two_channels("detail_ratio", "illumination"))
    assert [c.key for c in causes] == ["quality:illumination", "quality:detail_ratio"]
    assert [alert_group(c) for c in causes] == ["quality:illumination", "quality:detail_ratio"]
    assert causes[0].summary == "image quality: illumination non-uniformity moved by +2.4 σ"
    assert causes[0].effects == (2.4,) and all(c.family == "quality" for c in causes)
    (lat,) = window_causes(drift(axis=4))
    assert alert_group(lat) == "latent"


def test_each_quality_channel_opens_and_resolves_its_own_alert(tmp_path: Path) -> None:
    """Blur for 3 windows; darker corners start on its last one and last 3; healthy after."""
    m = manager(tmp_path)  # the default policy: 2 windows to open, 2 to resolve
    days = [quality("detail_ratio"), quality("detail_ratio"), two_channels("detail_ratio", "illumination"),
            quality("illumination"), quality("illumination"), clear(), clear()]
    kinds = run(m, days)
    assert kinds == [[], ["opened"], [], ["opened"], ["resolved"], [], ["resolved"]]
    sent = jsonl(tmp_path)
    assert [(e["kind"], e["alert"]["cause"], e["window_id"]) for e in sent] == [
        ("opened", "quality:detail_ratio", "w1"), ("opened", "quality:illumination", "w3"),
        ("resolved", "quality:detail_ratio", "w4"), ("resolved", "quality:illumination", "w6")]
    assert sent[1]["alert"]["family"] == "quality" and "illumination" in sent[1]["alert"]["summary"]
    assert m.open_alerts("L1") == []


def test_one_window_of_another_channel_during_an_open_quality_alert_does_not_notify(tmp_path: Path) -> None:
    """A single noisy window while a blur alert is open: neither an escalation nor an alert of its own."""
    m = manager(tmp_path)
    days = [quality("detail_ratio"), quality("detail_ratio"), two_channels("detail_ratio", "noise_level"),
            quality("detail_ratio"), clear(), clear()]
    assert run(m, days) == [[], ["opened"], [], [], [], ["resolved"]]
    assert [e["alert"]["cause"] for e in jsonl(tmp_path)] == ["quality:detail_ratio"] * 2


def test_channels_that_fire_when_an_alert_opens_are_one_alert_until_all_are_quiet(tmp_path: Path) -> None:
    """A blur moves fine detail and the noise estimate together: one alert, named by both, kept open by either."""
    m = manager(tmp_path)
    days = [quality("detail_ratio"), two_channels("detail_ratio", "noise_level"), quality("noise_level"),
            clear(), clear(), quality("noise_level"), clear()]
    assert run(m, days) == [[], ["opened"], [], [], ["resolved"], [], []]
    sent = jsonl(tmp_path)
    assert [(e["kind"], e["alert"]["cause"]) for e in sent] == [("opened", "quality:detail_ratio"),
                                                              ("resolved", "quality:detail_ratio")]
    opened = sent[0]
    assert opened["alert"]["causes"] == ["quality:detail_ratio", "quality:noise_level"]
    assert "with quality:noise_level" in opened["reason"] and "noise level" in opened["alert"]["summary"]
    # once resolved, the noise channel is a group of its own again: one window of it opens nothing
    assert m.open_alerts("L1") == []


def test_a_state_with_one_quality_group_keeps_its_open_alert_under_the_channel(tmp_path: Path) -> None:
    m = manager(tmp_path)
    run(m, [quality("noise_level"), quality("noise_level")])
    path = tmp_path / "state" / "lines" / "L1.json"
    st = json.loads(path.read_text())
    st["open"] = {"quality": st["open"].pop("quality:noise_level")}
    st["counters"] = {"quality": st["counters"].pop("quality:noise_level")}
    path.write_text(json.dumps(st))
    m2 = manager(tmp_path)
    assert run(m2, [quality("noise_level"), clear(), clear()], start=2) == [[], [], ["resolved"]]
    assert jsonl(tmp_path)[-1]["alert"]["cause"] == "quality:noise_level"


def test_version_1_state_is_migrated(tmp_path: Path) -> None:
    m = manager(tmp_path)
    v1_alert = {"id": "a1", "line": "L1", "window": {"id": "w1", "start": None, "end": None}, "model_version": "1",
                "tests": ["axes", "mmd"], "top_axes": [], "severity": "warning", "status": "open", "summary": "s",
                "card_paths": [], "example_images": [], "dedup_key": "L1|axes=3|tests=axes,mmd",
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "last_window": "w1",
                "resolved_at": None, "n_windows": 2}
    state = {"version": 1, "line": "L1", "n_windows": 2, "consecutive_drift": 2, "consecutive_clear": 0,
             "active": v1_alert, "last_sent": {}, "processed": {"w0": 0, "w1": 1}, "history": []}
    (tmp_path / "state" / "lines" / "L1.json").write_text(json.dumps(state))
    assert m.active("L1").cause == "latent" and m.active("L1").causes == ("latent",)
    assert run(m, [clear(), clear()], start=2) == [[], ["resolved"]]
    assert jsonl(tmp_path)[0]["alert"]["id"] == "a1"


def test_ops_events_go_through_the_outbox_and_every_sink(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = manager(tmp_path, sinks=[AL.LogSink(), AL.JsonlSink(tmp_path / "alerts.jsonl")])
    with caplog.at_level("WARNING", logger="pipeline.monitoring.alerts"):
        ev = m.notify_ops("model.not_promoted", "model v3 not promoted", key="3", version="3")
        again = m.notify_ops("model.not_promoted", "model v3 not promoted", key="3", version="3")
    assert ev["event_id"] == again["event_id"]
    (line,) = jsonl(tmp_path)  # sent once
    assert line["kind"] == "ops" and line["ops"]["type"] == "model.not_promoted" and line["ops"]["version"] == "3"
    assert any("OPS model.not_promoted: model v3 not promoted" in r.getMessage() for r in caplog.records)


def test_an_immediate_family_opens_at_its_first_window(tmp_path: Path) -> None:
    from pipeline.monitoring.causes import Cause
    from pipeline.monitoring.charts import ChartedResult

    cam = Cause("camera:mean_intensity", "camera", ("camera",), (), (1e-5,), (), "camera/optics changed")
    m = manager(tmp_path)
    assert run(m, [ChartedResult(clear(), cam), clear(), clear()]) == [["opened"], [], ["resolved"]]
    slow = manager(tmp_path / "slow", immediate_families=())
    assert run(slow, [ChartedResult(clear(), cam), ChartedResult(clear(), cam)]) == [[], ["opened"]]


def test_a_control_chart_alarm_opens_at_its_first_window(tmp_path: Path) -> None:
    """A chart alarm has already weighed the windows before it (soak_s42: blur seen by the chart on its last day)."""
    from pipeline.monitoring.causes import Cause
    from pipeline.monitoring.charts import ChartedResult

    text = "persistent shift since window w1: fine-detail ratio +1.8 sd (EWMA over 3 windows)"
    chart = Cause("spc:detail_ratio", "spc", ("spc",), (), (), (1.8,), text)
    days = [clear(), ChartedResult(clear(), chart), clear(), clear()]
    m = manager(tmp_path)
    assert run(m, days) == [[], ["opened"], [], ["resolved"]]
    opened = jsonl(tmp_path)[0]["alert"]
    assert opened["cause"] == "spc:detail_ratio" and "fine-detail ratio +1.8 sd" in opened["summary"]
    old = manager(tmp_path / "k2", immediate_families=("camera", "scores"))  # the chart behind the hysteresis
    assert run(old, days) == [[], [], [], []]


def test_a_defect_surge_seen_in_one_window_opens_its_alert_at_once(tmp_path: Path) -> None:
    assert run(manager(tmp_path), [clear(), surge(), clear(), clear()]) == [[], ["opened"], [], ["resolved"]]
    assert run(manager(tmp_path / "k2", immediate_families=("camera",)), [surge(), clear(), surge(), clear()]) == \
        [[], [], [], []]  # with the hysteresis, single windows never open it
    assert run(manager(tmp_path / "latent"), [drift(axis=3), clear()]) == [[], []]  # other families still wait


def test_with_the_default_cooldown_a_second_surge_days_later_is_alerted(tmp_path: Path) -> None:
    # one day of "defect rate up" on a healthy day, then a real surge five days later (soak_s31, line L2)
    windows = [surge(), clear(), clear(), clear(), clear(), surge(), surge()]
    assert run(manager(tmp_path), windows) == [["opened"], [], ["resolved"], [], [], ["opened"], []]
    long = manager(tmp_path / "six", cooldown_windows=6)  # the cooldown hides it: never notified
    assert run(long, windows) == [["opened"], [], ["resolved"], [], [], ["suppressed"], ["suppressed"]]


def scores_and_axis(axis: int = 2) -> object:
    """A window in which the anomaly scores rose and a latent axis moved (a camera gain drop)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(surge()), "fired": ("axes", "scores"), "per_axis": drift(axis=axis).per_axis,
                              "family_p": {"axes": 1e-4, "mmd": 0.4, "scores": 1e-3}})


def test_a_latent_axis_that_fires_with_an_alert_opening_at_once_joins_it_and_keeps_it_open(tmp_path: Path) -> None:
    """Gain drop: scores (immediate) and a latent axis (2 windows) fire on day one: one alert, named by both."""
    m = manager(tmp_path)
    days = [clear(), scores_and_axis(2), clear(), drift(axis=4), clear(), clear()]
    assert run(m, days) == [[], ["opened"], [], ["escalated"], [], ["resolved"]]
    sent = jsonl(tmp_path)
    opened = sent[0]["alert"]
    assert opened["cause"] == "scores" and opened["causes"] == ["scores", "axes:z_2"]
    assert set(opened["tests"]) >= {"scores", "axes"} and "with axis 2" in opened["summary"]
    assert "with latent" in sent[0]["reason"]
    # the later latent window counts for the open alert (no latent alert of its own) and names its new axis
    assert sent[1]["kind"] == "escalated" and "new cause axes:z_4" in sent[1]["reason"]
    assert [e["alert"]["id"] for e in sent] == [opened["id"]] * 3 and m.open_alerts("L1") == []


def test_a_group_that_reaches_its_own_hysteresis_keeps_its_own_alert(tmp_path: Path) -> None:
    m = manager(tmp_path)
    assert run(m, [drift(axis=2), scores_and_axis(2), clear(), clear()]) == \
        [[], ["opened", "opened"], [], ["resolved", "resolved"]]
    assert sorted(e["alert"]["cause"] for e in jsonl(tmp_path)[:2]) == ["axes:z_2", "scores"]
    without = manager(tmp_path / "k2", immediate_families=())  # nothing opens at once: nothing to join
    assert run(without, [scores_and_axis(2), clear()]) == [[], []]


def test_only_an_alert_that_opens_at_once_takes_in_groups_short_of_their_hysteresis(tmp_path: Path) -> None:
    from types import SimpleNamespace

    # image quality (2 windows) opens on the second window while a latent axis fires for the first time: two alerts
    both = SimpleNamespace(**{**vars(quality()), "fired": ("axes", "quality"), "per_axis": drift(axis=2).per_axis})
    m = manager(tmp_path)
    assert run(m, [quality(), both, drift(axis=2)]) == [[], ["opened"], ["opened"]]
    assert [e["alert"]["cause"] for e in jsonl(tmp_path)] == ["quality:detail_ratio", "axes:z_2"]

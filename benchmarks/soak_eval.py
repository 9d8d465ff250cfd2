"""Scoring a soak (:mod:`benchmarks.soak`) against its ground truth, and its results file.

What the loop said is read from the soak's own record of every command's answer (``soak_log.jsonl``: the verdict of
a window as made on the day, whatever later runs think), the alert outbox's sink (``state/alerts.jsonl``: every
delivered alert event, append-only) and the per-image scores table (``state/scores.parquet``: one row per image and
model, so the flags the day's champion gave are still there). The truth is the simulator's ground-truth file.

Definitions (line-day = one line's plant day; day indices are 0-based):

* **status** of a line-day: ``commissioning`` (before the first monitored day), ``fault:<kind>`` (an image or defect
  fault active), ``recovery`` (the two days after a fault ends: an alert may still be resolving), ``mix`` (a
  product-mix change: normal production) or ``healthy``;
* **uptime**: share of monitored line-days with a verdict made during that day's cycle (its monitor or nightly);
* a fault is **alerted in time** when an alert event (opened or escalated) on its line for the onset day or the day
  after names the fault's family; the **family named** is read from the alert's tests and text (see
  :data:`EXPECTED_FAMILY`);
* a **false alert** is an opened or escalated alert event for a healthy or mix line-day; the rate is per 30 such
  line-days;
* an alert is **resolved in time** when its resolved event comes for a window before ``end + 2`` (the fault's first
  healthy day or the day after);
* **flags**: the day's flags are those of the champion the day's monitor ran with; defective = ELPV p = 1, healthy =
  p < 1 (clean = p = 0 also reported); the false-flag rate is measured on healthy cells of line-days without an
  image fault.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import MACHINE, RESULTS

#: The family an alert must name for each fault kind (see :func:`named_families`).
EXPECTED_FAMILY: dict[str, str] = {
    "gain": "latent", "blur": "fine detail", "noise": "noise", "illumination": "illumination",
    "vignetting": "illumination", "misalign": "rotation", "defect_rate": "defect rate",
}
#: Faults of the camera and its optics: on a line with golden cells, "camera/optics changed" names them rightly too.
CAMERA_FAULTS = frozenset({"gain", "blur", "noise", "illumination", "vignetting", "misalign"})
#: Phrases of an alert's text that name a family.
FAMILY_PHRASES: dict[str, tuple[str, ...]] = {
    "illumination": ("illumination",),
    "fine detail": ("fine-detail", "fine detail", "sharpness"),
    "noise": ("noise level",),
    "rotation": ("rotation",),
    "defect rate": ("anomaly scores up", "defect rate", "more unusual cells"),
    "product mix": ("product mix",),
    "camera": ("camera/optics",),
}
RECOVERY_DAYS = 2
TARGETS = {"uptime": 1.0, "false_alerts_per_30": 1.0, "flag_rate_tolerance": 0.01, "cycle_s": 300.0}


# --------------------------------------------------------------------------------------------------------------
# Line-days
# --------------------------------------------------------------------------------------------------------------
def line_days(config: Any) -> pd.DataFrame:
    """One row per line-day: ``line, day, date, status, fault`` (the fault's index in the schedule, or -1)."""
    rows = []
    for line in config.lines:
        for day in range(config.days):
            status, idx = ("commissioning", -1) if day < config.first_monitored_day else ("healthy", -1)
            for i, f in enumerate(config.faults):
                if f.lines is not None and line not in f.lines:
                    continue
                end = f.end_day if f.end_day is not None else config.days
                if f.start_day <= day < end:
                    status, idx = ("mix" if f.kind == "product_mix" else f"fault:{f.kind}"), i
                elif f.kind != "product_mix" and end <= day < end + RECOVERY_DAYS and status == "healthy":
                    status, idx = "recovery", i
            rows.append({"line": line, "day": day, "date": config.date(day).isoformat(), "status": status,
                         "fault": idx})
    return pd.DataFrame(rows)


def _day_of(config: Any, window_id: str) -> int | None:
    try:
        return (dt.date.fromisoformat(str(window_id)[:10]) - config.date(0)).days
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------
# What the loop said
# --------------------------------------------------------------------------------------------------------------
def _windows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    res = record.get("result") or {}
    if record["command"] == "nightly":
        res = res.get("monitor") or {}
    return list(res.get("windows") or []) if isinstance(res, dict) else []


def verdict_table(config: Any, records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Every window verdict the soak's commands printed, in the order they were made.

    Columns ``line, day, made_on, command, detected, fired_text, description, attribution, model_version``.
    """
    rows = []
    for rec in records:
        version = (rec.get("result") or {}).get("model_version") if rec["command"] == "monitor" else \
            ((rec.get("result") or {}).get("monitor") or {}).get("model_version")
        for w in _windows_of(rec):
            day = _day_of(config, w.get("window_id", ""))
            if day is None:
                continue
            rows.append({"line": str(w.get("line")), "day": day, "made_on": rec["day"], "command": rec["command"],
                         "detected": bool(w.get("detected")), "summary": str(w.get("summary", "")),
                         "description": str(w.get("description", "")), "attribution": str(w.get("attribution", "")),
                         "model_version": version, "n_images": w.get("n_images"), "n_tested": w.get("n_tested")})
    cols = ["line", "day", "made_on", "command", "detected", "summary", "description", "attribution",
            "model_version", "n_images", "n_tested"]
    return pd.DataFrame(rows, columns=cols)


def first_verdicts(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdict of record of each line-day: the first one made (the table is in the order they were made)."""
    return verdicts.drop_duplicates(["line", "day"], keep="first").reset_index(drop=True)


def named_families(text: str, tests: Iterable[str] = ()) -> list[str]:
    """Families an alert names, in the order its text names them (``latent`` when a latent family fired)."""
    low = text.lower()
    found = []
    for fam, phrases in FAMILY_PHRASES.items():
        pos = [low.find(p) for p in phrases if p in low]
        if pos:
            found.append((min(pos), fam))
    tests = set(tests)
    if tests & {"axes", "mmd"}:
        pos = low.find("axis ")
        found.append((pos if pos >= 0 else len(low), "latent"))
    if "scores" in tests and not any(f == "defect rate" for _, f in found):
        found.append((len(low) + 1, "defect rate"))
    return [f for _, f in sorted(found)]


def alert_table(config: Any) -> pd.DataFrame:
    """Delivered alert events of the soak (the JSON-lines sink): ``kind, line, day, alert_id, families, text``."""
    path = config.home / "state" / "alerts.jsonl"
    rows = []
    lines = path.read_text().splitlines() if path.exists() else []
    for raw in lines:
        if not raw.strip():
            continue
        ev = json.loads(raw)
        alert = ev.get("alert") or {}
        text = " ".join(str(x) for x in (alert.get("cause", ""), alert.get("summary", ""),
                                           *(a.get("description", "") for a in alert.get("top_axes") or [])))
        tests = list(alert.get("tests") or [])
        rows.append({"kind": ev.get("kind"), "line": str(alert.get("line", ev.get("line", ""))),
                     "day": _day_of(config, ev.get("window_id", "")), "alert_id": alert.get("id"),
                     "tests": ",".join(tests), "families": named_families(text, tests), "text": text.strip()})
    return pd.DataFrame(rows, columns=["kind", "line", "day", "alert_id", "tests", "families", "text"])


# --------------------------------------------------------------------------------------------------------------
# Answers a command did not print: read back from the home's append-only verdict log
# --------------------------------------------------------------------------------------------------------------
_HARNESS_LINE = re.compile(r"^\[(\d\d:\d\d:\d\d)\] (\S+) day (\d+) \([0-9-]+\): (\w+) exit -?\d+ in")


def harness_times(text: str, name: str, first_date: dt.date) -> dict[tuple[int, str], pd.Timestamp]:
    """When each command of soak ``name`` finished, from the harness's progress lines (``[HH:MM:SS] name day N ...``).

    The lines carry the UTC time of day only; the date starts at ``first_date`` and moves on when the time of day
    goes backwards (a soak over midnight).
    """
    out: dict[tuple[int, str], pd.Timestamp] = {}
    date, last = first_date, None
    for raw in text.splitlines():
        m = _HARNESS_LINE.match(raw.strip())
        if not m or m.group(2) != name:
            continue
        t = dt.time.fromisoformat(m.group(1))
        if last is not None and t < last:
            date += dt.timedelta(days=1)
        last = t
        out[(int(m.group(3)), m.group(4))] = pd.Timestamp(dt.datetime.combine(date, t, tzinfo=dt.UTC))
    return out


def _finish_times(records: list[dict[str, Any]], harness: dict[tuple[int, str], pd.Timestamp]
                  ) -> list[pd.Timestamp | None]:
    """Each record's finish time: its own ``finished_at``, else the harness log's."""
    return [pd.Timestamp(r["finished_at"]) if r.get("finished_at") else harness.get((int(r["day"]), r["command"]))
            for r in records]


def _window_dicts(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"line": str(r.line), "window_id": str(r.window_id), "detected": bool(r.detected),
             "summary": str(r.summary), "description": str(r.description), "attribution": str(r.summary),
             "n_images": int(r.n_images), "n_tested": int(r.n_tested), "n_anomalous": int(r.n_anomalous),
             "events": []} for r in rows.itertuples(index=False)]


def fill_from_state(config: Any, records: list[dict[str, Any]], harness_log: str | None = None
                    ) -> list[dict[str, Any]]:
    """Records whose successful monitor or nightly printed no JSON answer get one rebuilt from the home's state.

    A command run without ``--json`` prints a plain summary that :func:`benchmarks.soak.parse_json_answer` cannot
    read. The monitor's append-only verdict log (``state/windows.parquet``, one row per window and model version with
    the time it was tested) holds what it said: the rows tested between the previous command's finish and this
    one's are this command's verdicts (a window re-tested by the same model adds no row: its first verdict stands),
    and ``state/scores.parquet`` names the model id of each version. Finish times come from each record's
    ``finished_at``, else from the harness's progress lines (``harness_log``). A rebuilt answer is marked
    ``rebuilt_from_state``; the nightly's retrain part is not rebuilt (None).
    """
    state = config.home / "state"
    todo = [i for i, r in enumerate(records)
            if r["command"] in ("monitor", "nightly") and r["rc"] == 0 and not r.get("result")]
    if not todo or not (state / "windows.parquet").exists():
        return records
    first_date = dt.datetime.fromtimestamp((config.home / "soak_config.json").stat().st_mtime, dt.UTC).date()
    finish = _finish_times(records, harness_times(harness_log or "", config.name, first_date))
    rows = pd.read_parquet(state / "windows.parquet")
    rows["tested_at"] = pd.to_datetime(rows["tested_at"], utc=True)
    ids: dict[str, str] = {}
    if (state / "scores.parquet").exists():
        sc = pd.read_parquet(state / "scores.parquet", columns=["model_version", "model_id"]).drop_duplicates()
        ids = {str(v): str(m) for v, m in zip(sc["model_version"], sc["model_id"], strict=True)}
    out = [dict(r) for r in records]
    for i in todo:
        start = next((finish[j] for j in range(i - 1, -1, -1) if finish[j] is not None), None)
        if finish[i] is None:
            continue
        mine = rows[(rows["tested_at"] <= finish[i]) & ((rows["tested_at"] > start) if start is not None else True)]
        version = str(mine["model_version"].iloc[-1]) if len(mine) else None
        answer = {"windows": _window_dicts(mine), "model_version": version, "model_id": ids.get(str(version)),
                  "rebuilt_from_state": True}
        out[i]["result"] = answer if out[i]["command"] == "monitor" else {"monitor": answer, "retrain": None,
                                                                          "rebuilt_from_state": True}
    return out


# --------------------------------------------------------------------------------------------------------------
# Scores against the truth
# --------------------------------------------------------------------------------------------------------------
def uptime(config: Any, verdicts: pd.DataFrame, days: pd.DataFrame) -> dict[str, Any]:
    """Share of monitored line-days with a verdict made during their own day's cycle."""
    monitored = days[days["status"] != "commissioning"]
    on_time = verdicts[verdicts["day"] == verdicts["made_on"]]
    have = set(zip(on_time["line"], on_time["day"], strict=True))
    late = set(zip(verdicts["line"], verdicts["day"], strict=True))
    missing = [(r.line, int(r.day)) for r in monitored.itertuples() if (r.line, r.day) not in have]
    return {"line_days": len(monitored), "with_verdict": len(monitored) - len(missing),
            "uptime": (len(monitored) - len(missing)) / max(len(monitored), 1),
            "missing": [f"{line} day {d}" + (" (verdict later)" if (line, d) in late else "") for line, d in missing]}


def _events(alerts: pd.DataFrame, line: str, days: range, kinds: tuple[str, ...] = ("opened", "escalated")
            ) -> pd.DataFrame:
    return alerts[(alerts["line"] == line) & alerts["day"].isin(list(days)) & alerts["kind"].isin(kinds)]


def fault_outcome(config: Any, fault: Any, verdicts: pd.DataFrame, alerts: pd.DataFrame) -> dict[str, Any]:
    """What the loop said about one scheduled fault (one row of the per-fault table)."""
    line = (fault.lines or config.lines)[0]
    end = int(fault.end_day if fault.end_day is not None else config.days)
    first = first_verdicts(verdicts)
    on_line = first[(first["line"] == line) & first["day"].between(fault.start_day, end - 1)]
    drift_days = [int(d) for d in on_line.loc[on_line["detected"], "day"]]
    out: dict[str, Any] = {"kind": fault.kind, "line": line, "start": fault.start_day, "end": end,
                           "severity": fault.severity, "drift_days": drift_days,
                           "verdict_text": on_line["description"].tolist()}
    if fault.kind == "product_mix":  # normal production: the target is no alert (drift verdicts are reported)
        ev = _events(alerts, line, range(fault.start_day, end + 1))
        out.update({"alerts": len(ev), "ok": ev.empty, "alert_text": ev["text"].tolist()[:2]})
        return out
    expected = EXPECTED_FAMILY[fault.kind]
    during = _events(alerts, line, range(fault.start_day, end))
    early = _events(alerts, line, range(fault.start_day, fault.start_day + 2))
    golden = fault.kind in CAMERA_FAULTS and getattr(config, "golden_cells", 0) > 0
    accepted = {expected, "camera"} if golden else {expected}
    right = early[early["families"].apply(lambda f: bool(accepted & set(f)))]
    ids = set(during["alert_id"])
    resolved = alerts[(alerts["kind"] == "resolved") & alerts["alert_id"].isin(ids)]
    in_time = resolved[resolved["day"] < end + RECOVERY_DAYS]
    resolved_in_time: bool | None = bool(ids) and set(in_time["alert_id"]) >= ids
    if not ids or (not resolved_in_time and end + RECOVERY_DAYS > config.days):
        resolved_in_time = None  # never alerted (nothing to resolve), or its recovery days fall after the soak
    out.update({
        "expected_family": expected + (" or camera" if golden else ""),
        "first_alert_day": None if during.empty else int(during["day"].min()),
        "families_named": sorted({f for fs in during["families"] for f in fs}),
        "alerted_in_time": not right.empty, "alert_text": during["text"].tolist()[:2],
        "alerts": len(during), "resolved_in_time": resolved_in_time,
        "resolved_days": sorted(int(d) for d in resolved["day"].dropna()),
    })
    out["ok"] = bool(out["alerted_in_time"] and resolved_in_time is not False)
    return out


def false_alerts(alerts: pd.DataFrame, days: pd.DataFrame) -> dict[str, Any]:
    """Alert events opened or escalated on healthy (or product-mix) line-days, per 30 such line-days."""
    quiet = days[days["status"].isin(["healthy", "mix"])]
    keys = set(zip(quiet["line"], quiet["day"], strict=True))
    ev = alerts[alerts["kind"].isin(["opened", "escalated"])]
    false = ev[[(r.line, r.day) in keys for r in ev.itertuples()]]
    n = len(quiet)
    return {"healthy_line_days": n, "false_alerts": len(false), "per_30": 30.0 * len(false) / max(n, 1),
            "where": [f"{r.line} day {r.day}: {r.text[:140]}" for r in false.itertuples()]}


def false_drift(verdicts: pd.DataFrame, days: pd.DataFrame) -> dict[str, Any]:
    """Windows called drift on healthy (or product-mix) line-days (verdicts of record)."""
    first = first_verdicts(verdicts).merge(days, on=["line", "day"])
    quiet = first[first["status"].isin(["healthy", "mix"])]
    hits = quiet[quiet["detected"]]
    return {"windows": len(quiet), "drift": len(hits), "rate": len(hits) / max(len(quiet), 1),
            "where": [f"{r.line} day {r.day} ({r.status}): {r.description[:120]}" for r in hits.itertuples()]}


def flag_table(config: Any, records: list[dict[str, Any]], truth: pd.DataFrame) -> pd.DataFrame:
    """Per image of the monitored days: truth (``prob``) and the flag the day's champion gave (``is_anomaly``)."""
    from pipeline.catalog.tables import read_catalog

    scores_path = config.home / "state" / "scores.parquet"
    if not scores_path.exists():
        return pd.DataFrame(columns=["line", "day", "prob", "is_anomaly", "score"])
    cat = read_catalog(config.home, columns=["image_id", "source_path"])
    cat["serial"] = cat["source_path"].map(lambda p: Path(str(p)).stem)
    scores = pd.read_parquet(scores_path)
    models: dict[int, list[str]] = {}
    for rec in records:  # the day's monitor first, then the nightly's (fallback when the monitor had no champion)
        res = rec.get("result") or {}
        res = res.get("monitor") or {} if rec["command"] == "nightly" else res
        if rec["command"] in ("monitor", "nightly") and isinstance(res, dict) and res.get("model_id"):
            models.setdefault(rec["day"], []).append(str(res["model_id"]))
    df = truth.assign(replayed=replayed_views(truth)).merge(cat[["serial", "image_id"]], on="serial", how="inner")
    out = []
    for day, sub in df.groupby("day"):
        for model_id in models.get(int(day), []):
            s = scores[scores["model_id"].astype(str) == model_id][["image_id", "score", "is_anomaly"]]
            got = sub.merge(s, on="image_id", how="inner")
            if len(got):
                out.append(got.assign(model_id=model_id))
                break
    if not out:
        return pd.DataFrame(columns=["line", "day", "prob", "is_anomaly", "score"])
    return pd.concat(out, ignore_index=True)


def production_truth(truth: pd.DataFrame) -> pd.DataFrame:
    """The truth rows of production captures (golden captures, which are never flagged, left out)."""
    from pipeline.common.schemas import golden_mask

    return truth[~golden_mask(truth)].reset_index(drop=True)


def replayed_views(truth: pd.DataFrame) -> pd.Series:
    """True for captures whose cell the line showed before in the same view (any line, in capture-time order).

    The simulator replays ELPV's 2,624 cells; without ``mirror_repeats`` every replay is the same view, and a model
    retrained on the line has usually seen it (``pipeline.line.simulate``).
    """
    view = truth["mirror"] if "mirror" in truth else pd.Series(0, index=truth.index)
    order = pd.to_datetime(truth["timestamp"], utc=True).sort_values(kind="stable").index
    key = truth["elpv_index"].astype(str) + ":" + view.fillna(0).astype(int).astype(str)
    return key.loc[order].duplicated().reindex(truth.index)


def _flag_stats(df: pd.DataFrame) -> dict[str, Any]:
    defect = df["prob"] >= 1.0 - 1e-9
    flag = df["is_anomaly"].astype(bool)
    tp, fp = int((flag & defect).sum()), int((flag & ~defect).sum())
    clean = df["prob"] <= 1e-9
    return {"n": len(df), "defective": int(defect.sum()), "flagged": int(flag.sum()), "tp": tp, "fp": fp,
            "precision": tp / max(tp + fp, 1) if tp + fp else None,
            "recall": tp / int(defect.sum()) if defect.any() else None,
            "flag_rate_healthy": fp / max(int((~defect).sum()), 1),
            "flag_rate_clean": int((flag & clean).sum()) / max(int(clean.sum()), 1)}


def flag_metrics(flags: pd.DataFrame, days: pd.DataFrame, fpr: float) -> dict[str, Any]:
    """Precision / recall on defective cells per line-day and overall; false-flag rate on healthy cells."""
    if flags.empty:
        return {"per_day": [], "overall": None, "no_image_fault": None, "configured_fpr": fpr}
    df = flags.merge(days[["line", "day", "status"]], on=["line", "day"])
    image_fault = df["status"].str.startswith("fault:") & (df["status"] != "fault:defect_rate")
    per_day = [{"line": line, "day": int(day), "status": str(g["status"].iloc[0]), **_flag_stats(g)}
               for (line, day), g in df.groupby(["line", "day"])]
    clean_days = df[~image_fault & df["status"].isin(["healthy", "mix", "recovery"])]
    out = {"per_day": per_day, "overall": _flag_stats(df), "no_image_fault": _flag_stats(df[~image_fault]),
           "healthy_days": _flag_stats(clean_days), "configured_fpr": fpr}
    if "replayed" in df:
        shown = clean_days["replayed"].fillna(False).astype(bool)
        if (~shown).any():
            out["healthy_days_new_view"] = _flag_stats(clean_days[~shown])
        if shown.any():
            out["healthy_days_replayed_view"] = _flag_stats(clean_days[shown])
    return out


def cycle_times(records: list[dict[str, Any]], key: str = "seconds") -> dict[str, Any]:
    """Wall time (``key="seconds"``) or CPU time (``"cpu_s"``) of each day's cycle and of each command."""
    by_day: dict[int, dict[str, float]] = {}
    for rec in records:
        if key in rec:
            by_day.setdefault(rec["day"], {})[rec["command"]] = float(rec[key])
    totals = [sum(v.values()) for v in by_day.values() if len(v) == 3]
    per_cmd = {c: [v[c] for v in by_day.values() if c in v] for c in ("ingest", "monitor", "nightly")}

    def stats(x: list[float]) -> dict[str, float | None]:
        return {"median": float(np.median(x)) if x else None, "max": float(np.max(x)) if x else None,
                "mean": float(np.mean(x)) if x else None}

    return {"day_cycle_s": stats(totals), "per_command_s": {c: stats(v) for c, v in per_cmd.items()},
            "total_s": float(sum(sum(v.values()) for v in by_day.values())),
            "per_day": {int(d): v for d, v in sorted(by_day.items())}}


def error_line(stderr: str) -> str:
    """The line of a command's stderr that says what went wrong (the last naming an error), else its last line."""
    lines = [x.strip() for x in (stderr or "").splitlines() if x.strip()]
    named = [x for x in lines if "Error" in x or "error:" in x or "failed" in x]
    return (named or lines or [""])[-1][:240]


def model_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per nightly: exit status, the candidate, its gate and data."""
    out = []
    for rec in records:
        if rec["command"] != "nightly":
            continue
        r = (rec.get("result") or {}).get("retrain") or {}
        out.append({"day": rec["day"], "rc": rec["rc"], "version": r.get("version"), "promoted": r.get("promoted"),
                    "n_train": r.get("n_train"), "n_calibration": r.get("n_calibration"),
                    "excluded": r.get("excluded"), "gate": ((r.get("gate") or {}).get("reason") or "")[:160],
                    "error": "" if rec["rc"] == 0 else why_not_zero(rec)})
    return out


def why_not_zero(rec: dict[str, Any]) -> str:
    """What a command that exited non-zero said: the reason in its answer (a skipped monitor, a nightly without a
    candidate), else the line of its stderr that names the error."""
    res = rec.get("result")
    res = res if isinstance(res, dict) else {}
    retrain = res.get("retrain") or {}
    reasons = [res.get("skipped"), res.get("monitor_skipped"), retrain.get("reason"),
               (retrain.get("gate") or {}).get("reason")]
    told = "; ".join(str(r) for r in reasons if r)
    return told[:240] if told else error_line(rec.get("stderr_tail", ""))


def command_failures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Commands that exited non-zero, with what they said about why (:func:`why_not_zero`)."""
    return [{"day": r["day"], "command": r["command"], "rc": r["rc"], "message": why_not_zero(r)}
            for r in records if r["rc"] != 0]


def evaluate(config: Any, harness_log: str | None = None) -> dict[str, Any]:
    """Score a soak's home against its truth (see the module docstring).

    ``harness_log``: the harness's progress lines, for a soak whose records lack ``finished_at`` and whose commands
    printed no JSON answer (:func:`fill_from_state`).
    """
    from benchmarks.soak import read_log

    records = fill_from_state(config, read_log(config), harness_log)
    days = line_days(config)
    verdicts = verdict_table(config, records)
    alerts = alert_table(config)
    truth = production_truth(pd.read_parquet(config.home / "truth.parquet"))
    flags = flag_table(config, records, truth)
    return {
        "config": config.to_dict(),
        "uptime": uptime(config, verdicts, days),
        "faults": [fault_outcome(config, f, verdicts, alerts) for f in config.faults],
        "false_alerts": false_alerts(alerts, days),
        "false_drift": false_drift(verdicts, days),
        "flags": flag_metrics(flags, days, config.fpr),
        "cycle": cycle_times(records),
        "cycle_cpu": cycle_times(records, "cpu_s"),
        "models": model_history(records),
        "failures": command_failures(records),
        "verdicts": first_verdicts(verdicts).merge(days, on=["line", "day"]).to_dict("records"),
        "alerts": alerts.to_dict("records"),
        "stderr_lines": int(sum(r.get("stderr_lines", 0) for r in records)),
    }


# --------------------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------------------
def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _stats(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt(v, 0)}" for k, v in d.items())


def _per_cmd(c: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {_stats(v)}" for k, v in c["per_command_s"].items())


def target_rows(s: dict[str, Any]) -> list[str]:
    """The issue's targets, measured, with met / not met."""
    faults = [f for f in s["faults"] if f["kind"] != "product_mix"]
    mix = [f for f in s["faults"] if f["kind"] == "product_mix"]
    fl = s["flags"].get("healthy_days") or {}
    cfg_fpr = s["flags"]["configured_fpr"]
    cyc = s["cycle"]["day_cycle_s"]["max"]
    cpu = (s.get("cycle_cpu") or {}).get("day_cycle_s", {}).get("max")
    rows = [
        ("verdict for every monitored line-day (uptime 100 %)", f"{s['uptime']['uptime']:.1%} "
         f"({s['uptime']['with_verdict']}/{s['uptime']['line_days']})", s["uptime"]["uptime"] >= 1.0),
        ("every fault alerted within 2 line-days, right family named",
         f"{sum(f['alerted_in_time'] for f in faults)}/{len(faults)}", all(f["alerted_in_time"] for f in faults)),
        ("product-mix change not alerted", f"{sum(f['alerts'] for f in mix)} alert(s); drift verdict on "
         f"{sum(len(f['drift_days']) for f in mix)} of {sum(f['end'] - f['start'] for f in mix)} mix days",
         all(f["ok"] for f in mix)),
        ("<= 1 false alert per 30 healthy line-days", f"{s['false_alerts']['per_30']:.2f} "
         f"({s['false_alerts']['false_alerts']} in {s['false_alerts']['healthy_line_days']})",
         s["false_alerts"]["per_30"] <= TARGETS["false_alerts_per_30"]),
        ("every alert resolved within 2 days after its fault ends", _resolved_text(faults),
         all(f["resolved_in_time"] for f in faults if f["resolved_in_time"] is not None)),
        (f"false-flag rate on healthy cells within 1 point of {cfg_fpr:.0%}",
         _fmt(fl.get("flag_rate_healthy"), 3),
         fl.get("flag_rate_healthy") is not None and abs(fl["flag_rate_healthy"] - cfg_fpr) <= 0.01),
        ("one day's cycle (ingest + monitor + nightly) <= 5 min", f"wall max {_fmt(cyc, 0)} s, median "
         f"{_fmt(s['cycle']['day_cycle_s']['median'], 0)} s; CPU max {_fmt(cpu, 0)} s",
         cyc is not None and cyc <= TARGETS["cycle_s"]),
    ]
    return [f"| {a} | {b} | {'met' if ok else '**not met**'} |" for a, b, ok in rows]


def _resolved_text(faults: list[dict[str, Any]]) -> str:
    """``k/n`` alerted faults resolved in time among those whose recovery days the soak saw, and the others."""
    seen = [f for f in faults if f["resolved_in_time"] is not None]
    late = sum(f["resolved_in_time"] is None and f.get("alerts", 0) > 0 for f in faults)
    never = sum(f["resolved_in_time"] is None and not f.get("alerts", 0) for f in faults)
    notes = ([f"{late} more end(s) too close to the soak's end to tell"] if late else []) + (
        [f"{never} fault(s) never alerted, nothing to resolve"] if never else [])
    return f"{sum(bool(f['resolved_in_time']) for f in seen)}/{len(seen)}" + (f" ({'; '.join(notes)})" if notes else "")


def fault_rows(s: dict[str, Any]) -> list[str]:
    out = []
    for f in s["faults"]:
        named = ", ".join(f.get("families_named", [])) or "-"
        text = (f.get("alert_text") or [""])[0][:110].replace("|", "/")
        out.append(f"| {f['kind']} | {f['line']} | {f['start']}-{f['end'] - 1} | {f['drift_days'] or '-'} | "
                   f"{_fmt(f.get('first_alert_day'))} | {f.get('expected_family', 'none (must not alert)')} | "
                   f"{named} | {'yes' if f.get('alerted_in_time') else 'no'} | "
                   f"{_resolved_cell(f)} | {'yes' if f['ok'] else 'no'} | {text} |")
    return out


def _resolved_cell(f: dict[str, Any]) -> str:
    days = f.get("resolved_days") or "-"
    if f.get("resolved_in_time", False) is None and f.get("alerts", 0):
        return f"{days} (soak ended)"
    return str(days)


def verdict_rows(s: dict[str, Any]) -> list[str]:
    out = []
    for v in s["verdicts"]:
        if v["status"] == "commissioning":
            continue
        desc = (v["description"] or "")[:90].replace("|", "/") if v["detected"] else ""
        out.append(f"| {v['line']} | {v['day']} | {v['status']} | {v['n_tested']}/{v['n_images']} | "
                   f"{'drift' if v['detected'] else 'ok'} | {desc} |")
    return out


def flag_rows(s: dict[str, Any]) -> list[str]:
    return [f"| {d['line']} | {d['day']} | {d['status']} | {d['n']} | {d['defective']} | {d['flagged']} | "
            f"{_fmt(d['precision'])} | {_fmt(d['recall'])} | {_fmt(d['flag_rate_healthy'], 3)} |"
            for d in s["flags"]["per_day"]]


def write_results(config: Any, s: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.md`` and ``.json``; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{config.name}.json").write_text(json.dumps(s, indent=1, default=str))
    fl = s["flags"]
    agg = [(k, fl.get(k)) for k in ("overall", "no_image_fault", "healthy_days", "healthy_days_new_view",
                                    "healthy_days_replayed_view") if fl.get(k)]
    code = f" --code-dir {config.code_dir}" if config.code_dir else ""
    cmd = s.get("command") or f".venv/bin/python -m benchmarks.soak --name {config.name}{code}"
    md = [
        f"# {config.name}: the closed loop on a running line\n",
        f"- command: `{cmd}` (see the module docstring)",
        f"- machine: {MACHINE} ({platform.machine()}); date {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; "
        f"commands' wall time summed {_fmt(s['cycle'].get('total_s'), 0)} s over {len(s['cycle']['per_day'])} days",
        f"- line: {config.days} days, lines {', '.join(config.lines)}, {config.per_day} cells per line-day, "
        f"defect share {config.defect_share:.0%} +- {config.defect_jitter:.1%} per day, ELPV pool "
        f"'{config.pool}' in {config.order} order, replays mirrored: "
        f"{getattr(config, 'mirror_repeats', False)}; golden cells per line and shift: "
        f"{getattr(config, 'golden_cells', 0)}; driver {config.driver}; retrain {config.retrain or 'defaults'}; "
        f"monitor {config.monitor or 'defaults'}; LINEWATCH_TIMEZONE {config.timezone}",
        f"- stderr lines written by the commands: {s['stderr_lines']}\n",
        "## Targets\n", "| target | measured | |", "|---|---|---|", *target_rows(s), "",
        "## Faults\n",
        "| fault | line | days | drift verdicts | first alert | family expected | families named | in time | "
        "resolved (day) | ok | alert text |", "|---|---|---|---|---|---|---|---|---|---|---|", *fault_rows(s), "",
        f"False alerts: {s['false_alerts']['false_alerts']} on {s['false_alerts']['healthy_line_days']} healthy or "
        f"product-mix line-days; drift verdicts on them: {s['false_drift']['drift']} of {s['false_drift']['windows']}.",
        *[f"- {w}" for w in s["false_alerts"]["where"][:12]], "",
        "## Per-image flags on defective cells\n",
        "| cells | n | defective | flagged | precision | recall | false-flag rate, healthy (p<1) | clean (p=0) |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {k.replace('_', ' ')} | {v['n']} | {v['defective']} | {v['flagged']} | {_fmt(v['precision'])} | "
          f"{_fmt(v['recall'])} | {_fmt(v['flag_rate_healthy'], 3)} | {_fmt(v['flag_rate_clean'], 3)} |"
          for k, v in agg], "",
        f"Configured false-flag rate: {fl['configured_fpr']:.0%}. A *replayed view* is a cell the simulated line showed "
        "before in the same view (ELPV has 2,624 cells; see `pipeline.line.simulate`, `mirror_repeats`): a model "
        "retrained on the line has usually seen it.\n",
        "## Cycle wall time\n",
        f"Day cycle (both lines: ingest + monitor + nightly), wall seconds: {_stats(s['cycle']['day_cycle_s'])}; per "
        f"command: {_per_cmd(s['cycle'])}.\n",
        f"CPU seconds the commands used (one torch thread each; about the wall time on a core of their own): day "
        f"cycle {_stats(s['cycle_cpu']['day_cycle_s'])}; per command: {_per_cmd(s['cycle_cpu'])}. The machine was "
        "shared with other jobs, so the wall times are pessimistic.\n",
        "## Nightly retrains\n", "| day | exit | version | promoted | train | calibration | excluded | gate / error |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {m['day']} | {m['rc']} | {_fmt(m['version'])} | {_fmt(m['promoted'])} | {_fmt(m['n_train'])} | "
          f"{_fmt(m['n_calibration'])} | {m['excluded']} | {(m['gate'] or str(m['error']))[:120]} |"
          for m in s["models"]], "",
        "## Non-zero exits (exit 4 on a new line is a skip, not a failure)\n", *([f"- day {f['day']} {f['command']} exit {f['rc']}: {f['message']}"
                                    for f in s["failures"]] or ["none"]), "",
        "## Verdicts of record\n", "| line | day | status | tested | verdict | description |", "|---|---|---|---|---|---|",
        *verdict_rows(s), "",
        "## Flags per line-day\n", "| line | day | status | n | defective | flagged | precision | recall | "
        "false-flag rate (healthy) |", "|---|---|---|---|---|---|---|---|---|", *flag_rows(s), "",
    ]
    path = RESULTS / f"{config.name}.md"
    path.write_text("\n".join(md))
    return path

"""What caused a drifted window: one :class:`Cause` per fired test family, named so a person can tell them apart.

A window can drift for more than one reason at once (a camera that goes out of focus while the defect rate rises).
The alert manager keeps one alert per *alert group* (:func:`alert_group`) and names each by its cause; the group is
the family group, except for image quality, where every channel is a group of its own:

=================  =====================================  ==========================================================
alert group        cause key                              when
=================  =====================================  ==========================================================
``latent``         ``axes:z_<k>``                         the per-axis test fired; ``k`` is the top significant axis
``latent``         ``mmd``                                only the multivariate MMD test fired (no single axis)
``quality:<ch>``   ``quality:<channel>``                  an image-quality channel moved (one per significant one)
``scores``         ``scores``                             the per-image anomaly scores rose ("defect rate up")
``spc``            ``spc:<statistic>``                    the line's control chart alarmed (``monitoring.charts``)
``camera``         ``camera:<statistic>``                 golden-sample captures moved (``monitoring.golden``)
``<family>``       ``<family>``                           any other family a drift result reports as fired
``drift``          ``drift``                              a drifted result that does not say which family fired
=================  =====================================  ==========================================================

The functions are pure: they read a :class:`pipeline.analysis.drift.DriftResult` (duck-typed) and a
:class:`pipeline.analysis.axes.Attribution`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

#: Family groups in the order their events are reported.
GROUP_ORDER: tuple[str, ...] = ("latent", "quality", "scores")
_GROUP_OF = {"axes": "latent", "mmd": "latent", "quality": "quality", "scores": "scores"}
#: Families whose every channel is an alert of its own (:func:`alert_group`).
PER_CHANNEL_FAMILIES: tuple[str, ...] = ("quality",)


@dataclass(frozen=True)
class Cause:
    """One reason a window drifted.

    Attributes:
        key: the cause (``"axes:z_3"``, ``"mmd"``, ``"quality:noise_level"``, ``"scores"``, ...).
        family: its family group (``"latent"``, ``"quality"``, ``"scores"`` or another family's name).
        tests: the fired test families that belong to the group.
        top_axes: for the latent group, ``[{"axis", "effect", "p", "description"}]`` (largest |effect| first).
        p_values: the group's family p-values (and top axes' adjusted p), for the severity.
        effects: signed effects in reference sd that speak for the severity (axes, or the quality channel).
        summary: one line for people.
    """

    key: str
    family: str
    tests: tuple[str, ...]
    top_axes: tuple[dict[str, Any], ...]
    p_values: tuple[float, ...]
    effects: tuple[float, ...]
    summary: str


def family_group(family: str) -> str:
    """The group a test family belongs to (``axes``/``mmd`` -> ``latent``; others are their own group)."""
    return _GROUP_OF.get(family, family)


def alert_group(cause: Cause) -> str:
    """The group an alert is kept under: the cause itself for :data:`PER_CHANNEL_FAMILIES`, else its family group.

    An image-quality channel is a measurement of its own (a blurred lens, a noisy sensor and darker corners are
    different faults), so each channel opens, escalates and resolves its own alert; latent axes move together, so
    the latent group keeps one alert whose cause is its top axis.
    """
    return _group(cause.family, cause.key)


def key_group(key: str) -> str:
    """The alert group of a cause key (``"axes:z_3"`` -> ``latent``; ``"quality:noise_level"`` stays itself)."""
    return _group(family_group(key.split(":", 1)[0]), key)


def _group(family: str, key: str) -> str:
    """The cause's key for a channel of a per-channel family, else its family group."""
    return key if family in PER_CHANNEL_FAMILIES and ":" in key else family


def group_rank(group: str) -> tuple[int, str]:
    """Sort key of an alert group: :data:`GROUP_ORDER` by its family, then by name."""
    family = group.split(":", 1)[0]
    return (GROUP_ORDER.index(family) if family in GROUP_ORDER else len(GROUP_ORDER), group)


def _fnum(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def top_axes_of(attribution: Any, top_n: int) -> list[dict[str, Any]]:
    """``[{"axis", "effect", "p", "description"}]`` of the attribution's first ``top_n`` significant axes."""
    out = []
    for a in list(getattr(attribution, "axes", ()))[:top_n]:
        p = _fnum(a.p_adjusted if a.p_adjusted == a.p_adjusted else a.p_value)
        out.append({"axis": int(a.axis), "effect": _fnum(a.effect), "p": p, "description": a.description})
    return out


def _latent_cause(res: Any, tests: tuple[str, ...], top: list[dict[str, Any]], fam_p: Mapping[str, float]) -> Cause:
    ps = tuple(_fnum(fam_p[t]) for t in tests if t in fam_p) + tuple(_fnum(a["p"]) for a in top)
    if "axes" in tests and top:
        a = top[0]
        what = a["description"] or f"axis {a['axis']}"
        summary = f"{what} moved by {a['effect']:+.1f} sd"
        if len(top) > 1:
            summary += "; also " + ", ".join(f"axis {x['axis']} ({x['effect']:+.1f} sd)" for x in top[1:])
        return Cause(f"axes:z_{a['axis']}", "latent", tests, tuple(top), ps,
                     tuple(_fnum(x["effect"]) for x in top), summary)
    key = "mmd" if "mmd" in tests else "axes"
    p = fam_p.get(key)
    summary = ("the latent picture of the window moved as a whole (MMD"
               + (f", p = {_fnum(p):.2g}" if p is not None else "") + "); no single axis is significant")
    return Cause(key, "latent", tests, (), ps, (), summary)


def _quality_causes(res: Any, fam_p: Mapping[str, float]) -> list[Cause]:
    """One cause per significant image-quality channel, largest |effect| first (the top channel when none is)."""
    from pipeline.analysis.axes import channel_phrase

    p = fam_p.get("quality")
    ps = () if p is None else (_fnum(p),)
    table = getattr(res, "per_channel", None)
    if not isinstance(table, pd.DataFrame) or not len(table):
        return [Cause("quality", "quality", ("quality",), (), ps, (), "image quality moved")]
    ranked = table.assign(_a=table["effect_size"].abs()).sort_values("_a", ascending=False, kind="stable")
    sig = ranked[ranked["significant"].astype(bool)] if "significant" in ranked.columns else ranked.iloc[:0]
    rows = sig if len(sig) else ranked.iloc[:1]
    return [Cause(f"quality:{r['channel']}", "quality", ("quality",), (), ps, (_fnum(r["effect_size"]),),
                  "image quality: " + channel_phrase(str(r["channel"]), _fnum(r["effect_size"])))
            for _, r in rows.iterrows()]


def _scores_cause(res: Any, fam_p: Mapping[str, float]) -> Cause:
    from pipeline.analysis.axes import scores_text

    summary = scores_text(res) or "anomaly scores up: more unusual cells than in the reference"
    p = fam_p.get("scores")
    return Cause("scores", "scores", ("scores",), (), () if p is None else (_fnum(p),), (), summary)


def window_causes(drift_result: Any, attribution: Any = None, *, top_n: int = 3) -> list[Cause]:
    """The causes of a drifted window, one per family group that fired, in :data:`GROUP_ORDER` (others after).

    Args:
        drift_result: the window's drift result (``detected``, ``fired``, ``family_p``, ``per_channel``, ...);
            causes in its optional ``extra_causes`` (the control chart's) follow the test's own.
        attribution: its :class:`pipeline.analysis.axes.Attribution` (computed when None).
        top_n: axes listed in a latent cause.

    Returns:
        ``[]`` for a window that did not drift.
    """
    extra = list(getattr(drift_result, "extra_causes", ()) or ())  # e.g. the control chart's (monitoring.charts)
    if not bool(getattr(drift_result, "detected", False)):
        return []
    fired = tuple(getattr(drift_result, "fired", ()) or ())
    if extra and not fired:
        return extra
    return _test_causes(drift_result, attribution, top_n) + extra


def _test_causes(drift_result: Any, attribution: Any, top_n: int) -> list[Cause]:
    """The causes of the drift test's fired families."""
    if attribution is None:
        from pipeline.analysis.axes import attribute

        attribution = attribute(drift_result)
    fired = tuple(getattr(drift_result, "fired", ()) or ())
    fam_p = dict(getattr(drift_result, "family_p", {}) or {})
    if not fired:
        return [Cause("drift", "drift", (), (), tuple(_fnum(p) for p in fam_p.values()), (),
                      str(getattr(attribution, "text", "drift detected")))]
    groups: dict[str, list[str]] = {}
    for f in fired:
        groups.setdefault(family_group(f), []).append(f)
    out = []
    for g in sorted(groups, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g)):
        tests = tuple(groups[g])
        if g == "latent":
            out.append(_latent_cause(drift_result, tests, top_axes_of(attribution, top_n), fam_p))
        elif g == "quality":
            out.extend(_quality_causes(drift_result, fam_p))
        elif g == "scores":
            out.append(_scores_cause(drift_result, fam_p))
        else:
            p = fam_p.get(g)
            out.append(Cause(g, g, tests, (), () if p is None else (_fnum(p),), (), f"{g} test fired"))
    return out


def causes_text(causes: Sequence[Cause]) -> str:
    """The causes' keys joined for logs (``"axes:z_3, scores"``)."""
    return ", ".join(c.key for c in causes)


__all__ = ["GROUP_ORDER", "PER_CHANNEL_FAMILIES", "Cause", "alert_group", "causes_text", "family_group", "group_rank",
           "top_axes_of", "window_causes"]

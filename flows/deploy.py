"""Deployments with cron schedules (``linewatch serve``) and the drift-alert automation.

``serve()`` builds three scheduled deployments and runs them in this process with ``prefect.serve`` (no work pool
needed; stopping the process pauses the schedules):

=====================  ====================  =====================================================
deployment             schedule              what
=====================  ====================  =====================================================
``nightly``            ``0 2 * * *`` (tz)    ingest -> retrain (gate) -> monitor
``monitor``            ``*/15 * * * *``      encode, score, drift per window, alerts
``ingest``             ``*/10 * * * *``      drop folder -> catalog
``retrain``            none (on demand)      retrain only
=====================  ====================  =====================================================

The time zone is ``LINEWATCH_TIMEZONE`` (default: the machine's zone, UTC when unknown). For work pools (process / docker workers) use the
repository's ``prefect.yaml`` and ``prefect deploy``.

Alerts: the monitor flow emits ``linewatch.drift.alert`` events. :func:`drift_alert_automation` defines the
automation that turns each such event into a webhook call (``LINEWATCH_WEBHOOK_URL``); :func:`ensure_automation`
creates it (and its ``Webhook`` block) on the Prefect server in use.
"""

from __future__ import annotations

from typing import Any

NIGHTLY_CRON = "0 2 * * *"
MONITOR_CRON = "*/15 * * * *"
INGEST_CRON = "*/10 * * * *"
AUTOMATION_NAME = "linewatch-drift-alert-webhook"
WEBHOOK_BLOCK = "linewatch-alert-webhook"


def build_deployments(timezone: str | None = None, *, nightly_params: dict[str, Any] | None = None,
                      monitor_params: dict[str, Any] | None = None) -> list[Any]:
    """The runner deployments of the linewatch flows, with their schedules.

    Args:
        timezone: IANA zone of the schedules (default ``settings.timezone``).
        nightly_params: default parameters of the nightly run (e.g. ``{"retrain": {"preset": "cpu"}}``).
        monitor_params: default parameters of the monitor runs.

    Returns:
        ``RunnerDeployment`` objects for ``prefect.serve``.
    """
    from prefect.schedules import Cron

    from flows.ingest import ingest_flow
    from flows.monitor import monitor_flow
    from flows.nightly import nightly_flow
    from flows.retrain import retrain_flow
    from flows.runners import with_task_runner
    from pipeline.settings import get_settings

    tz = timezone or get_settings().timezone
    return [
        nightly_flow.to_deployment(
            name="nightly", schedules=[Cron(NIGHTLY_CRON, timezone=tz)], parameters=nightly_params or {},
            description="ingest -> retrain (promotion gate) -> monitor, nightly", tags=["linewatch"],
            concurrency_limit=1,
        ),
        with_task_runner(monitor_flow).to_deployment(
            name="monitor", schedules=[Cron(MONITOR_CRON, timezone=tz)], parameters=monitor_params or {},
            description="encode, score, drift per window, alerts", tags=["linewatch"], concurrency_limit=1,
        ),
        ingest_flow.to_deployment(
            name="ingest", schedules=[Cron(INGEST_CRON, timezone=tz)], description="drop folder -> catalog",
            tags=["linewatch"], concurrency_limit=1,
        ),
        retrain_flow.to_deployment(name="retrain", description="retrain on demand", tags=["linewatch"],
                                   concurrency_limit=1),
    ]


def serve(timezone: str | None = None, *, webhook_url: str | None = None, limit: int | None = None) -> None:
    """Serve the scheduled deployments from this process (blocks until interrupted).

    Args:
        timezone: schedule time zone (default ``settings.timezone``).
        webhook_url: create the drift-alert automation posting to this URL first (default
            ``settings.webhook_url``; none: no automation).
        limit: maximum concurrent flow runs of this process.
    """
    from prefect import serve as prefect_serve

    from pipeline.settings import get_settings

    url = webhook_url or get_settings().webhook_url
    if url:
        ensure_automation(url)
    prefect_serve(*build_deployments(timezone), limit=limit)


def drift_alert_automation(block_document_id: Any) -> Any:
    """The automation: every ``linewatch.drift.alert`` event calls the webhook block with the alert payload.

    Args:
        block_document_id: id of a ``prefect.blocks.webhook.Webhook`` block document.

    Returns:
        A ``prefect.automations.Automation`` (not yet created on the server; call ``.create()``).
    """
    from prefect.automations import Automation
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import EventTrigger, Posture

    from flows.monitor import ALERT_EVENT

    payload = (
        '{"source": "linewatch", "event": "{{ event.event }}", "line": "{{ event.payload.line }}", '
        '"window": "{{ event.payload.window_id }}", "axis": "{{ event.payload.top_axis }}", '
        '"description": "{{ event.payload.description }}", "summary": "{{ event.payload.attribution }}", '
        '"model_version": "{{ event.payload.model_version }}"}'
    )
    return Automation(
        name=AUTOMATION_NAME,
        description="POST every linewatch drift alert to the configured webhook",
        trigger=EventTrigger(
            expect={ALERT_EVENT},
            match={"prefect.resource.id": "linewatch.line.*"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=block_document_id, payload=payload)],
    )


def ensure_automation(webhook_url: str) -> Any:
    """Create (or update) the webhook block and the drift-alert automation on the Prefect server in use.

    Returns:
        The created automation.
    """
    from prefect.automations import Automation
    from prefect.blocks.webhook import Webhook

    block = Webhook(method="POST", url=webhook_url, allow_private_urls=True)
    block_id = block.save(WEBHOOK_BLOCK, overwrite=True)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        existing = None
    if existing is not None:
        existing.delete()
    return drift_alert_automation(block_id).create()

"""Create the webhook block and the drift-alert automation of deploy/automation.yaml on a Prefect server.

Usage (PREFECT_API_URL must point at the server)::

    LINEWATCH_WEBHOOK_URL=https://hooks.example.com/linewatch python deploy/setup_automation.py [--allow-private-urls]

The block is a ``CustomWebhookNotificationBlock`` named ``linewatch-webhook`` that POSTs
``{"subject": ..., "body": ..., "source": "prefect-automation"}``. ``--allow-private-urls`` lets it call hosts on
private networks (the compose network, 127.0.0.1 in the native stack test). Idempotent: re-running replaces the block
and the automation of the same name.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml
from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock

HERE = Path(__file__).resolve().parent
BLOCK_NAME = "linewatch-webhook"


def setup(url: str, *, allow_private_urls: bool = False, spec_path: Path = HERE / "automation.yaml") -> str:
    """Save the block, (re)create the automation; return the automation id."""
    block = CustomWebhookNotificationBlock(
        name="linewatch",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "prefect-automation"},
        allow_private_urls=allow_private_urls,
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)
    spec = yaml.safe_load(spec_path.read_text())
    for action in spec["actions"]:
        if action.get("block_document_id") == "__WEBHOOK_BLOCK_ID__":
            action["block_document_id"] = str(block_id)
    while True:  # replace every automation of that name
        try:
            Automation.read(name=spec["name"]).delete()
        except ValueError:  # not found
            break
    automation = Automation.model_validate(spec).create()
    return str(automation.id)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("LINEWATCH_WEBHOOK_URL"), help="webhook URL")
    p.add_argument("--allow-private-urls", action="store_true", help="allow private / loopback hosts")
    args = p.parse_args(argv)
    if not args.url:
        print("setup_automation: give --url or set LINEWATCH_WEBHOOK_URL", file=sys.stderr)
        return 2
    print(f"automation {setup(args.url, allow_private_urls=args.allow_private_urls)} created -> {args.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

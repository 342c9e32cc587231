#!/usr/bin/env python3
"""Render the Alertmanager configuration from environment variables.

Alertmanager does not expand environment variables in its configuration file, so the compose
stack runs this script once (service ``alertmanager-config``, vison image) before Alertmanager
starts; it writes ``alertmanager.yml`` into a volume that Alertmanager reads.

Routing (severity labels of deploy/prometheus/rules): ``page`` -> the pager webhook *and* e-mail,
``warning`` -> e-mail, ``info`` -> nowhere (visible in Alertmanager / Grafana only). Every
receiver also sends the resolution.

Environment (see .env.example):

====================================  =====================================================
``ALERT_EMAIL_TO``                    required, comma-separated recipients of warnings/pages
``ALERT_EMAIL_FROM``                  required, sender address
``ALERT_SMTP_SMARTHOST``              required, ``host:port`` of the SMTP relay
``ALERT_SMTP_USERNAME``               optional (with ``ALERT_SMTP_PASSWORD``) SMTP login
``ALERT_SMTP_PASSWORD``               optional
``ALERT_SMTP_REQUIRE_TLS``            ``true`` (default) or ``false`` (lab relay without TLS)
``ALERT_PAGER_WEBHOOK_URL``           required, URL the pager / SMS gateway receives POSTs on
``ALERT_PAGER_BEARER_TOKEN``          optional bearer token sent to the pager webhook
====================================  =====================================================

Usage: ``python render_config.py --out /path/alertmanager.yml`` (``--out -`` prints it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

REQUIRED = ("ALERT_EMAIL_TO", "ALERT_EMAIL_FROM", "ALERT_SMTP_SMARTHOST", "ALERT_PAGER_WEBHOOK_URL")


class ConfigError(ValueError):
    """A required variable is missing or a value is malformed."""


def _bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean (true/false)")


def build_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The Alertmanager configuration (a dict) for the given environment."""
    missing = [k for k in REQUIRED if not env.get(k, "").strip()]
    if missing:
        raise ConfigError("missing environment variable(s): " + ", ".join(missing) + " (set them in .env)")
    smarthost = env["ALERT_SMTP_SMARTHOST"].strip()
    if ":" not in smarthost:
        raise ConfigError(f"ALERT_SMTP_SMARTHOST={smarthost!r} must be host:port")
    url = env["ALERT_PAGER_WEBHOOK_URL"].strip()
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"ALERT_PAGER_WEBHOOK_URL={url!r} must be an http(s) URL")
    recipients = ", ".join(a.strip() for a in env["ALERT_EMAIL_TO"].split(",") if a.strip())
    email: dict[str, Any] = {
        "to": recipients,
        "from": env["ALERT_EMAIL_FROM"].strip(),
        "smarthost": smarthost,
        "require_tls": _bool(env.get("ALERT_SMTP_REQUIRE_TLS", "true") or "true", "ALERT_SMTP_REQUIRE_TLS"),
        "send_resolved": True,
    }
    if env.get("ALERT_SMTP_USERNAME", "").strip():
        email["auth_username"] = env["ALERT_SMTP_USERNAME"].strip()
        email["auth_password"] = env.get("ALERT_SMTP_PASSWORD", "")
    webhook: dict[str, Any] = {"url": url, "send_resolved": True, "max_alerts": 20}
    if env.get("ALERT_PAGER_BEARER_TOKEN", "").strip():
        webhook["http_config"] = {"authorization": {"type": "Bearer", "credentials": env["ALERT_PAGER_BEARER_TOKEN"].strip()}}
    return {
        "route": {
            "receiver": "email",
            "group_by": ["alertname", "block", "roe", "hk_key", "job", "queue"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": [
                {"matchers": ['severity="page"'], "receiver": "pager", "group_wait": "10s",
                 "repeat_interval": "30m", "continue": True},
                {"matchers": ['severity=~"page|warning"'], "receiver": "email"},
                {"matchers": ['severity="info"'], "receiver": "none"},
            ],
        },
        "inhibit_rules": [
            # ingest down: its HK stream is stale too; the service alert says it all.
            {"source_matchers": ['alertname="VisonServiceDown"', 'job="ingest"'],
             "target_matchers": ['alertname="HKStale"']},
        ],
        "receivers": [
            {"name": "email", "email_configs": [email]},
            {"name": "pager", "webhook_configs": [webhook]},
            {"name": "none"},
        ],
    }


def render(env: Mapping[str, str]) -> str:
    import yaml

    head = "# GENERATED at container start by deploy/alertmanager/render_config.py from the environment.\n"
    return head + yaml.safe_dump(build_config(env), sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render alertmanager.yml from ALERT_* environment variables")
    parser.add_argument("--out", default="-", help="output file ('-' = stdout)")
    args = parser.parse_args(argv)
    try:
        text = render(os.environ)
    except ConfigError as exc:
        print(f"render_config: {exc}", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, prefix=".alertmanager-") as fh:
        fh.write(text)
    os.chmod(fh.name, 0o644)  # Alertmanager runs as another user (nobody) and must read it
    os.replace(fh.name, out)
    print(f"render_config: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Create the vison users and topology on the compose stack's RabbitMQ (one-shot job).

Run by the ``broker-setup`` service of docker-compose.yml (vison image) once RabbitMQ is healthy,
through the management HTTP API with the administrator account. Idempotent: running it again
updates passwords and re-applies the definitions.

1. one user per service, ``vison-<service>`` (ingest, validator, analyzer, metatest, catalogue,
   scriptgen), password ``BROKER_<SERVICE>_PASSWORD`` (a service whose password is not set is
   skipped: it is not deployed), with least privilege (:func:`shared.topology.service_permissions`):
   configure / write / read only on the exchanges, the dead-letter queue, its own queues and the
   queues it feeds, and **topic permissions** on the ``vison`` exchange: it may publish only the
   routing keys of the event kinds it produces and bind only its queues' patterns;
2. user ``analyst`` (read-only subscriber), password ``BROKER_ANALYST_PASSWORD``: may read the
   ``vison`` exchange and declare / consume its own queues (server-named ``amq.gen-*`` or
   ``analyst.*``), nothing else;
3. ``definitions.json`` beside this file: the ``vison`` topic exchange, the dead-letter fanout
   exchange ``vison.dlx`` and queue ``vison.dead``, every queue of ``shared/topology.py`` with its
   bindings exactly as ``shared/bus.py`` declares them (quorum, dead-lettered to ``vison.dlx``,
   delivery limit) and the ``vison-dead-letter`` policy (safety net for queues declared without
   arguments).

Environment: ``RABBITMQ_MANAGEMENT_URL`` (default ``http://rabbitmq:15672``),
``RABBITMQ_ADMIN_USER``, ``RABBITMQ_ADMIN_PASSWORD``, ``BROKER_<SERVICE>_PASSWORD``,
``BROKER_ANALYST_PASSWORD``; ``--wait SECONDS`` for the API to answer (default 120).
Standard library plus ``shared.topology`` (installed in the vison image; from a checkout, the
repository root is put on the path).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
DEFINITIONS = HERE / "definitions.json"
VHOST = "/"

if str(HERE.parents[1]) not in sys.path and (HERE.parents[1] / "shared" / "topology.py").is_file():
    sys.path.insert(0, str(HERE.parents[1]))  # running from a checkout

EXCHANGE = "vison"
ANALYST: dict[str, str] = {
    "configure": r"^(amq\.gen-.*|analyst\..*)$",
    "write": r"^(amq\.gen-.*|analyst\..*)$",
    "read": r"^(vison|amq\.gen-.*|analyst\..*)$",
}


def service_users() -> dict[str, tuple[str, dict[str, Any]]]:
    """``vison-<service>`` -> (password variable, permissions incl. ``topic``), least privilege."""
    from shared.config import Settings
    from shared.topology import service_permissions

    settings = Settings(_env_file=None, exchange=EXCHANGE, queue_prefix="vison")
    return {f"vison-{svc}": (f"BROKER_{svc.upper()}_PASSWORD", perms)
            for svc, perms in service_permissions(settings).items()}


class SetupError(RuntimeError):
    pass


class Api:
    """Minimal client of the RabbitMQ management HTTP API (basic auth, JSON)."""

    def __init__(self, base_url: str, user: str, password: str, timeout: float = 10.0):
        self.base = base_url.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode() or "null"
        except urllib.error.HTTPError as exc:
            raise SetupError(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')[:300]}") from None
        return json.loads(text) if text.strip() else None

    def wait(self, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self.call("GET", "/api/overview")
            except SetupError:
                raise  # the API answers: wrong credentials are not worth waiting for
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SetupError(f"management API at {self.base} did not answer in {seconds:.0f} s: {exc}") from None
                time.sleep(2)


def setup(api: Api, env: Mapping[str, str], definitions: dict[str, Any]) -> list[str]:
    """Apply users, permissions and definitions; returns a log of what was done."""
    done = []
    vhost = quote(VHOST, safe="")
    users = dict(service_users())
    users["analyst"] = ("BROKER_ANALYST_PASSWORD", ANALYST)
    if not env.get("BROKER_ANALYST_PASSWORD", ""):
        raise SetupError("BROKER_ANALYST_PASSWORD is not set (see .env.example)")
    if not any(env.get(var, "") for user, (var, _) in users.items() if user != "analyst"):
        raise SetupError("no BROKER_<SERVICE>_PASSWORD is set (see .env.example)")
    for user, (var, perms) in users.items():
        password = env.get(var, "")
        if not password:
            done.append(f"user {user} skipped ({var} not set)")
            continue
        api.call("PUT", f"/api/users/{quote(user, safe='')}", {"password": password, "tags": ""})
        api.call("PUT", f"/api/permissions/{vhost}/{quote(user, safe='')}",
                 {k: perms[k] for k in ("configure", "write", "read")})
        if "topic" in perms:
            api.call("PUT", f"/api/topic-permissions/{vhost}/{quote(user, safe='')}",
                     {"exchange": EXCHANGE, **perms["topic"]})
        done.append(f"user {user}")
    api.call("POST", "/api/definitions", definitions)
    done.append(f"definitions: {len(definitions.get('exchanges', []))} exchanges, {len(definitions.get('queues', []))} queues, "
                f"{len(definitions.get('policies', []))} policies")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="create the vison users and topology on RabbitMQ")
    parser.add_argument("--url", default=os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://rabbitmq:15672"))
    parser.add_argument("--definitions", type=Path, default=DEFINITIONS)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the management API")
    args = parser.parse_args(argv)
    admin, password = os.environ.get("RABBITMQ_ADMIN_USER", ""), os.environ.get("RABBITMQ_ADMIN_PASSWORD", "")
    if not admin or not password:
        print("setup_broker: RABBITMQ_ADMIN_USER and RABBITMQ_ADMIN_PASSWORD are required", file=sys.stderr)
        return 2
    api = Api(args.url, admin, password)
    try:
        api.wait(args.wait)
        for line in setup(api, os.environ, json.loads(args.definitions.read_text())):
            print(f"setup_broker: {line}")
    except SetupError as exc:
        print(f"setup_broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

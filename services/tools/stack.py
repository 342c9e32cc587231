"""``vison stack up [--data DIR]``: run every implemented service as a local process against the
configured broker (VISON_AMQP_URL), each with its metrics port (ingest 9101, validator 9102,
analyzer 9103, metatest 9104, scriptgen 9105), until Ctrl-C / SIGTERM; then SIGTERM to every
service (each finishes its current message), SIGKILL after a grace period. The broker topology
(:func:`shared.topology.declare_all`) is declared before any service starts, so that nothing
published at start-up is lost. A service that dies is restarted with backoff, except one that
exited 78 (EX_CONFIG: the broker refused its declarations; restarting would only loop)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("vison.stack")

EX_CONFIG = 78  # a service's configuration error (shared.bus.BrokerConfigError): never restarted

#: name, metrics port, extra arguments
SERVICES: list[tuple[str, int, list[str]]] = [
    ("ingest", 9101, []),
    ("validator", 9102, []),
    ("analyzer", 9103, []),
    ("metatest", 9104, []),
    ("scriptgen", 9105, ["--serve"]),
    ("catalogue", 9106, []),
]


def available_services() -> list[str]:
    """Services whose ``services.<name>.main`` module exists and that ``vison`` knows."""
    from services.cli import COMMANDS

    out = []
    for name, _, _ in SERVICES:
        if name in COMMANDS and importlib.util.find_spec(f"services.{name}.main") is not None:
            out.append(name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Child:
    name: str
    port: int
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    failed_config: bool = False  # exited 78: not restarted
    log_file: IO | None = field(default=None, repr=False)


class Stack:
    """The services as child processes (own process groups: a terminal's Ctrl-C reaches only the
    stack, which then stops them in order)."""

    def __init__(self, services: list[str] | None = None, env: dict[str, str] | None = None,
                 data: str | None = None, ports: dict[str, int] | None = None, log_dir: Path | None = None,
                 restart: bool = True, extra_args: dict[str, list[str]] | None = None):
        names = services or available_services()
        table = {name: (port, args) for name, port, args in SERVICES}
        self.children = [
            _Child(name, (ports or {}).get(name, table[name][0]), table[name][1] + (extra_args or {}).get(name, []))
            for name in names
        ]
        self.env = dict(os.environ)
        self.env.update(env or {})
        if data:
            self.env["VISON_DATA_ROOT"] = str(Path(data).resolve())
        self.log_dir = log_dir
        self.restart = restart

    def _spawn(self, child: _Child) -> None:
        env = dict(self.env, VISON_METRICS_PORT=str(child.port))
        cmd = [sys.executable, "-m", "services.cli", child.name, *child.args]
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if child.log_file is None:
                child.log_file = open(self.log_dir / f"{child.name}.log", "ab")
            out = child.log_file
        child.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                      start_new_session=True)
        log.info("started %s (pid %d, metrics :%d)", child.name, child.proc.pid, child.port)

    def declare_topology(self) -> list[str]:
        """Declare the exchange, dead letters and every service queue with its bindings (the
        stack's environment), before any service starts. Raises BrokerConfigError (status 78)."""
        from shared.config import Settings
        from shared.topology import declare_all

        env = {k[len("VISON_"):].lower(): v for k, v in self.env.items() if k.startswith("VISON_")}
        settings = Settings(**{k: v for k, v in env.items() if k in Settings.model_fields})
        return declare_all(settings)

    def start(self, declare: bool = True) -> None:
        """Declare the topology (``declare``), then start every service."""
        if declare:
            from shared.bus import BrokerConfigError

            try:
                self.declare_topology()
            except BrokerConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - no broker yet: each service declares its own on connect
                log.warning("topology not declared before start (%s: %s)", exc.__class__.__name__, exc)
        for child in self.children:
            self._spawn(child)

    def config_failures(self) -> list[str]:
        """Services that exited 78 (configuration error) and are not restarted."""
        return [c.name for c in self.children if c.failed_config]

    def poll(self) -> None:
        """Restart services that died (backoff 1 s, 2 s, ... 30 s)."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if not self.restart or child.failed_config:
                continue
            if child.proc.returncode == EX_CONFIG:
                child.failed_config = True
                log.error("%s exited with status 78 (configuration error, see its log); not restarted", child.name)
                continue
            if child.next_start == 0.0:
                delay = min(30.0, 2.0 ** child.restarts)
                child.next_start = now + delay
                log.warning("%s exited with %s; restarting in %.0f s", child.name, child.proc.returncode, delay)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self._spawn(child)

    def running(self) -> dict[str, int | None]:
        return {c.name: (c.proc.pid if c.proc and c.proc.poll() is None else None) for c in self.children}

    def stop(self, grace: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every service, wait up to ``grace`` s, SIGKILL the rest; returns exit codes."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        codes: dict[str, int | None] = {}
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killed", child.name, grace)
                child.proc.kill()
                child.proc.wait(10)
            codes[child.name] = child.proc.returncode
            if child.log_file is not None:
                child.log_file.close()
                child.log_file = None
        return codes

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "list"], help="up: run the services; list: show what would run")
    parser.add_argument("--data", default=None, help="data root to watch (default VISON_DATA_ROOT)")
    parser.add_argument("--services", default=None, help="comma-separated subset (default: every implemented service)")
    parser.add_argument("--logs", default=None, type=Path, help="write each service's log to DIR/<service>.log")
    parser.add_argument("--no-restart", action="store_true", help="do not restart a service that dies")


def run(args: argparse.Namespace) -> int:
    names = available_services()
    if args.services:
        wanted = [s.strip() for s in args.services.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            print(f"vison stack: not available: {', '.join(unknown)} (available: {', '.join(names)})", file=sys.stderr)
            return 2
        names = wanted
    table = {name: port for name, port, _ in SERVICES}
    if args.action == "list":
        for name in names:
            print(f"{name:<10} metrics :{table[name]}")
        return 0
    stop = {"flag": False}

    def handler(*_):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stack = Stack(names, data=args.data, log_dir=args.logs, restart=not args.no_restart)
    from shared.config import get_settings

    settings = get_settings()
    print(f"vison stack: {', '.join(f'{n} (:{table[n]})' for n in names)} on exchange {settings.exchange}; "
          f"data {stack.env.get('VISON_DATA_ROOT', settings.data_root)}. Ctrl-C to stop.", flush=True)
    from shared.bus import BrokerConfigError, mask_url

    try:
        queues = stack.declare_topology()
    except BrokerConfigError as exc:
        print(f"vison stack: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except Exception as exc:  # noqa: BLE001 - no broker yet: the services wait for it themselves
        queues = []
        print(f"vison stack: could not declare the topology on {mask_url(settings.amqp_url)} ({exc.__class__.__name__}); "
              "the services declare their queues when the broker answers", file=sys.stderr, flush=True)
    if queues:
        log.info("topology declared: %s", ", ".join(queues))
    stack.start(declare=False)
    try:
        while not stop["flag"]:
            time.sleep(0.5)
            stack.poll()
            if len(stack.config_failures()) == len(stack.children):
                break  # every service has stopped on a configuration error
    finally:
        codes = stack.stop()
        print("vison stack: stopped (" + ", ".join(f"{k} {v}" for k, v in codes.items()) + ")", flush=True)
    return EX_CONFIG if stack.config_failures() else 0

"""``vison grafana publish --url URL``: push the vison dashboards to a running Grafana.

The compose stack provisions the boards itself (deploy/grafana/provisioning); this command is for
a Grafana that runs elsewhere in the lab. It creates (or reuses) a folder, then posts every
dashboard JSON of ``deploy/grafana/dashboards`` with ``overwrite`` (the same uid replaces the
previous version), through the grafana-client package.

Credentials never go on the command line: a service-account token in ``GRAFANA_TOKEN``, or a
login ``--user`` / ``GRAFANA_USER`` with the password in ``GRAFANA_PASSWORD``.

The boards query the Prometheus data source uid ``vison-prometheus``; on a Grafana whose
Prometheus data source has another uid, pass ``--datasource-uid UID`` (every reference is
rewritten before the upload).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

#: uid of the provisioned Prometheus data source the committed boards reference.
BOARD_DATASOURCE_UID = "vison-prometheus"
DEFAULT_DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"


class PublishError(RuntimeError):
    """Bad input (no dashboards, no credentials) or a refused request."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    pub = sub.add_parser("publish", help="create/update the vison dashboards on a Grafana server")
    pub.add_argument("--url", required=True, help="Grafana base URL, e.g. http://grafana.lab:3000")
    pub.add_argument("--user", default=os.environ.get("GRAFANA_USER"),
                     help="login (default GRAFANA_USER; password from GRAFANA_PASSWORD). "
                          "Without it, the token in GRAFANA_TOKEN is used")
    pub.add_argument("--folder", default="vison", help="folder title (default vison)")
    pub.add_argument("--folder-uid", default="vison", help="folder uid (default vison)")
    pub.add_argument("--datasource-uid", default=BOARD_DATASOURCE_UID,
                     help=f"uid of the Prometheus data source on that Grafana (default {BOARD_DATASOURCE_UID})")
    pub.add_argument("--dashboards", type=Path, default=DEFAULT_DASHBOARDS,
                     help="folder of dashboard JSON files (default: the repository's deploy/grafana/dashboards)")
    pub.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds (10)")
    pub.add_argument("--dry-run", action="store_true", help="list what would be published, send nothing")


def load_dashboards(folder: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` dashboard model of a folder and its sub-folders (the SQL boards of the
    catalogue live in ``catalogue/``), sorted by path."""
    if not folder.is_dir():
        raise PublishError(f"dashboard folder {folder} not found (pass --dashboards DIR)")
    boards = []
    for path in sorted(folder.rglob("*.json")):
        try:
            model = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PublishError(f"{path}: not JSON ({exc})") from None
        if not isinstance(model, dict) or not model.get("uid") or "panels" not in model:
            raise PublishError(f"{path}: not a dashboard model (uid and panels required)")
        boards.append(model)
    if not boards:
        raise PublishError(f"no *.json dashboards in {folder}")
    return boards


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def retarget(model: dict[str, Any], datasource_uid: str) -> dict[str, Any]:
    """A copy of a dashboard whose Prometheus data-source references use ``datasource_uid``."""
    out = copy.deepcopy(model)
    out.pop("id", None)  # Grafana assigns ids; the uid identifies the board
    if datasource_uid == BOARD_DATASOURCE_UID:
        return out
    for node in _walk(out):
        ds = node.get("datasource")
        if isinstance(ds, dict) and ds.get("uid") == BOARD_DATASOURCE_UID:
            ds["uid"] = datasource_uid
    return out


def credential_from_env(user: str | None, env: dict[str, str] | os._Environ = os.environ) -> str | tuple[str, str]:
    """``(user, password)`` when a user is given, else the token; PublishError when neither is set."""
    if user:
        password = env.get("GRAFANA_PASSWORD", "")
        if not password:
            raise PublishError("GRAFANA_PASSWORD is not set (needed with --user / GRAFANA_USER)")
        return (user, password)
    token = env.get("GRAFANA_TOKEN", "")
    if not token:
        raise PublishError("no credentials: set GRAFANA_TOKEN (service-account token) or GRAFANA_USER + GRAFANA_PASSWORD")
    return token


def ensure_folder(api, uid: str, title: str) -> str:
    """The uid of folder ``uid``, created with ``title`` when missing."""
    from grafana_client.client import GrafanaClientError

    try:
        api.folder.get_folder(uid)
        return uid
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
    created = api.folder.create_folder(title, uid=uid)
    return created.get("uid", uid) if isinstance(created, dict) else uid


def publish(api, boards: list[dict[str, Any]], folder_uid: str, datasource_uid: str) -> list[dict[str, Any]]:
    """POST every board (overwrite); returns Grafana's answers (uid, url, version, status)."""
    results = []
    for model in boards:
        payload = {"dashboard": retarget(model, datasource_uid), "folderUid": folder_uid, "overwrite": True,
                   "message": "vison grafana publish"}
        answer = api.dashboard.update_dashboard(payload)
        results.append(answer if isinstance(answer, dict) else {"uid": model["uid"]})
    return results


def run(args: argparse.Namespace) -> int:
    try:
        boards = load_dashboards(args.dashboards)
        if args.dry_run:
            for model in boards:
                print(f"would publish {model['uid']:<22} {model.get('title', '')} ({len(model['panels'])} panels) "
                      f"into folder {args.folder_uid!r}, data source {args.datasource_uid!r}")
            return 0
        credential = credential_from_env(args.user)
    except PublishError as exc:
        print(f"vison grafana: {exc}", file=sys.stderr)
        return 2
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    api = GrafanaApi.from_url(args.url, credential=credential, timeout=args.timeout)
    try:
        folder_uid = ensure_folder(api, args.folder_uid, args.folder)
        results = publish(api, boards, folder_uid, args.datasource_uid)
    except GrafanaException as exc:
        print(f"vison grafana: {args.url}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, DNS
        print(f"vison grafana: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    base = args.url.rstrip("/")
    for model, answer in zip(boards, results):
        url = answer.get("url") or f"/d/{model['uid']}"
        print(f"published {model['uid']:<22} version {answer.get('version', '?')}  {base}{url}")
    return 0

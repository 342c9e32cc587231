"""``vison grafana publish``: a real HTTP round trip (grafana-client) against a small fake
Grafana on localhost that records the folder and dashboard requests."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from services.cli import main as vison

REPO = Path(__file__).resolve().parents[1]
BOARDS = REPO / "deploy" / "grafana" / "dashboards"
N_BOARDS = len(list(BOARDS.rglob("*.json")))  # Prometheus boards + the catalogue's SQL boards (catalogue/)


class FakeGrafana(BaseHTTPRequestHandler):
    requests: list[dict] = []
    folders: dict[str, dict] = {}
    token = "glsa_test"

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        auth = self.headers.get("Authorization", "")
        self.requests.append({"method": self.command, "path": self.path, "auth": auth, "body": body})
        ok = auth == f"Bearer {self.token}" or auth == "Basic " + base64.b64encode(b"admin:pw").decode()
        if not ok:
            return self._reply(401, {"message": "Unauthorized"})
        if self.command == "GET" and self.path.startswith("/api/folders/"):
            uid = self.path.rsplit("/", 1)[1]
            if uid in self.folders:
                return self._reply(200, self.folders[uid])
            return self._reply(404, {"message": "folder not found"})
        if self.command == "POST" and self.path == "/api/folders":
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"], "id": 7}
            return self._reply(200, self.folders[body["uid"]])
        if self.command == "POST" and self.path == "/api/dashboards/db":
            uid = body["dashboard"]["uid"]
            return self._reply(200, {"id": 1, "uid": uid, "url": f"/d/{uid}/x", "status": "success", "version": 3})
        return self._reply(404, {"message": "not found"})

    do_GET = do_POST = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def grafana():
    FakeGrafana.requests, FakeGrafana.folders = [], {}
    server = HTTPServer(("127.0.0.1", 0), FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", FakeGrafana
    server.shutdown()
    server.server_close()


def test_publish_creates_folder_and_posts_every_dashboard(grafana, monkeypatch, capsys):
    url, fake = grafana
    monkeypatch.setenv("GRAFANA_TOKEN", "glsa_test")
    monkeypatch.delenv("GRAFANA_USER", raising=False)
    assert vison(["grafana", "publish", "--url", url]) == 0
    reqs = [(r["method"], r["path"]) for r in fake.requests]
    assert reqs == [("GET", "/api/folders/vison"), ("POST", "/api/folders")] + [("POST", "/api/dashboards/db")] * N_BOARDS
    assert all(r["auth"] == "Bearer glsa_test" for r in fake.requests)
    posts = [r["body"] for r in fake.requests if r["path"] == "/api/dashboards/db"]
    committed = {str(p.relative_to(BOARDS)): json.loads(p.read_text()) for p in BOARDS.rglob("*.json")}
    assert sorted(b["dashboard"]["uid"] for b in posts) == sorted(m["uid"] for m in committed.values())
    for body in posts:
        assert body["folderUid"] == "vison" and body["overwrite"] is True
        original = next(m for m in committed.values() if m["uid"] == body["dashboard"]["uid"])
        assert body["dashboard"] == original  # same model, data source uid untouched
    out = capsys.readouterr().out
    assert f"published vison-hk" in out and f"{url}/d/vison-hk/x" in out


def test_publish_reuses_folder_and_retargets_datasource(grafana, monkeypatch):
    url, fake = grafana
    fake.folders["lab"] = {"uid": "lab", "title": "Lab", "id": 3}
    monkeypatch.setenv("GRAFANA_PASSWORD", "pw")
    assert vison(["grafana", "publish", "--url", url, "--user", "admin", "--folder-uid", "lab",
                  "--datasource-uid", "P1809F7CD0C75ACF3"]) == 0
    assert [r["path"] for r in fake.requests].count("/api/folders") == 0  # folder exists: not created
    posts = [r["body"] for r in fake.requests if r["path"] == "/api/dashboards/db"]
    assert len(posts) == N_BOARDS
    text = json.dumps(posts)
    assert "vison-prometheus" not in text and text.count("P1809F7CD0C75ACF3") > 100
    assert all(p["folderUid"] == "lab" for p in posts)


def test_publish_without_credentials_or_with_wrong_ones_fails(grafana, monkeypatch, capsys):
    url, fake = grafana
    for var in ("GRAFANA_TOKEN", "GRAFANA_USER", "GRAFANA_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    assert vison(["grafana", "publish", "--url", url]) == 2
    assert "GRAFANA_TOKEN" in capsys.readouterr().err
    assert fake.requests == []
    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert vison(["grafana", "publish", "--url", url]) == 1
    assert "Unauthorized" in capsys.readouterr().err


def test_publish_dry_run_and_bad_folder(tmp_path, capsys):
    assert vison(["grafana", "publish", "--url", "http://127.0.0.1:9", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would publish") == N_BOARDS
    (tmp_path / "x.json").write_text('{"title": "no uid"}')
    assert vison(["grafana", "publish", "--url", "http://127.0.0.1:9", "--dashboards", str(tmp_path), "--dry-run"]) == 2
    assert "not a dashboard model" in capsys.readouterr().err


def test_publish_unreachable_grafana(monkeypatch, capsys):
    monkeypatch.setenv("GRAFANA_TOKEN", "t")
    assert vison(["grafana", "publish", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err

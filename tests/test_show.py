"""``vison show OBSID|latest`` against a real SAMP hub started here (web profile off, lock file in
a temporary folder) and a SAMP client standing in for ds9, which records the ``image.load.fits``
notifications it receives: the 3 frames of the exposure, found through the catalogue or the
exposure logs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.catalogue import synthetic as syn
from services.catalogue.store import Catalogue
from services.cli import main
from services.tools.show import MTYPE, samp_module


@pytest.fixture
def hub(tmp_path):
    samp = samp_module()
    lock = tmp_path / "samp-hub.lock"
    server = samp.SAMPHubServer(web_profile=False, lockfile=str(lock), label="vison-test")
    server.start(wait=False)
    try:
        yield lock
    finally:
        server.stop()


class Viewer:
    """A SAMP client subscribed to image.load.fits, like ds9."""

    def __init__(self, lock: Path):
        samp = samp_module()
        self.received: list[dict] = []
        self.cond = threading.Condition()
        self.client = samp.SAMPIntegratedClient(name="fake-ds9")
        self.client.connect(hub_params=samp.lockfile_helpers.read_lockfile(str(lock)))
        self.client.bind_receive_notification(MTYPE, self._on_notification)

    def _on_notification(self, private_key, sender_id, mtype, params, extra):
        with self.cond:
            self.received.append({"mtype": mtype, **params})
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 20.0) -> list[dict]:
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.received) < n and time.monotonic() < end:
                self.cond.wait(max(0.05, end - time.monotonic()))
            return list(self.received)

    def close(self):
        self.client.disconnect()


def _frames(data_root: Path, ev) -> list[Path]:
    paths = []
    for ref in ev.files:
        path = data_root / ref.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fits.HDUList([fits.PrimaryHDU(np.full((8, 8), ref.ccd, dtype=np.uint16))]).writeto(path)
        paths.append(path)
    return paths


def test_show_latest_from_the_catalogue_reaches_the_viewer(hub, tmp_path, capsys):
    data = tmp_path / "data"
    url = f"sqlite:///{tmp_path / 'cat.sqlite'}"
    with Catalogue(url) as cat:
        cat.add(syn.exposure(5))
        latest = syn.exposure(6, test="PTC01")
        cat.add(latest)
    paths = _frames(data, latest)
    viewer = Viewer(hub)
    try:
        assert main(["show", "latest", "--data", str(data), "--url", url, "--hub", str(hub)]) == 0
        got = viewer.wait(3)
    finally:
        viewer.close()
    assert [g["mtype"] for g in got] == [MTYPE] * 3
    got.sort(key=lambda g: g["url"])  # the hub delivers notifications concurrently: any order
    assert [g["url"] for g in got] == [p.resolve().as_uri() for p in paths]
    assert [g["name"] for g in got] == [p.name for p in paths] and got[2]["name"].endswith("_CCD3.fits")
    assert [g["image-id"] for g in got] == [p.stem for p in paths]
    assert "ObsID 6 PTC01 BORN: 3 frames sent to 1 SAMP client(s) (catalogue)" in capsys.readouterr().out


def test_show_obsid_from_the_exposure_logs(hub, tmp_path, capsys):
    from tests.test_ingest_data import write_exposure

    data = tmp_path / "data"
    write_exposure(data, 21, size="tiny")
    info = write_exposure(data, 22, size="tiny", test="FLAT01")
    viewer = Viewer(hub)
    try:
        no_catalogue = f"sqlite:///{tmp_path / 'none.sqlite'}"
        assert main(["show", "21", "--data", str(data), "--url", no_catalogue, "--hub", str(hub)]) == 0
        got = viewer.wait(3)
        assert main(["show", "latest", "--data", str(data), "--url", no_catalogue, "--hub", str(hub)]) == 0
        got = viewer.wait(6)
    finally:
        viewer.close()
    assert not (tmp_path / "none.sqlite").exists()
    first = sorted(g["url"] for g in got[:3])
    assert first == sorted(p.resolve().as_uri() for p in (data / info["folder"].name).glob("EUC_21_*.fits"))
    assert len(first) == 3
    assert sorted(g["url"] for g in got[3:]) == [info["files"][c].resolve().as_uri() for c in (1, 2, 3)]
    assert "ObsID 22 FLAT01" in capsys.readouterr().out


def test_show_errors(hub, tmp_path, capsys):
    data = tmp_path / "data"
    url = f"sqlite:///{tmp_path / 'cat.sqlite'}"
    with Catalogue(url) as cat:
        ev = syn.exposure(7)
        cat.add(ev)
    assert main(["show", "99", "--data", str(data), "--url", url, "--hub", str(hub)]) == 2
    assert "exposure 99 not found" in capsys.readouterr().err
    assert main(["show", "7", "--data", str(data), "--url", url, "--hub", str(hub)]) == 2
    assert "frame(s) not found" in capsys.readouterr().err
    _frames(data, ev)
    assert main(["show", "7", "--data", str(data), "--url", url, "--hub", str(hub)]) == 3  # nobody listens
    assert "no SAMP client listens to image.load.fits" in capsys.readouterr().err
    assert main(["show", "x7", "--data", str(data), "--url", url]) == 2
    assert "OBSID must be a number" in capsys.readouterr().err
    assert main(["show", "7", "--data", str(data), "--url", url, "--hub", str(tmp_path / "nohub.lock")]) == 3
    assert "no SAMP hub" in capsys.readouterr().err

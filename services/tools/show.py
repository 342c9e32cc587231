"""``vison show OBSID|latest``: send an exposure's 3 CCD frames to the image viewers listening on
SAMP (ds9, Aladin, TOPCAT): one ``image.load.fits`` notification per frame to every subscribed
client - Eyegore's double-click-to-ds9.

The frames are found through the results catalogue (``exposures``: paths relative to the data
root), or, when the catalogue does not know the exposure, through the exposure logs of the day
folders under the data root. The SAMP hub is the running one (``SAMP_HUB`` or ``~/.samp``), or
the one of ``--hub LOCKFILE``. Exit status: 0 sent, 2 exposure or files not found, 3 no hub or
no viewer listening.

    vison show latest [--block BORN]
    vison show 191 --data /srv/elvis/data --hub ~/.samp
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger("vison.show")
MTYPE = "image.load.fits"


class ShowError(Exception):
    """Why nothing was shown; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2):
        self.status = status
        super().__init__(message)


class ExposureFiles(BaseModel):
    """The 3 frames of one exposure (absolute paths, CCD1..3) and where they were found."""

    obsid: int
    block: str = ""
    test: str = ""
    files: list[Path]
    source: str


def samp_module() -> Any:
    """``pyvo.samp`` (astropy.samp's successor), else ``astropy.samp``."""
    try:
        import pyvo.samp as samp
    except ImportError:  # pragma: no cover - pyvo is a dependency
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import astropy.samp as samp
    return samp


def _parse_target(target: str) -> int | None:
    if target == "latest":
        return None
    try:
        return int(target)
    except ValueError:
        raise ShowError(f"OBSID must be a number or 'latest', got {target!r}") from None


def from_catalogue(url: str, obsid: int | None, block: str | None, data_root: Path) -> ExposureFiles | None:
    from services.catalogue.store import Catalogue

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return None  # no catalogue yet: do not create an empty one
    try:
        with Catalogue(url, create=False) as cat:
            row = cat.exposure(obsid, block)
    except Exception as exc:  # no catalogue yet, database down: try the logs
        log.info("catalogue %s not usable (%s): looking in the exposure logs", url.split("@")[-1], exc.__class__.__name__)
        return None
    if row is None:
        return None
    files = [data_root / f["path"] for f in sorted(row.files, key=lambda f: f.get("ccd") or 0)]
    return ExposureFiles(obsid=row.obsid, block=row.block, test=row.test, files=files, source="catalogue")


def from_logs(data_root: Path, obsid: int | None) -> ExposureFiles | None:
    """The exposure (the highest ObsID of the newest log for ``latest``) from the exposure logs."""
    from shared.explog import ExpLogFormatError, read_explog

    logs = sorted(data_root.glob("*/EXP_LOG_*.txt"), key=lambda p: p.stat().st_mtime)
    for path in reversed(logs):
        try:
            explog = read_explog(path)
        except (ExpLogFormatError, OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        wanted = obsid if obsid is not None else (max(explog.obsids) if explog.obsids else None)
        rows = explog.rows_of(wanted) if wanted is not None else []
        if rows:
            rows = sorted(rows, key=lambda r: r.ccd or 0)
            files = [path.parent / (r.file_name if r.file_name.endswith(".fits") else f"{r.file_name}.fits") for r in rows]
            return ExposureFiles(obsid=wanted, test=rows[0].test, files=files, source=str(path))
    return None


def find_exposure(target: str, data_root: Path, catalogue_url: str | None, block: str | None = None) -> ExposureFiles:
    obsid = _parse_target(target)
    found = from_catalogue(catalogue_url, obsid, block, data_root) if catalogue_url else None
    found = found or from_logs(data_root, obsid)
    if found is None:
        raise ShowError(f"exposure {target} not found in the catalogue nor in the exposure logs under {data_root}")
    missing = [str(p) for p in found.files if not p.is_file()]
    if missing:
        raise ShowError(f"ObsID {found.obsid}: frame(s) not found: {', '.join(missing)}")
    return found


def send_frames(files: list[Path], hub: Path | None = None, name: str = "vison show") -> list[str]:
    """Notify every client subscribed to ``image.load.fits`` of each frame; their ids."""
    samp = samp_module()
    client = samp.SAMPIntegratedClient(name=name, description="vison: Euclid VIS calibration pipeline")
    try:
        params = samp.lockfile_helpers.read_lockfile(str(hub)) if hub else None
        client.connect(hub_params=params)
    except Exception as exc:
        raise ShowError(f"no SAMP hub{f' at {hub}' if hub else ''}: {exc} (start ds9, Aladin or TOPCAT, "
                        "which run one)", status=3) from None
    try:
        listeners = sorted(client.get_subscribed_clients(MTYPE))
        if not listeners:
            raise ShowError(f"no SAMP client listens to {MTYPE} (start ds9, Aladin or TOPCAT)", status=3)
        for path in files:
            client.notify_all({"samp.mtype": MTYPE, "samp.params": {
                "url": path.resolve().as_uri(), "name": path.name, "image-id": path.stem}})
        return listeners
    finally:
        client.disconnect()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="OBSID|latest", help="an ObsID, or 'latest'")
    parser.add_argument("--block", default=None, help="the block (when several share the catalogue)")
    parser.add_argument("--data", type=Path, default=None, help="data root (default VISON_DATA_ROOT)")
    parser.add_argument("--url", default=None, help="catalogue URL (default VISON_CATALOGUE_URL)")
    parser.add_argument("--hub", type=Path, default=None, help="SAMP hub lock file (default SAMP_HUB or ~/.samp)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the frames, send nothing")


def run(args: argparse.Namespace) -> int:
    from services.catalogue.store import catalogue_url
    from shared.config import get_settings

    settings = get_settings()
    data_root = Path(args.data or settings.data_root).resolve()
    try:
        exposure = find_exposure(args.target, data_root, args.url or catalogue_url(settings), args.block)
        if args.print_only:
            for path in exposure.files:
                print(path)
            return 0
        listeners = send_frames(exposure.files, args.hub)
    except ShowError as exc:
        print(f"vison show: {exc}", file=sys.stderr)
        return exc.status
    print(f"ObsID {exposure.obsid} {exposure.test} {exposure.block}: {len(exposure.files)} frames sent to "
          f"{len(listeners)} SAMP client(s) ({exposure.source})")
    return 0

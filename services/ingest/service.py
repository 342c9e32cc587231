"""The ingest service: watch the data root, assemble exposures, publish ``exposure.ingested``,
tail the daily HK files.

- **Discovery**: watchdog events on the data root (day folders, recursive) plus a periodic full
  rescan (network filesystems miss events, and a restart must catch up with what was written
  while ingest was down).
- **FITS**: counts once complete: size unchanged for ``stable_seconds`` and
  :func:`shared.fitsio.is_complete_fits`. A file that stays incomplete (or unreadable) for
  ``incomplete_timeout`` is reported (``processing.failed``, what = fits).
- **Exposure log**: rows only once their line is terminated (:class:`shared.explog.ExpLogTail`);
  unusable lines are reported (what = explog, where = file:line).
- **Exposure**: published when an ObsID has its 3 frames and 3 log rows, with the paths relative
  to the data root, SHA-256, the log rows and the per-exposure HK file when present. An ObsID
  still incomplete ``exposure_timeout`` after its last new part is reported (what = exposure);
  it is still published if it completes later.
- **Ledger** (SQLite in the state dir): published / reported items, hash cache, HK progress.
- **Paths** outside the data root (symlinks included) are refused and reported.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.ingest.hkmon import HKMonitor
from services.ingest.ledger import Ledger
from shared.checksum import sha256_file
from shared.bus import Publisher
from shared.config import Settings
from shared.events import ExposureIngested, FileRef, ProcessingFailed, derived_event_id
from shared.explog import ExpLogFormatError, ExpLogRow, ExpLogTail
from shared.filenames import classify, parse_fits_name, parse_hk_exposure_name
from shared.fitsio import FrameError, is_complete_fits, read_frame
from shared.hk import hk_limits
from shared.metrics import EXPOSURES_INGESTED, FILES_SEEN, HK_LIMIT, PROCESSING_SECONDS
from shared.paths import PathError, resolve_under
from shared.storage import BlockedState, StorageBlocked, blocked_reason

log = logging.getLogger("vison.ingest")

SERVICE = "ingest"
CCDS = (1, 2, 3)


@dataclass
class IngestOptions:
    rescan_interval: float = 5.0  # s between full rescans of the data root
    poll_interval: float = 0.1  # s between checks of pending files
    stable_seconds: float = 0.25  # a FITS size must not change for this long
    incomplete_timeout: float = 60.0  # s before an incomplete FITS is reported
    exposure_timeout: float = 120.0  # s before an incomplete exposure is reported
    hk_interval: float = 1.0  # s between polls of the daily HK files
    watch: bool = True  # use watchdog (rescans run anyway)


@dataclass
class _PendingFile:
    size: int
    since: float  # monotonic time the size was first seen
    first_seen: float
    reported: bool = False
    next_check: float = 0.0  # monotonic time of the next completeness check at this size


@dataclass
class _Exposure:
    obsid: int
    frames: dict[int, FileRef] = field(default_factory=dict)
    rows: dict[int, ExpLogRow] = field(default_factory=dict)
    hk: FileRef | None = None
    date: datetime | None = None
    roe: int = 1
    day: str = ""
    last_change: float = field(default_factory=time.monotonic)
    reported: bool = False
    sent_id: str | None = None  # published, not yet in the ledger (state folder full / read-only)

    def missing(self) -> list[str]:
        out = [f"frame CCD{c}" for c in CCDS if c not in self.frames]
        out += [f"log row CCD{c}" for c in CCDS if c not in self.rows]
        return out


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def open_ingest(settings: Settings, options: IngestOptions | None = None, stop: threading.Event | None = None,
                publisher: Publisher | None = None, max_wait: float = 30.0) -> "IngestService | None":
    """An :class:`IngestService`, waiting (backoff up to ``max_wait`` s, logged once, gauge
    ``vison_service_blocked``) while its state folder is read-only, full or not writable.
    None when ``stop`` is set meanwhile."""
    stop = stop or threading.Event()
    blocked = BlockedState(SERVICE, log)
    delay = 0.5
    while not stop.is_set():
        try:
            service = IngestService(settings, options, publisher)
        except Exception as exc:
            reason = blocked_reason(exc)
            if reason is None:
                raise
            if reason == "permission_denied" and os.path.exists(settings.state_dir) and \
                    os.statvfs(settings.state_dir).f_flag & os.ST_RDONLY:
                reason = "read_only"
            blocked.block(StorageBlocked("state", settings.state_dir, reason, f"{exc.__class__.__name__}: {exc}"))
            stop.wait(delay)
            delay = min(delay * 2, max_wait)
            continue
        blocked.clear()
        return service
    return None


class IngestService:
    def __init__(self, settings: Settings, options: IngestOptions | None = None, publisher: Publisher | None = None):
        self.settings = settings
        self.options = options or IngestOptions()
        self.root = Path(settings.data_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root_resolved = self.root.resolve()
        self.block = settings.block
        self.stop_event = threading.Event()
        self.publisher = publisher or Publisher(settings, SERVICE, stop=self.stop_event)
        self.ledger = Ledger(Path(settings.state_dir) / "ingest.sqlite")
        self.hk = HKMonitor(self.block, self.ledger, self._publish, self._report, SERVICE)
        self.pending: dict[str, _PendingFile] = {}
        self.exposures: dict[int, _Exposure] = {}
        self.logs: dict[str, ExpLogTail] = {}
        self.log_errors_reported: dict[str, int] = {}
        self.latest_row: dict[str, Any] = {}
        self.events: "queue.Queue[str]" = queue.Queue()
        self._observer = None
        self._last_rescan = 0.0
        self._last_hk = 0.0
        self.published = 0
        self.ready = threading.Event()
        self.blocked = BlockedState(SERVICE, log)  # state folder full / read-only: logged once, gauge
        self._blocked_writes = 0
        self._sent_reports: set[str] = set()  # published, not yet in the ledger
        self._hasher = ThreadPoolExecutor(max_workers=3, thread_name_prefix="sha")
        self._export_static_limits()

    # ------------------------------------------------------------------ lifecycle
    def stop(self, *_: Any) -> None:
        self.stop_event.set()

    def run(self) -> None:
        if hasattr(self.publisher, "connect"):  # declares the validator's queue first (exit 78 if refused)
            self.publisher.connect()
        self._start_watch()
        log.info("ingest: watching %s (block %s)", self.root_resolved, self.block)
        try:
            while not self.stop_event.is_set():
                try:
                    self.step()
                    if self.blocked.blocked and self.ledger.writes > self._blocked_writes:
                        self.blocked.clear()  # the ledger took a write again: the pending work went through
                except Exception as exc:  # a vanished file, a full disk...: log, keep watching
                    if self.stop_event.is_set():
                        break
                    reason = blocked_reason(exc)
                    if reason is not None:  # nothing is dropped: the work stays pending, retried each second
                        self.blocked.block(StorageBlocked("state", self.ledger.path.parent, reason,
                                                          f"{exc.__class__.__name__}: {exc}"))
                        self._blocked_writes = self.ledger.writes
                    else:
                        log.exception("ingest: error in the watch loop; continuing")
                    self.stop_event.wait(1.0)
                self.ready.set()
                try:
                    path = self.events.get(timeout=self.options.poll_interval)
                    self._touch(Path(path))
                except queue.Empty:
                    pass
                except OSError as exc:
                    log.warning("ingest: %s", exc)
        finally:
            self.close()

    def close(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(5)
            except Exception:
                pass
            self._observer = None
        self._hasher.shutdown(wait=True)
        self.publisher.close()
        self.ledger.close()
        log.info("ingest stopped (%d exposures published by this process)", self.published)

    def _start_watch(self) -> None:
        if not self.options.watch:
            return
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover
            return
        events = self.events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # noqa: D401 - watchdog callback
                if event.is_directory:
                    return
                for attr in ("src_path", "dest_path"):
                    path = getattr(event, attr, None)
                    if path:
                        events.put(os.fsdecode(path))

        try:
            observer = Observer()
            observer.schedule(Handler(), str(self.root), recursive=True)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception as exc:  # inotify limits, unsupported filesystem: rescans still run
            log.warning("watchdog unavailable (%s); relying on rescans every %.1f s", exc, self.options.rescan_interval)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> None:
        now = time.monotonic()
        if now - self._last_rescan >= self.options.rescan_interval:
            self._last_rescan = now
            t0 = time.perf_counter()
            self.rescan()
            PROCESSING_SECONDS.labels(service=SERVICE, step="rescan").observe(time.perf_counter() - t0)
        while True:
            try:
                self._touch(Path(self.events.get_nowait()))
            except queue.Empty:
                break
            except OSError as exc:  # the file went away meanwhile
                log.debug("ingest: %s", exc)
        self._check_pending()
        self._poll_logs()
        self._flush()
        if now - self._last_hk >= self.options.hk_interval:
            self._last_hk = now
            self.hk.poll(self.latest_row)
        self.publisher.tick()

    def rescan(self) -> None:
        """Walk the data root (day folders) and consider every file."""
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            depth = len(Path(dirpath).relative_to(self.root).parts)
            for d in list(dirnames):
                p = Path(dirpath) / d
                if p.is_symlink() and not self._inside(p):
                    self._report("path", self._rel(p), "symbolic link to a folder outside the data root: refused",
                                 f"path:{self._rel(p)}")
            if depth >= 3:
                dirnames[:] = []
            for name in filenames:
                try:
                    self._touch(Path(dirpath) / name)
                except OSError as exc:
                    log.debug("ingest: %s", exc)

    # ------------------------------------------------------------------ files
    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            try:
                return path.resolve().relative_to(self.root_resolved).as_posix()
            except ValueError:
                return str(path)

    def _inside(self, path: Path) -> bool:
        try:
            resolved = path.resolve()
        except OSError:
            return False
        return resolved == self.root_resolved or self.root_resolved in resolved.parents

    def _touch(self, path: Path) -> None:
        name = path.name
        if name.startswith(".") or name.endswith((".part", ".tmp", ".swp")):
            return
        if not path.is_absolute():
            path = self.root / path
        try:
            path.relative_to(self.root)
        except ValueError:
            try:
                path = self.root / path.relative_to(self.root_resolved)
            except ValueError:
                return
        rel = self._rel(path)
        if not path.exists() and not path.is_symlink():
            return
        kind = classify(name)
        if kind is None:
            if name.lower().endswith((".fits", ".fit", ".fits.gz")):
                self._report("fits", rel, "not an ELVIS FITS name (EUC_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>_CCD<c>.fits)",
                             f"name:{rel}")
            return
        if kind == "fits" and self.ledger.is_published(self.block, parse_fits_name(name).obsid):
            return  # cheap exit for the files of published exposures (every rescan sees them)
        if kind == "hk_exposure" and self.ledger.is_published(self.block, parse_hk_exposure_name(name).obsid):
            return
        if not self._inside(path):
            self._report("path", rel, "outside the data root (symbolic link): refused", f"path:{rel}")
            return
        if not path.is_file():
            return
        if kind == "fits":
            fn = parse_fits_name(name)
            if self.ledger.is_published(self.block, fn.obsid):
                return
            exp = self.exposures.get(fn.obsid)
            if exp is not None and exp.frames.get(fn.ccd) is not None and exp.frames[fn.ccd].path == rel:
                return
            if rel not in self.pending:
                now = time.monotonic()
                self.pending[rel] = _PendingFile(size=-1, since=now, first_seen=now)
        elif kind == "explog":
            if rel not in self.logs:
                self.logs[rel] = ExpLogTail(path)
                self.log_errors_reported[rel] = 0
        elif kind == "hk_daily":
            self.hk.add(path, rel)
        elif kind == "hk_exposure":
            hn = parse_hk_exposure_name(name)
            if self.ledger.is_published(self.block, hn.obsid):
                return
            exp = self._exposure(hn.obsid)
            if exp.hk is None or exp.hk.path != rel:
                st = path.stat()
                exp.hk = FileRef(ccd=None, path=rel, sha256="", size=st.st_size)

    def _check_pending(self) -> None:
        now = time.monotonic()
        complete: list[tuple[Path, str, os.stat_result]] = []
        for rel, pf in list(self.pending.items()):
            path = self.root / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                del self.pending[rel]
                continue
            if st.st_size != pf.size:
                pf.size, pf.since, pf.next_check, pf.reported = st.st_size, now, 0.0, False
                continue
            if now - pf.since < self.options.stable_seconds or now < pf.next_check or pf.reported:
                continue
            if is_complete_fits(path):
                del self.pending[rel]
                complete.append((path, rel, st))
                continue
            pf.next_check = now + min(1.0, max(self.options.poll_interval, (now - pf.since) / 4))
            if now - pf.since >= self.options.incomplete_timeout:
                pf.reported = True
                why = f"truncated or incomplete FITS after {now - pf.since:.0f} s: {self._why_incomplete(path)}"
                self._report("fits", rel, why, f"fits:{rel}:{st.st_size}")
        if complete:
            self._frames_complete(complete)

    @staticmethod
    def _why_incomplete(path: Path) -> str:
        try:
            read_frame(path, check_geometry=False)
        except FrameError as exc:
            return exc.reason
        except Exception as exc:  # pragma: no cover
            return f"unreadable: {exc}"
        return "not a complete FITS file (size is not a multiple of 2880 bytes)"

    def _frames_complete(self, complete: list[tuple[Path, str, os.stat_result]]) -> None:
        """Hash the frames that just became complete (in parallel: hashlib releases the GIL)."""
        complete_at = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        shas = [self.ledger.cached_sha(rel, st.st_size, st.st_mtime) for _, rel, st in complete]
        todo = [i for i, sha in enumerate(shas) if sha is None]
        for i, sha in zip(todo, self._hasher.map(_sha_or_none, [complete[i][0] for i in todo])):
            shas[i] = sha
            if sha is not None:
                _, rel, st = complete[i]
                self.ledger.store_sha(rel, st.st_size, st.st_mtime, sha)
        PROCESSING_SECONDS.labels(service=SERVICE, step="hash").observe(time.perf_counter() - t0)
        for (path, rel, st), sha in zip(complete, shas):
            if sha is not None:  # None: the file vanished meanwhile
                self._fits_complete(path, rel, st, sha, complete_at)

    def _fits_complete(self, path: Path, rel: str, st: os.stat_result, sha: str, complete_at: datetime) -> None:
        fn = parse_fits_name(path.name)
        FILES_SEEN.labels(kind="fits").inc()
        exp = self._exposure(fn.obsid)
        exp.frames[fn.ccd] = FileRef(ccd=fn.ccd, path=rel, sha256=sha, size=st.st_size, complete_at=complete_at)
        exp.date, exp.roe = fn.date, fn.roe
        exp.day = Path(rel).parent.as_posix()
        exp.last_change = time.monotonic()

    def _exposure(self, obsid: int) -> _Exposure:
        exp = self.exposures.get(obsid)
        if exp is None:
            exp = self.exposures[obsid] = _Exposure(obsid)
        return exp

    # ------------------------------------------------------------------ exposure logs
    def _poll_logs(self) -> None:
        for rel, tail in self.logs.items():
            try:
                rows = tail.poll()
            except ExpLogFormatError as exc:
                self._report("explog", rel, exc.reason, f"explog-header:{rel}")
                continue
            except OSError as exc:
                log.warning("exposure log %s: %s", rel, exc)
                continue
            done = self.log_errors_reported.get(rel, 0)
            for lineno, reason in tail.errors[done:]:
                self._report("explog", f"{rel}:{lineno}", f"unusable exposure-log line: {reason}",
                             f"explog-line:{rel}:{lineno}")
            self.log_errors_reported[rel] = len(tail.errors)
            if rows:
                FILES_SEEN.labels(kind="explog_row").inc(len(rows))
            for row in rows:
                self.latest_row = row.values
                if row.ccd is None or self.ledger.is_published(self.block, row.obsid):
                    continue
                exp = self._exposure(row.obsid)
                exp.rows[row.ccd] = row
                exp.last_change = time.monotonic()

    # ------------------------------------------------------------------ publishing
    def _flush(self) -> None:
        now = time.monotonic()
        for obsid, exp in list(self.exposures.items()):
            if not exp.missing():
                self._publish_exposure(exp)
                del self.exposures[obsid]
            elif not exp.reported and now - exp.last_change >= self.options.exposure_timeout:
                exp.reported = True
                missing = exp.missing()
                test = next((r.test for r in exp.rows.values() if r.test), None)
                where = f"{exp.day + '/' if exp.day else ''}ObsID {obsid}"
                why = f"incomplete exposure after {self.options.exposure_timeout:g} s: missing {', '.join(missing)}"
                if self.ledger.exposure_status(self.block, obsid) is None:
                    self._report("exposure", where, why, f"exposure:{obsid}", obsid=obsid, test=test)
                    self.ledger.mark_exposure(self.block, obsid, "failed")

    def _publish_exposure(self, exp: _Exposure) -> None:
        frames = [exp.frames[c] for c in CCDS]
        rows = [exp.rows[c] for c in CCDS]
        if exp.sent_id is not None:  # published before; only the ledger write is missing
            self.ledger.mark_exposure(self.block, exp.obsid, "published", exp.sent_id)
            exp.sent_id = None
            EXPOSURES_INGESTED.labels(block=self.block, test=rows[0].test or "UNKNOWN").inc()
            self.published += 1
            log.info("exposure.ingested ObsID %d recorded in the ledger (published before)", exp.obsid)
            return
        for ref in [*frames, *(() if exp.hk is None else (exp.hk,))]:
            try:
                resolve_under(self.root_resolved, ref.path)
            except PathError as exc:  # e.g. a symlink swapped in after the file was seen
                self._report("path", ref.path, f"outside the data root: refused ({exc.reason})", f"path:{ref.path}",
                             obsid=exp.obsid)
                return
        test = rows[0].test or next((r.test for r in rows if r.test), "") or "UNKNOWN"
        if exp.hk is not None and not exp.hk.sha256:
            path = self.root / exp.hk.path
            try:
                exp.hk = FileRef(ccd=None, path=exp.hk.path, sha256=sha256_file(path), size=path.stat().st_size)
            except OSError:
                exp.hk = None
        event = ExposureIngested(
            event_id=derived_event_id("exposure.ingested", self.block, exp.obsid, *(f.sha256 for f in frames)),
            producer=SERVICE,
            obsid=exp.obsid, block=self.block, roe=exp.roe, test=test, date=exp.date,
            files=frames, hk_file=exp.hk,
            explog=[r.values for r in rows],
            complete_at=max(f.complete_at for f in frames if f.complete_at),
        )
        t0 = time.perf_counter()
        self.publisher.publish(event)
        PROCESSING_SECONDS.labels(service=SERVICE, step="publish").observe(time.perf_counter() - t0)
        exp.sent_id = str(event.event_id)  # a failing ledger write below is retried without republishing
        self.ledger.mark_exposure(self.block, exp.obsid, "published", exp.sent_id)
        exp.sent_id = None
        EXPOSURES_INGESTED.labels(block=self.block, test=test).inc()
        self.published += 1
        log.info("exposure.ingested ObsID %d %s (%s)", exp.obsid, test, event.routing_key())

    def _publish(self, event) -> None:
        self.publisher.publish(event)

    def _report(self, what: str, where: str, why: str, key: str, **extra: Any) -> None:
        """Publish one ``processing.failed`` per distinct problem (kept across restarts)."""
        if self.ledger.was_reported(key):
            return
        if key not in self._sent_reports:
            log.warning("%s %s: %s", what, where, why)
            event = ProcessingFailed(
                event_id=derived_event_id("processing.failed", SERVICE, self.block, key),
                producer=SERVICE, service=SERVICE, what=what, where=where, why=why, block=self.block, **extra,
            )
            self.publisher.publish(event)
            self._sent_reports.add(key)
        self.ledger.mark_reported(key)  # may fail (state folder full): retried, not republished
        self._sent_reports.discard(key)

    @staticmethod
    def _export_static_limits() -> None:
        """Absolute (A) and identity (I) HK limits; relative ones follow the commanded values."""
        for kind in ("P", "S"):
            for key, limit in hk_limits(kind).items():
                if limit[0] == "A":
                    HK_LIMIT.labels(param=key, kind=kind, bound="lo").set(float(limit[1]))
                    HK_LIMIT.labels(param=key, kind=kind, bound="hi").set(float(limit[2]))
                elif limit[0] == "I":
                    HK_LIMIT.labels(param=key, kind=kind, bound="lo").set(float(limit[1]))
                    HK_LIMIT.labels(param=key, kind=kind, bound="hi").set(float(limit[1]))

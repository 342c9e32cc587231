"""Outputs on a full or read-only disk: a transient condition, not a bad message.

A write to the products or state folder that fails with ENOSPC (disk full), EDQUOT (quota),
EACCES / EPERM (permission denied) or EROFS (read-only file system) - or the SQLite
equivalents ("database or disk is full", "attempt to write a readonly database", ...) - is
turned into :class:`StorageBlocked`, a :class:`shared.bus.Retry`: a consumer leaves the message
unacknowledged and re-invokes the handler with backoff until the condition clears.

    from shared.storage import storage_guard
    with storage_guard("state", store_path):
        store.save(...)

Services that are not consumers (ingest) keep the work pending and use :class:`BlockedState`:
it logs the condition once (and once more when it clears) and sets the gauge
``vison_service_blocked{service,reason}`` (1 while blocked) that the ``VisonServiceBlocked``
alert watches.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator

try:  # the bus's "try again later" signal (shared/bus.py); a local stand-in until it lands
    from shared.bus import Retry  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the bus version

    class Retry(Exception):  # type: ignore[no-redef]
        """Stand-in for ``shared.bus.Retry``: a transient condition, try the message again later."""


log = logging.getLogger("vison.storage")

#: errno -> reason label of ``vison_service_blocked``
BLOCKING_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_quota",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "read_only",
}

#: SQLite message fragments (sqlite3.OperationalError has no errno) -> reason
_SQLITE_REASONS = (
    ("database or disk is full", "disk_full"),
    ("disk quota", "disk_quota"),
    ("readonly database", "read_only"),
    ("read-only", "read_only"),
    ("unable to open database file", "permission_denied"),
    ("permission denied", "permission_denied"),
    ("disk i/o error", "disk_io"),
)


class StorageBlocked(Retry):
    """An output could not be written for a reason that may clear by itself (disk full,
    permission denied, read-only): retry later. ``what`` (products / state / ...), ``path``,
    ``reason`` (label: disk_full, disk_quota, permission_denied, read_only, disk_io) and
    ``detail`` (the OS message)."""

    def __init__(self, what: str, path: object, reason: str, detail: str = ""):
        self.what = what
        self.path = str(path)
        self.os_error = detail
        self.message = f"{what} folder {self.path}: {reason.replace('_', ' ')} ({detail})"
        try:
            super().__init__(reason, self.message)  # shared.bus.Retry(reason, detail)
        except TypeError:  # pragma: no cover - the stand-in Retry
            Exception.__init__(self, self.message)
        self.reason = reason
        self.detail = self.message

    def __str__(self) -> str:
        return self.message


def blocked_reason(exc: BaseException) -> str | None:
    """The ``vison_service_blocked`` reason of an output error, None when it is not one of the
    transient storage conditions."""
    if isinstance(exc, OSError) and exc.errno in BLOCKING_ERRNOS:
        return BLOCKING_ERRNOS[exc.errno]
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        for fragment, reason in _SQLITE_REASONS:
            if fragment in text:
                return reason
    return None


def _read_only(path: str | os.PathLike) -> bool:
    """True when ``path`` (or its nearest existing parent) is on a read-only file system."""
    probe = os.fspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        return bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextmanager
def storage_guard(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn a transient storage error inside the block into :class:`StorageBlocked`."""
    try:
        yield
    except StorageBlocked:
        raise
    except (OSError, sqlite3.Error) as exc:
        reason = blocked_reason(exc)
        if reason is None:
            raise
        if reason == "permission_denied" and _read_only(path):  # SQLite says "unable to open" for both
            reason = "read_only"
        raise StorageBlocked(what, path, reason, f"{exc.__class__.__name__}: {exc}") from exc


def blocked_gauge():
    """The gauge ``vison_service_blocked{service,reason}`` (shared with shared.bus when it defines it)."""
    from prometheus_client import REGISTRY, Gauge

    from shared import metrics

    existing = getattr(metrics, "SERVICE_BLOCKED", None)
    if existing is not None:
        return existing
    collector = getattr(REGISTRY, "_names_to_collectors", {}).get("vison_service_blocked")
    if collector is not None:
        return collector
    return Gauge("vison_service_blocked", "1 while a service waits on a transient condition (disk full, ...)",
                 ["service", "reason"])


class BlockedState:
    """Whether a (non-consumer) service is blocked on its outputs: logs once per condition,
    once when it clears, and keeps ``vison_service_blocked{service,reason}`` in step."""

    def __init__(self, service: str, logger: logging.Logger | None = None):
        self.service = service
        self.log = logger or log
        self.current: dict[str, StorageBlocked] = {}

    @property
    def blocked(self) -> bool:
        return bool(self.current)

    def block(self, exc: StorageBlocked) -> None:
        """Record the condition (logged and exported the first time only)."""
        if exc.reason not in self.current:
            self.log.error("%s blocked: %s; the work stays pending and is retried until it clears",
                           self.service, exc)
            blocked_gauge().labels(service=self.service, reason=exc.reason).set(1)
        self.current[exc.reason] = exc

    def clear(self) -> None:
        """The outputs work again: log it once and reset the gauge."""
        for reason, exc in self.current.items():
            self.log.warning("%s resumed: %s folder %s writable again (%s cleared)", self.service, exc.what, exc.path,
                             reason.replace("_", " "))
            blocked_gauge().labels(service=self.service, reason=reason).set(0)
        self.current.clear()


__all__ = ["BLOCKING_ERRNOS", "BlockedState", "Retry", "StorageBlocked", "blocked_gauge", "blocked_reason",
           "storage_guard"]

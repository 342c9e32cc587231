"""HK part of ingest: tail the daily master HK files, publish ``hk.samples.<block>`` batches and
export the latest value of every parameter, its limits and whether it is out of limits."""

from __future__ import annotations

import logging
import math
from datetime import datetime, time
from pathlib import Path
from typing import Any, Callable, Mapping

from shared.events import HKSample, HKSamples
from shared.filenames import parse_hk_daily_name
from shared.hk import HKFormatError, HKTail, canonical_hk_key, check_hk_limits
from shared.metrics import FILES_SEEN, HK_LAST_SAMPLE, HK_LIMIT, HK_OUT_OF_LIMITS, HK_VALUE

log = logging.getLogger("vison.ingest.hk")

BATCH_ROWS = 600


class _Followed:
    def __init__(self, path: Path, rel: str, roe: int, day, skip: int):
        self.tail = HKTail(path)
        self.rel = rel
        self.roe = roe
        self.day = day
        self.skip = skip  # rows already published before a restart
        self.count = 0  # rows read since this process started
        self.errors_reported = 0


class HKMonitor:
    """Follows every daily HK file of the data root."""

    def __init__(self, block: str, ledger, publish: Callable[[HKSamples], None],
                 report: Callable[[str, str, str, str], None], producer: str = "ingest"):
        self.block = block
        self.ledger = ledger
        self.publish = publish
        self.report = report
        self.producer = producer
        self.files: dict[str, _Followed] = {}
        self.latest: dict[str, float] = {}

    def add(self, path: Path, rel: str) -> None:
        if rel in self.files:
            return
        name = parse_hk_daily_name(path.name)
        self.files[rel] = _Followed(path, rel, name.roe, name.date, self.ledger.hk_rows(rel))
        log.info("following daily HK %s (ROE%d, %d rows already published)", rel, name.roe, self.files[rel].skip)

    def poll(self, commanded: Mapping[str, Any] | None = None) -> int:
        """Read new rows of every followed file; publish them; update the gauges. Returns the
        number of rows published."""
        published = 0
        for rel, f in list(self.files.items()):
            try:
                rows = f.tail.poll()
            except HKFormatError as exc:
                self.report("hk", rel, exc.reason, f"hk-header:{rel}")
                continue
            except OSError as exc:
                log.warning("HK %s: %s", rel, exc)
                continue
            for lineno, reason in f.tail.errors[f.errors_reported:]:
                self.report("hk", f"{rel}:{lineno}", f"unusable HK line: {reason}", f"hk-line:{rel}:{lineno}")
            f.errors_reported = len(f.tail.errors)
            if not rows:
                continue
            FILES_SEEN.labels(kind="hk_row").inc(len(rows))
            first_new = max(0, f.skip - f.count)
            f.count += len(rows)
            self._gauges(f, rows[-1], commanded)
            new = rows[first_new:]
            for start in range(0, len(new), BATCH_ROWS):
                batch = new[start:start + BATCH_ROWS]
                self.publish(HKSamples(
                    producer=self.producer, block=self.block, roe=f.roe, source=rel,
                    samples=[HKSample(timestamp=self._ts(f, r.timestamp), values=_clean(r.values)) for r in batch],
                ))
                published += len(batch)
            if new:
                f.skip = f.count
                self.ledger.set_hk_rows(rel, f.count)
        return published

    @staticmethod
    def _ts(f: _Followed, ts: datetime | time) -> datetime:
        return datetime.combine(f.day, ts) if isinstance(ts, time) else ts

    def _gauges(self, f: _Followed, row, commanded: Mapping[str, Any] | None) -> None:
        roe = str(f.roe)
        stats = {}
        for col, value in row.values.items():
            key = canonical_hk_key(col)
            HK_VALUE.labels(block=self.block, roe=roe, param=key).set(value)
            self.latest[key] = value
            if not math.isnan(value):
                stats[col] = {"mean": value, "std": 0.0, "min": value, "max": value, "n": 1}
        HK_LAST_SAMPLE.labels(block=self.block, roe=roe).set(self._ts(f, row.timestamp).timestamp())
        for v in check_hk_limits(stats, commanded or {}, kinds=("P", "S")):
            if v.lo is not None:
                HK_LIMIT.labels(param=v.key, kind=v.kind, bound="lo").set(v.lo)
            if v.hi is not None:
                HK_LIMIT.labels(param=v.key, kind=v.kind, bound="hi").set(v.hi)
            if v.passed is not None:
                HK_OUT_OF_LIMITS.labels(param=v.key, kind=v.kind).set(0 if v.passed else 1)


def _clean(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or math.isnan(v) else float(v)) for k, v in values.items()}

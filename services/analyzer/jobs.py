"""The analysis job queue: a durable quorum queue ``<queue_prefix>.analyzer.jobs`` on the broker
(dead-lettered to ``<exchange>.dlx`` like every service queue), fed by the collector through the
default exchange and consumed by the workers (competing consumers, prefetch 1). Jobs are internal
messages, not bus events: they never appear on the topic exchange."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pika
from pydantic import BaseModel, Field

from services.analyzer.model import FrameMeta, split_test_name
from shared.bus import DELIVERY_LIMIT_MARGIN, Backoff, CONNECTION_ERRORS, connection_parameters, dead_letter_exchange, declare_topology
from shared.config import Settings


class AnalysisJob(BaseModel):
    """One analysis to run: a test run of a block and its frames."""

    job_id: str
    block: str
    test: str = Field(description="test run label (BIAS01 or BIAS01.2)")
    reason: str = Field(description="complete | closed | derived")
    frame_hash: str
    frames: list[FrameMeta]
    expected_frames: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def base(self) -> str:
        return split_test_name(self.test)[0]

    @property
    def repeat(self) -> int:
        return split_test_name(self.test)[1]

    @property
    def obsids(self) -> list[int]:
        return sorted({f.obsid for f in self.frames})


def jobs_queue(settings: Settings) -> str:
    return f"{settings.queue_prefix}.analyzer.jobs"


def declare_jobs_queue(channel, settings: Settings) -> str:
    """Declare the durable, dead-lettered quorum job queue (idempotent)."""
    declare_topology(channel, settings)
    name = jobs_queue(settings)
    channel.queue_declare(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": dead_letter_exchange(settings),
            "x-delivery-limit": int(settings.max_redeliveries) + DELIVERY_LIMIT_MARGIN,
        },
    )
    return name


class JobPublisher:
    """Publishes jobs with publisher confirms (persistent); reconnects with backoff."""

    def __init__(self, settings: Settings, max_retry_seconds: float | None = 60.0):
        self.settings = settings
        self.max_retry_seconds = max_retry_seconds
        self._conn = None
        self._chan = None

    def _ensure(self):
        if self._conn is None or self._conn.is_closed or self._chan is None or self._chan.is_closed:
            self.close()
            self._conn = pika.BlockingConnection(connection_parameters(self.settings.amqp_url))
            self._chan = self._conn.channel()
            self._chan.confirm_delivery()
            declare_jobs_queue(self._chan, self.settings)
        return self._chan

    def publish(self, message: str, job_id: str) -> None:
        """Publish one job message (JSON text); returns once the broker confirmed it."""
        backoff = Backoff()
        start = time.monotonic()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=job_id,
                                     timestamp=int(time.time()), app_id="analyzer")
        while True:
            try:
                self._ensure().basic_publish("", jobs_queue(self.settings), message.encode(), props, mandatory=True)
                return
            except CONNECTION_ERRORS:
                self.close()
                if self.max_retry_seconds is not None and time.monotonic() - start > self.max_retry_seconds:
                    raise
                time.sleep(backoff.next())

    def depth(self) -> int | None:
        """Jobs waiting in the queue (None when the broker is unreachable)."""
        try:
            return int(self._ensure().queue_declare(jobs_queue(self.settings), passive=True).method.message_count)
        except CONNECTION_ERRORS:
            self.close()
            return None

    def tick(self) -> None:
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.process_data_events(0)
            except Exception:
                self.close()

    def close(self) -> None:
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass

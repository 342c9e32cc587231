"""Scripts (ordered columns of identical frames) and their duration estimate (campaign.md)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from shared.campaign.keys import SCRIPT_KEYS, Value

#: Serial pixel period (us) and columns read per quadrant line used by the duration formula.
SERIAL_PERIOD_US = 14.3
SERIAL_PIXELS = 2128
IMAGE_ROWS = 2066
TRANSFER_OVERHEAD_S = 20.0


def frame_duration_s(values: Mapping[str, Value]) -> float:
    """Duration (s) of one frame with these register values (campaign.md formula):
    exptime + siflsh_p/1000 (if siflsh) + flush + readout + injection (if chinj or pumping)
    + serial pumping (if s_tpump) + vertical pumping (if v_tpump) + 20 s transfer overhead."""
    def num(key: str) -> float:
        return float(values.get(key, 0) or 0)

    us = IMAGE_ROWS * 4 * num("toi_fl")
    lines = num("vend") - num("vstart")
    us += lines * (4 * num("toi_ro") + SERIAL_PERIOD_US * SERIAL_PIXELS)
    pumping_s, pumping_v = bool(num("s_tpump")), bool(num("v_tpump"))
    if num("chinj") or pumping_s or pumping_v:
        us += IMAGE_ROWS * (4 * num("toi_ch") + SERIAL_PERIOD_US * SERIAL_PIXELS * num("chin_dly"))
    if pumping_s:
        us += lines * (2 * SERIAL_PERIOD_US + num("dwell_s")) * num("s_tp_cnt")
    if pumping_v:
        us += (4 * num("toi_tp") + num("dwell_v")) * num("v_tp_cnt")
    seconds = num("exptime") + (num("siflsh_p") / 1000.0 if num("siflsh") else 0.0)
    return seconds + us * 1e-6 + TRANSFER_OVERHEAD_S


class ScriptColumn(BaseModel):
    """One script column: ``frames`` identical frames with the register ``values`` (every key of
    SCRIPT_KEYS except ``frames``, in that order)."""

    model_config = ConfigDict(frozen=True)

    frames: int = Field(ge=1, description="number of frames of this column")
    values: dict[str, Value] = Field(description="register key -> value")

    @property
    def frame_duration_s(self) -> float:
        """Duration of one frame (s)."""
        return frame_duration_s(self.values)

    @property
    def duration_s(self) -> float:
        """Duration of the column (s)."""
        return self.frames * self.frame_duration_s

    def register_row(self) -> dict[str, Value]:
        """``frames`` then every register value, in SCRIPT_KEYS order."""
        return {"frames": self.frames, **{k: self.values[k] for k in SCRIPT_KEYS if k != "frames"}}


class Script(BaseModel):
    """The script of one test: ordered columns, plus what the structure check needs (waived keys)
    and, for tests without frames of their own (BF01), the test whose data they re-use."""

    model_config = ConfigDict(frozen=True)

    test: str = Field(description="test name as written in the `test` register (with .n for repeats)")
    columns: list[ScriptColumn] = Field(default_factory=list)
    waived_keys: list[str] = Field(default_factory=list, description="keys skipped by the structure check")
    data_from: str | None = Field(None, description="test whose frames this test analyses (BF01 -> PTC01)")

    @property
    def total_frames(self) -> int:
        """Frames of the whole script."""
        return sum(c.frames for c in self.columns)

    @property
    def frames_per_column(self) -> list[int]:
        return [c.frames for c in self.columns]

    @property
    def cumulative_frames(self) -> list[int]:
        """Frames up to and including each column (the spreadsheet `frames` row)."""
        out, total = [], 0
        for c in self.columns:
            total += c.frames
            out.append(total)
        return out

    def column_of_frame(self, index: int) -> int | None:
        """Index of the column that the ``index``-th frame (0-based) belongs to; None past the end."""
        if index < 0:
            raise ValueError("frame index must be >= 0")
        cum = self.cumulative_frames
        k = bisect_right(cum, index)
        return k if k < len(cum) else None

    @property
    def duration_s(self) -> float:
        """Estimated duration of the script (s)."""
        return sum(c.duration_s for c in self.columns)

    @property
    def duration_min(self) -> float:
        return self.duration_s / 60.0

"""What the simulator plays: frame specs (script register values + physics kind), simple
sequence specs that expand to frame specs, and the translation of register values into what
ELVIS writes (exposure-log values, FITS header, frame duration, physics conditions)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, Exposure, FrameKind
from shared.campaign.keys import DEFAULTS
from shared.campaign.structure import explog_values as script_explog_values
from shared.campaign.script import frame_duration_s
from shared.geometry import IMAGE_ROWS, PARALLEL_OVERSCAN_ROWS, Geometry, GeometryError

Value = int | float | str
EXPLOG_VERSION = "7.5.X"

#: Exposure-log values ELVIS writes that are not script registers (simulated constants).
ELVIS_CONSTANTS: dict[str, Value] = {
    "BUNIT": "ADU",
    "con_file": "vis_roe_config_cotsqm_273_vn.txt",
    "fl_rdout": 0,
    "ci_rdout": 0,
    "cdpu_clk": 0,
    "fpga_ver": "2AC",
    "egse_ver": "7.5.X",
}

def default_equipment(block: str) -> dict[str, str]:
    """Equipment values (operator, serial numbers) of a simulated block; ``sn_roe`` is the block name."""
    return {"operator": "sim", "sn_ccd1": f"CCD273-{block}-1", "sn_ccd2": f"CCD273-{block}-2",
            "sn_ccd3": f"CCD273-{block}-3", "sn_roe": block, "sn_rpsu": f"RPSU-{block}"}


class FrameSpec(BaseModel):
    """One frame to acquire: script register values (``shared.campaign`` register keys, layered
    over the campaign defaults) and optionally the physics kind (derived from the values
    otherwise, see :func:`frame_kind`)."""

    model_config = ConfigDict(extra="forbid")

    test: str
    values: dict[str, Value] = Field(default_factory=dict)
    kind: FrameKind | None = None
    column: int | None = Field(None, description="index of the script column the frame belongs to")
    label: str = Field("", description="free label recorded in the truth (e.g. the sequence name)")

    @field_validator("values")
    @classmethod
    def _register_keys(cls, values: dict[str, Value]) -> dict[str, Value]:
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"not script register keys: {', '.join(unknown)} (e.g. exptime, wave, vstart, vend, "
                             "shuttr, source, mirr_pos, chinj, IDL, IG1_1_T, ...)")
        return values

    def registers(self, equipment: Mapping[str, Value] | None = None) -> dict[str, Value]:
        """Register values: defaults < equipment < frame values, ``test`` = the frame's test."""
        out: dict[str, Value] = dict(DEFAULTS)
        out.update(equipment or {})
        out.update(self.values)
        out["test"] = self.test
        return out


def frame_kind(values: Mapping[str, Any], kind: str | None = None) -> FrameKind:
    """Physics of a frame: ``chinj`` when charge is injected (chinj or trap pumping), ``bias`` for
    zero exposure time, ``dark`` with the shutter closed, ``point`` / ``flat`` by the source."""
    if kind:
        return kind  # type: ignore[return-value]
    num = lambda k: float(values.get(k, 0) or 0)  # noqa: E731
    if num("chinj") or num("v_tpump") or num("s_tpump"):
        return "chinj"
    if num("exptime") <= 0:
        return "bias"
    if not num("shuttr"):
        return "dark"
    return "point" if str(values.get("source", "flat")).lower().startswith("point") else "flat"


def wavelength_nm(values: Mapping[str, Any], chamber: Mapping[str, Any]) -> int:
    """Wavelength (nm; 0 = ND filter) of the filter-wheel position ``wave``."""
    pos = f"F{int(float(values.get('wave', 4)))}"
    try:
        return int(chamber["FW"][pos])
    except KeyError:
        raise ValueError(f"wave={values.get('wave')}: no filter position {pos} in the chamber profile") from None


def t_full_well(values: Mapping[str, Any], chamber: Mapping[str, Any], point: bool = False) -> float:
    """Exposure time (s) reaching 2^16 ADU with the flat (or point) source at this wave."""
    table = chamber["tFWC_point" if point else "tFWC_flat"]
    nm = wavelength_nm(values, chamber)
    try:
        return float(table[f"nm{nm}"])
    except KeyError:
        raise ValueError(f"the chamber has no {'tFWC_point' if point else 'tFWC_flat'} for {nm} nm") from None


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


class SequenceSpec(BaseModel):
    """A simple sequence: ``frames`` frames at each exposure time (s) or fluence (fraction of
    2^16 ADU, converted with the chamber's tFWC), at filter position ``wave``. ``frames`` may be a
    list (one count per exposure value). ``values`` sets any other register."""

    model_config = ConfigDict(extra="forbid")

    test: str
    frames: int | list[int] = 1
    exptime: float | list[float] | None = None
    fluence: float | list[float] | None = None
    wave: int | None = None
    kind: FrameKind | None = None
    values: dict[str, Value] = Field(default_factory=dict)

    @field_validator("frames")
    @classmethod
    def _positive(cls, v):
        if any(int(n) < 1 for n in _as_list(v)):
            raise ValueError("frames must be >= 1")
        return v

    def expand(self, chamber: Mapping[str, Any]) -> list[FrameSpec]:
        """The frame specs of the sequence, in order."""
        if self.exptime is not None and self.fluence is not None:
            raise ValueError(f"{self.test}: give exptime or fluence, not both")
        base: dict[str, Value] = dict(self.values)
        if self.wave is not None:
            base["wave"] = self.wave
        test_upper = self.test.upper()
        if test_upper.startswith(("DARK", "BIAS")) and "shuttr" not in base:
            base["shuttr"] = 0
        if self.kind == "dark":
            base.setdefault("shuttr", 0)
        if self.kind == "point":
            base.setdefault("source", "point")
            base.setdefault("mirr_on", 1)
        if self.kind == "chinj":
            base.setdefault("chinj", 1)
        exposures: list[dict[str, Value]] = []
        if self.fluence is not None:
            point = self.kind == "point" or str(base.get("source", "flat")).startswith("point")
            tfw = t_full_well({**DEFAULTS, **base}, chamber, point=point)
            exposures = [{"exptime": round(f * tfw, 3)} for f in _as_list(self.fluence)]
        elif self.exptime is not None:
            exposures = [{"exptime": float(t)} for t in _as_list(self.exptime)]
        else:
            exposures = [{}]
        counts = _as_list(self.frames)
        if len(counts) == 1:
            counts = counts * len(exposures)
        if len(counts) != len(exposures):
            raise ValueError(f"{self.test}: {len(counts)} frame counts for {len(exposures)} exposure values")
        out = []
        for col, (n, exp) in enumerate(zip(counts, exposures)):
            for _ in range(int(n)):
                out.append(FrameSpec(test=self.test, values={**base, **exp}, kind=self.kind, column=col, label=self.test))
        return out


def expand_sequences(sequences: Iterable[SequenceSpec], chamber: Mapping[str, Any]) -> list[FrameSpec]:
    return [f for s in sequences for f in s.expand(chamber)]


# --------------------------------------------------------------------------------------------
# register values -> what ELVIS writes
# --------------------------------------------------------------------------------------------


def explog_values(
    registers: Mapping[str, Any],
    obsid: int,
    ccd: int,
    roe: int,
    date: datetime,
    file_name: str,
    temperatures: Mapping[str, float],
) -> dict[str, Value]:
    """The exposure-log row (7.5.X column -> value) of one CCD of one exposure: the script
    columns the log carries (``shared.campaign.explog_values``: IPHI composed, renamed keys),
    ELVIS constants, identity / date, and the CCD temperatures measured by HK."""
    row: dict[str, Value] = dict(script_explog_values(registers))
    row.update(ELVIS_CONSTANTS)
    row.update({
        "ObsID": obsid, "File_name": file_name, "CCD": ccd, "ROE": roe, "date": date,
        "calscrpt": f"vis_CalCamp_{registers.get('test', '')}.xlsx",
    })
    row.update(temperatures)
    return row


def fits_header(explog_row: Mapping[str, Any], registers: Mapping[str, Any], block: str, seed: int, kind: str) -> dict[str, Any]:
    """FITS extension header of one CCD frame: the exposure-log values (their own names; FITS
    upper-cases them) plus OBSID, DATE (ISO), EXPTIME, shutter, block and simulation keys."""
    hdr: dict[str, Any] = {}
    for key, value in explog_row.items():
        if key in ("date",):
            continue
        hdr[key] = value.isoformat() if isinstance(value, datetime) else value
    date = explog_row["date"]
    hdr.update({
        "OBSID": int(explog_row["ObsID"]),
        "DATE": date.isoformat(timespec="seconds"),
        "DATE-OBS": date.isoformat(timespec="seconds"),
        "EXPTIME": float(explog_row.get("exptime", 0) or 0),
        "SHUTTR": int(float(registers.get("shuttr", 0) or 0)),
        "BLOCK": block,
        "SIMULATD": True,
        "SIMSEED": int(seed),
        "SIMKIND": kind,
    })
    return hdr


def readout_time_s(registers: Mapping[str, Any]) -> float:
    """Readout time (s): (vend - vstart) lines x (4 toi_ro + 14.3 us x 2128)."""
    lines = float(registers.get("vend", 2086)) - float(registers.get("vstart", 0))
    return lines * (4 * float(registers.get("toi_ro", 1000)) + 14.3 * 2128) * 1e-6


def duration_s(registers: Mapping[str, Any]) -> float:
    """Duration of the frame (s), the campaign formula (exptime + flush + readout + ... + 20 s)."""
    return frame_duration_s(registers)


def frame_geometry(registers: Mapping[str, Any], overscan: int = 20) -> Geometry:
    """Geometry ELVIS writes for the readout window: NAXIS2 4172 when vend - vstart = 2086,
    4132 when <= 2066; anything else is an error (formats.md)."""
    lines = int(float(registers.get("vend", 2086))) - int(float(registers.get("vstart", 0)))
    if lines == IMAGE_ROWS + PARALLEL_OVERSCAN_ROWS:
        return Geometry(overscan=overscan, parallel_overscan=True)
    if 0 < lines <= IMAGE_ROWS:
        return Geometry(overscan=overscan, parallel_overscan=False)
    raise GeometryError(f"vend - vstart = {lines}: must be 2086 or 1..2066")


def exposure_conditions(
    registers: Mapping[str, Any],
    kind: FrameKind,
    chamber: Mapping[str, Any],
    drift_factor: float = 1.0,
) -> Exposure:
    """Physics conditions of a frame from its register values and the chamber profile."""
    exptime = float(registers.get("exptime", 0) or 0)
    exp = Exposure(
        kind=kind,
        exptime=exptime,
        dark_time=exptime if kind != "bias" else 0.0,
        readout_time=readout_time_s(registers),
        vstart=int(float(registers.get("vstart", 0))),
        vend=int(float(registers.get("vend", 2086))),
        values=dict(registers),
    )
    if kind == "flat":
        exp.flux_e_per_s = FULL_SCALE_ADU * REFERENCE_GAIN / t_full_well(registers, chamber) * drift_factor
    elif kind == "point":
        tfw = t_full_well(registers, chamber, point=True)
        exp.point_peak_e = exptime / tfw * FULL_SCALE_ADU * REFERENCE_GAIN * drift_factor
        nm = wavelength_nm(registers, chamber)
        fwhm0 = float(chamber.get("fwhm_lambda", {}).get(f"nm{nm}", 2.0))
        pos = f"F{int(float(registers.get('wave', 4)))}"
        nominal = float(chamber.get("mirror_nom", {}).get(pos, registers.get("mirr_pos", 0)))
        exp.fwhm0_px = fwhm0
        exp.mirror_nominal_mm = nominal
        exp.mirror_mm = float(registers.get("mirr_pos", nominal))
    return exp

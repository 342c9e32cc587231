"""The test catalogue of campaign.md: one typed definition per test.

Each test family has a pydantic parameter model (nominal values as defaults, validated ranges)
and a pure builder ``(params, chamber) -> (common values, [(frames, column values)])``;
``TestDefinition.script`` layers defaults < common < column < equipment values.

Test names (``get_test``):
- plain: BIAS01, BIAS02, DARK01, CHINJ01, CHINJ02, TP01, TP11, TP02, TP21, FLAT01, FLAT_STB,
  PTC01, NL01, NL02, BF01, PSF02, PERSIST01, COSMETICS00, MOT_WARM;
- wavelength suffix ``_<nm>`` (590, 640, 730, 800, 880): FLAT02_730, PTC02_590, BF01_880,
  FOCUS00_800, PSF01_590 (required for FLAT02, FOCUS00, PSF01);
- temperature suffix ``_<T>K`` (kelvin): PTC02_150K; RD suffix ``_<V>R`` (volts): PTC02_15.5R,
  NL02_16.5R (canonical form has one decimal: PTC02_16R -> PTC02_16.0R); BF01 takes any PTC02
  suffix and re-uses that PTC02's frames (BF01 -> PTC01);
- repeats ``NAME.n`` (n >= 1): BIAS01.2, FLAT02_730.3, NL02_15.5R.2. The ``test`` register holds the
  full name so that the exposure log tells repeats apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.campaign.keys import EQUIPMENT_KEYS, Value, compose, ig1, ig2, rd
from shared.campaign.script import Script, ScriptColumn
from shared.refdata import chamber_profile

#: Wavelengths (nm) a test name may carry; 0 is the neutral-density (ND) position.
WAVELENGTHS = (590, 640, 730, 800, 880)
ND = 0

Volt = Annotated[float, Field(ge=0.0, le=30.0)]
Percent = Annotated[float, Field(gt=0.0, le=200.0, description="fluence, % of full well (2^16 ADU)")]
NFrames = Annotated[int, Field(ge=1, le=1000)]
DelayUs = Annotated[float, Field(ge=0.0, le=20000.0, description="injection delay id_dly (us)")]


# --------------------------------------------------------------------------------------------
# chamber (OGSE) profile
# --------------------------------------------------------------------------------------------
class Chamber:
    """A chamber profile with the look-ups scripts need (exposure times in s, mirror in mm)."""

    def __init__(self, name: str, profile: Mapping[str, Any]):
        self.name = name
        self.profile = dict(profile)

    @classmethod
    def resolve(cls, chamber: "str | Mapping[str, Any] | Chamber") -> "Chamber":
        """From a profile name (shared.refdata), a profile dict or a Chamber."""
        if isinstance(chamber, Chamber):
            return chamber
        if isinstance(chamber, str):
            return cls(chamber, chamber_profile(chamber))
        return cls(str(chamber.get("name", "custom")), chamber)

    def _fw(self, nm: int) -> str:
        for pos, wave in self.profile["FW"].items():
            if int(wave) == int(nm):
                return pos
        raise ValueError(f"wavelength: {nm} nm is not on the filter wheel of chamber {self.name}")

    def filter_position(self, nm: int) -> int:
        """Filter-wheel position (the ``wave`` register, 1..6) of a wavelength (nm; 0 = ND)."""
        return int(self._fw(nm).lstrip("F"))

    def _t(self, table: str, nm: int) -> float:
        try:
            return float(self.profile[table][f"nm{int(nm)}"])
        except KeyError:
            raise ValueError(f"wavelength: chamber {self.name} has no {table} for {nm} nm") from None

    def exptime_flat(self, nm: int, percent: float) -> float:
        """Exposure time (s) of a flat reaching ``percent`` % of full well at ``nm``."""
        return round(percent / 100.0 * self._t("tFWC_flat", nm), 3)

    def exptime_point(self, nm: int, percent: float) -> float:
        """Exposure time (s) of a point-source frame peaking at ``percent`` % of full well."""
        return round(percent / 100.0 * self._t("tFWC_point", nm), 3)

    def mirror_nominal(self, nm: int) -> float:
        """Nominal (best-focus) mirror position (mm) with the filter of ``nm``."""
        return float(self.profile["mirror_nom"][self._fw(nm)])


def _flat(ch: Chamber, nm: int, percent: float, **extra: Value) -> dict[str, Value]:
    return {"source": "flat", "shuttr": 1, "mirr_on": 0, "wave": ch.filter_position(nm),
            "exptime": ch.exptime_flat(nm, percent), **extra}


def _point(ch: Chamber, nm: int, percent: float, **extra: Value) -> dict[str, Value]:
    return {"source": "point", "shuttr": 1, "mirr_on": 1, "wave": ch.filter_position(nm),
            "mirr_pos": ch.mirror_nominal(nm), "exptime": ch.exptime_point(nm, percent), **extra}


def _steps(lo: float, hi: float, step: float) -> list[float]:
    """lo..hi inclusive in steps (V)."""
    n = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 4) for i in range(n)]


# --------------------------------------------------------------------------------------------
# parameter models
# --------------------------------------------------------------------------------------------
class TestParams(BaseModel):
    """Base of every parameter model (unknown fields refused, immutable)."""

    __test__ = False
    model_config = ConfigDict(extra="forbid", frozen=True)


def _same_length(a: list, b: list, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_b}: needs one entry per {name_a} ({len(a)}), got {len(b)}")


class BiasParams(TestParams):
    N: int = Field(10, ge=1, le=1000, description="number of bias frames")


class Bias02Params(BiasParams):
    rdmode: Literal["rwd_bas_v", "rwd_bas_s", "rwd_bas_vs"] = "rwd_bas_v"
    swellw: float = Field(8.4, ge=0, le=100, description="summing-well width (us)")
    swelldly: float = Field(5.625, ge=0, le=100, description="summing-well delay (us)")


class DarkParams(TestParams):
    N: int = Field(4, ge=1, le=100, description="number of dark frames")
    exptime: float = Field(565.0, gt=0, le=3600, description="dark exposure time (s)")


class _InjectionParams(TestParams):
    id_delays: list[DelayUs] = Field([1250.0, 750.0], min_length=1, max_length=4,
                                     description="injection delays id_dly (us), one block of columns each")
    IDH: Volt = 18.0
    IG2: Volt = 6.0
    toi_ch: int = Field(500, ge=10, le=10000, description="injection phase time (us)")
    chinj_on: int = Field(30, ge=1, le=2066, description="injected lines")
    chinj_of: int = Field(100, ge=0, le=2066, description="lines between injections")
    id_wid: float = Field(100, ge=0, le=1000, description="injection pulse width (us)")


class Chinj01Params(_InjectionParams):
    IDL: Volt = 11.0
    IG1_min: Volt = 2.5
    IG1_max: Volt = 6.75
    IG1_step: float = Field(0.25, gt=0, le=10, description="IG1 step (V)")

    @model_validator(mode="after")
    def _range(self):
        if self.IG1_max < self.IG1_min:
            raise ValueError("IG1_max: must be >= IG1_min")
        return self


class Chinj02Params(_InjectionParams):
    IG1: Volt = 4.0
    IDL_min: Volt = 9.5
    IDL_max: Volt = 12.5
    IDL_step: float = Field(0.25, gt=0, le=10, description="IDL step (V)")

    @model_validator(mode="after")
    def _range(self):
        if self.IDL_max < self.IDL_min:
            raise ValueError("IDL_max: must be >= IDL_min")
        return self


class _PumpParams(TestParams):
    id_delays: list[DelayUs] = Field([1250.0, 750.0], min_length=1, max_length=4,
                                     description="injection delays (us): one reference + pumped block each")
    cycles: int = Field(5000, ge=1, le=100000, description="pumping cycles (v_tp_cnt / s_tp_cnt)")
    IDL: Volt = 11.0
    IDH: Volt = 18.0
    IG1: Volt = 4.0
    IG2: Volt = 6.0


class VPumpParams(_PumpParams):
    tois: list[Annotated[int, Field(ge=1, le=100000)]] = Field(
        [50, 200, 1000, 2000, 4000, 8000], min_length=1, description="pumping phase times toi_tp (us)")
    modes: list[Literal[123, 234, 341, 412]] = Field([123, 234, 341, 412], min_length=1,
                                                      description="vertical pumping modes v_tpmod")


class SPumpParams(_PumpParams):
    dwells: list[Annotated[float, Field(ge=0, le=1000)]] = Field(
        [0.0, 4.75, 14.3, 28.6], min_length=1, description="serial dwell times dwell_s (us)")
    modes: list[Literal[23, 31]] = Field([23, 31], min_length=1, description="serial pumping modes s_tpmod")
    vend: int = Field(100, ge=1, le=2086, description="last line read")


class FlatParams(TestParams):
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    fluences: list[Percent] = Field([25.0, 50.0, 75.0], min_length=1, description="% of full well per column")
    frames: list[NFrames] = Field([80, 60, 30], min_length=1, description="frames per column")

    @model_validator(mode="after")
    def _lengths(self):
        _same_length(self.fluences, self.frames, "fluence", "frames")
        return self


class Flat02Params(FlatParams):
    fluences: list[Percent] = Field([25.0, 75.0], min_length=1)
    frames: list[NFrames] = Field([80, 30], min_length=1)


class FlatStbParams(TestParams):
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    fluence: Percent = 50.0
    N: int = Field(20, ge=1, le=1000, description="number of flats (source stability series)")


class PTC01Params(FlatParams):
    fluences: list[Percent] = Field([5.0, 10.0, 20.0, 30.0, 50.0, 70.0, 80.0, 90.0, 100.0, 110.0, 120.0],
                                    min_length=1)
    frames: list[NFrames] = Field([10] * 8 + [4] * 3, min_length=1)


class PTC02Params(FlatParams):
    fluences: list[Percent] = Field([10.0, 30.0, 50.0, 70.0, 80.0, 90.0], min_length=1)
    frames: list[NFrames] = Field([4] * 6, min_length=1)
    temperature: float | None = Field(None, ge=100, le=300, description="CCD temperature (K), _<T>K tests")
    RD: float | None = Field(None, ge=5, le=25, description="reset-drain voltage (V), _<V>R tests")


#: 21 fluences (% of full well) of NL01/NL02: 21 x 4 frames + 22 stability + 3 background = 109.
NL_FLUENCES = [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0,
               85.0, 90.0, 95.0, 100.0, 110.0]


class NLParams(TestParams):
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    fluences: list[Percent] = Field(list(NL_FLUENCES), min_length=1)
    frames_per_fluence: int = Field(4, ge=1, le=100)
    stability_fluence: Percent = 50.0
    n_background: int = Field(3, ge=0, le=100)
    nd_below: float = Field(0.0, ge=0, le=200, description="fluences (%) below this use the ND filter")
    RD: float | None = Field(None, ge=5, le=25, description="reset-drain voltage (V), _<V>R tests")


class NL02Params(NLParams):
    wavelength: Literal[590, 640, 730, 800, 880] = 880
    nd_below: float = Field(20.0, ge=0, le=200)


class BFParams(TestParams):
    max_lag: int = Field(5, ge=1, le=20, description="largest covariance lag (pixels)")


class FocusParams(TestParams):
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    fluence: Percent = 60.0
    step_mm: float = Field(0.2, gt=0, le=5, description="mirror step (mm)")
    n_steps: int = Field(4, ge=0, le=20, description="steps on each side of nominal")
    frames_per_position: int = Field(1, ge=1, le=100)


class PSFParams(TestParams):
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    fluences: list[Percent] = Field([5.0, 25.0, 50.0, 75.0, 90.0], min_length=1)
    frames: list[NFrames] = Field([20, 15, 10, 4, 4], min_length=1)
    temperature: float | None = Field(None, ge=100, le=300, description="CCD temperature (K), comment only")

    @model_validator(mode="after")
    def _lengths(self):
        _same_length(self.fluences, self.frames, "fluence", "frames")
        return self


class PSF02Params(PSFParams):
    temperature: float | None = Field(150.0, ge=100, le=300)


class PersistParams(TestParams):
    n_reset: int = Field(5, ge=0, le=100)
    n_reference: int = Field(3, ge=1, le=100)
    n_latent: int = Field(3, ge=1, le=100)
    t_dark: float = Field(565.0, gt=0, le=3600, description="reference / latent dark time (s)")
    t_saturation: float = Field(600.0, gt=0, le=3600, description="saturating exposure (s)")
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    defocus_mm: float = Field(-5.0, ge=-50, le=50, description="mirror offset from nominal (mm)")


class CosmeticsParams(TestParams):
    n_bias: int = Field(5, ge=1, le=100)
    n_flat: int = Field(5, ge=1, le=100)
    wavelength: Literal[590, 640, 730, 800, 880] = 800
    fluence: Percent = 50.0


class MotWarmParams(TestParams):
    flat_fluence: Percent = 50.0
    point_fluence: Percent = 50.0
    point_wavelengths: list[Literal[590, 640, 730, 800, 880]] = Field([590, 800, 880], min_length=3, max_length=3)


# --------------------------------------------------------------------------------------------
# builders: (params, chamber) -> (common values, [(frames, column values)])
# --------------------------------------------------------------------------------------------
Columns = list[tuple[int, dict[str, Value]]]
Built = tuple[dict[str, Value], Columns]
CLOSED = {"shuttr": 0, "exptime": 0}


def _bias(p: BiasParams, ch: Chamber) -> Built:
    extra: dict[str, Value] = {}
    if isinstance(p, Bias02Params):
        extra = {"rdmode": p.rdmode, "swellw": p.swellw, "swelldly": p.swelldly}
    return {**CLOSED, **extra}, [(p.N, {})]


def _dark(p: DarkParams, ch: Chamber) -> Built:
    return {"shuttr": 0, "exptime": p.exptime}, [(p.N, {})]


def _injection_common(p: _InjectionParams) -> dict[str, Value]:
    return {**CLOSED, "chinj": 1, "chinj_on": p.chinj_on, "chinj_of": p.chinj_of, "id_wid": p.id_wid,
            "toi_ch": p.toi_ch, "IDH": p.IDH, **ig2(p.IG2)}


def _chinj01(p: Chinj01Params, ch: Chamber) -> Built:
    common = {**_injection_common(p), "IDL": p.IDL}
    cols = [(1, {"id_dly": d, **ig1(v)}) for d in p.id_delays for v in _steps(p.IG1_min, p.IG1_max, p.IG1_step)]
    return common, cols


def _chinj02(p: Chinj02Params, ch: Chamber) -> Built:
    common = {**_injection_common(p), **ig1(p.IG1)}
    cols = [(1, {"id_dly": d, "IDL": v}) for d in p.id_delays for v in _steps(p.IDL_min, p.IDL_max, p.IDL_step)]
    return common, cols


def _pump_common(p: _PumpParams) -> dict[str, Value]:
    """Full-frame injection (2066 lines on, none off) with the pumping voltages."""
    return {**CLOSED, "chinj": 1, "chinj_on": 2066, "chinj_of": 0, "IDL": p.IDL, "IDH": p.IDH,
            **ig1(p.IG1), **ig2(p.IG2)}


def _vpump(p: VPumpParams, ch: Chamber) -> Built:
    common = {**_pump_common(p), "v_tp_cnt": p.cycles}
    cols: Columns = []
    for d in p.id_delays:
        cols.append((1, {"id_dly": d, "v_tpump": 0, "comments": "REF"}))
        cols += [(1, {"id_dly": d, "v_tpump": 1, "toi_tp": t, "v_tpmod": m}) for t in p.tois for m in p.modes]
    return common, cols


def _spump(p: SPumpParams, ch: Chamber) -> Built:
    common = {**_pump_common(p), "s_tp_cnt": p.cycles, "vend": p.vend}
    cols: Columns = []
    for d in p.id_delays:
        cols.append((1, {"id_dly": d, "s_tpump": 0, "comments": "REF"}))
        cols += [(1, {"id_dly": d, "s_tpump": 1, "dwell_s": w, "s_tpmod": m}) for w in p.dwells for m in p.modes]
    return common, cols


def _flats(p: FlatParams, ch: Chamber) -> Built:
    common: dict[str, Value] = {}
    if isinstance(p, PTC02Params):
        if p.RD is not None:
            common.update(rd(p.RD))
        if p.temperature is not None:
            common["comments"] = f"T={p.temperature:g}K"
    return common, [(n, _flat(ch, p.wavelength, f)) for f, n in zip(p.fluences, p.frames)]


def _flat_stb(p: FlatStbParams, ch: Chamber) -> Built:
    return {}, [(p.N, _flat(ch, p.wavelength, p.fluence))]


def _nl(p: NLParams, ch: Chamber) -> Built:
    """Background (shutter closed), then per fluence one stability frame and the fluence frames,
    then a last stability frame. Fluences below ``nd_below`` % use the ND filter."""

    def flu(percent: float, label: str) -> dict[str, Value]:
        nm = ND if percent < p.nd_below else p.wavelength
        return _flat(ch, nm, percent, comments=label)

    common: dict[str, Value] = rd(p.RD) if p.RD is not None else {}
    stab = flu(p.stability_fluence, "STAB")
    cols: Columns = []
    if p.n_background:
        cols.append((p.n_background, {**_flat(ch, p.wavelength, 1.0), **CLOSED, "comments": "BGD"}))
    for f in p.fluences:
        cols.append((1, stab))
        cols.append((p.frames_per_fluence, flu(f, "FLU")))
    cols.append((1, stab))
    return common, cols


def _bf(p: BFParams, ch: Chamber) -> Built:
    return {}, []


def _focus(p: FocusParams, ch: Chamber) -> Built:
    nominal = ch.mirror_nominal(p.wavelength)
    cols = [(p.frames_per_position, _point(ch, p.wavelength, p.fluence, mirr_pos=round(nominal + j * p.step_mm, 4)))
            for j in range(-p.n_steps, p.n_steps + 1)]
    return {}, cols


def _psf(p: PSFParams, ch: Chamber) -> Built:
    common: dict[str, Value] = {"comments": f"T={p.temperature:g}K"} if p.temperature is not None else {}
    return common, [(n, _point(ch, p.wavelength, f)) for f, n in zip(p.fluences, p.frames)]


def _persist(p: PersistParams, ch: Chamber) -> Built:
    nm = p.wavelength
    common = {"shuttr": 0, "source": "point", "wave": ch.filter_position(nm), "mirr_pos": ch.mirror_nominal(nm)}
    sat = {"shuttr": 1, "mirr_on": 1, "exptime": p.t_saturation,
           "mirr_pos": round(ch.mirror_nominal(nm) + p.defocus_mm, 4), "comments": "SATUR"}
    cols: Columns = []
    if p.n_reset:
        cols.append((p.n_reset, {"exptime": 0, "comments": "RESET"}))
    cols += [(p.n_reference, {"exptime": p.t_dark, "comments": "REFDARK"}), (1, sat),
             (p.n_latent, {"exptime": p.t_dark, "comments": "LATENT"})]
    return common, cols


def _cosmetics(p: CosmeticsParams, ch: Chamber) -> Built:
    bias = {**_flat(ch, p.wavelength, p.fluence), **CLOSED, "comments": "BIAS"}
    return {}, [(p.n_bias, bias), (p.n_flat, _flat(ch, p.wavelength, p.fluence, comments="FLAT"))]


def _mot_warm(p: MotWarmParams, ch: Chamber) -> Built:
    """Two reverse-readout biases, a ROE ramp frame, an injection frame, a flat, three point
    sources; each column is labelled in ``comments``."""
    sw = {"swellw": 8.4, "swelldly": 5.625}
    cols: Columns = [
        (1, {**CLOSED, "rdmode": "rwd_bas_v", **sw, "comments": "BIAS_RWDV"}),
        (1, {**CLOSED, "rdmode": "rwd_bas_s", **sw, "comments": "BIAS_RWDS"}),
        (1, {**CLOSED, "comments": "RAMP"}),
        (1, {**CLOSED, "chinj": 1, "chinj_on": 30, "chinj_of": 100, "IDL": 11, **ig1(4.0), **ig2(6.0),
             "comments": "CHINJ"}),
        (1, _flat(ch, 800, p.flat_fluence, comments="FLAT")),
    ]
    cols += [(1, _point(ch, nm, p.point_fluence, comments=f"POINT_{nm}")) for nm in p.point_wavelengths]
    return {}, cols


# --------------------------------------------------------------------------------------------
# definitions and name look-up
# --------------------------------------------------------------------------------------------
CLOSED_WAIVED = ("wave", "source", "mirr_pos", "motr_cnt", "motr_siz", "comments", "roe-tab")
FLAT_WAIVED = ("mirr_pos", "motr_cnt", "motr_siz", "comments", "roe-tab")
POINT_WAIVED = ("motr_cnt", "motr_siz", "comments", "roe-tab")


class Family(BaseModel):
    """A test family: parameter model, builder, which name suffixes it takes."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str
    purpose: str
    params_model: type[TestParams]
    builder: Callable[..., Built]
    waived: tuple[str, ...]
    suffixes: frozenset[str] = frozenset()  # subset of {"nm", "K", "R"}
    suffix_required: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family(name="BIAS01", purpose="bias frames", params_model=BiasParams, builder=_bias, waived=CLOSED_WAIVED),
    Family(name="BIAS02", purpose="bias frames, reverse readout with summing well", params_model=Bias02Params,
           builder=_bias, waived=CLOSED_WAIVED),
    Family(name="DARK01", purpose="dark frames", params_model=DarkParams, builder=_dark, waived=CLOSED_WAIVED),
    Family(name="CHINJ01", purpose="charge injection vs IG1", params_model=Chinj01Params, builder=_chinj01,
           waived=CLOSED_WAIVED),
    Family(name="CHINJ02", purpose="charge injection vs IDL", params_model=Chinj02Params, builder=_chinj02,
           waived=CLOSED_WAIVED),
    Family(name="TP01", purpose="vertical trap pumping", params_model=VPumpParams, builder=_vpump,
           waived=CLOSED_WAIVED),
    Family(name="TP11", purpose="vertical trap pumping, IDL 10.5 V", params_model=VPumpParams, builder=_vpump,
           waived=CLOSED_WAIVED),
    Family(name="TP02", purpose="serial trap pumping", params_model=SPumpParams, builder=_spump,
           waived=CLOSED_WAIVED),
    Family(name="TP21", purpose="serial trap pumping, IDL 10.5 V", params_model=SPumpParams, builder=_spump,
           waived=CLOSED_WAIVED),
    Family(name="FLAT01", purpose="flat fields at 800 nm", params_model=FlatParams, builder=_flats,
           waived=FLAT_WAIVED),
    Family(name="FLAT02", purpose="flat fields at other wavelengths", params_model=Flat02Params, builder=_flats,
           waived=FLAT_WAIVED, suffixes=frozenset({"nm"}), suffix_required=True),
    Family(name="FLAT_STB", purpose="flat-source stability series", params_model=FlatStbParams,
           builder=_flat_stb, waived=FLAT_WAIVED),
    Family(name="PTC01", purpose="photon transfer curve at 800 nm", params_model=PTC01Params, builder=_flats,
           waived=FLAT_WAIVED),
    Family(name="PTC02", purpose="photon transfer curve vs wavelength / temperature / RD",
           params_model=PTC02Params, builder=_flats, waived=FLAT_WAIVED,
           suffixes=frozenset({"nm", "K", "R"}), suffix_required=True),
    Family(name="NL01", purpose="non-linearity", params_model=NLParams, builder=_nl, waived=FLAT_WAIVED),
    Family(name="NL02", purpose="non-linearity with ND filter / 880 nm", params_model=NL02Params, builder=_nl,
           waived=FLAT_WAIVED, suffixes=frozenset({"R"})),
    Family(name="BF01", purpose="brighter-fatter (re-uses PTC data)", params_model=BFParams, builder=_bf,
           waived=(), suffixes=frozenset({"nm", "K", "R"})),
    Family(name="FOCUS00", purpose="focus scan of the point source", params_model=FocusParams, builder=_focus,
           waived=POINT_WAIVED, suffixes=frozenset({"nm"}), suffix_required=True),
    Family(name="PSF01", purpose="point-source frames vs fluence", params_model=PSFParams, builder=_psf,
           waived=POINT_WAIVED, suffixes=frozenset({"nm"}), suffix_required=True),
    Family(name="PSF02", purpose="point-source frames at another temperature", params_model=PSF02Params,
           builder=_psf, waived=POINT_WAIVED),
    Family(name="PERSIST01", purpose="persistence", params_model=PersistParams, builder=_persist,
           waived=POINT_WAIVED),
    Family(name="COSMETICS00", purpose="bias + flats for defect masks", params_model=CosmeticsParams,
           builder=_cosmetics, waived=FLAT_WAIVED),
    Family(name="MOT_WARM", purpose="warm functional check", params_model=MotWarmParams, builder=_mot_warm,
           waived=("motr_cnt", "motr_siz", "comments", "roe-tab")),
]}

#: Values a plain family name fixes (TP11/TP21 run at IDL 10.5 V).
FAMILY_VALUES: dict[str, dict[str, Any]] = {"TP11": {"IDL": 10.5}, "TP21": {"IDL": 10.5}}

_SUFFIX = re.compile(r"^(?:_(?:(?P<num>\d+(?:\.\d+)?)(?P<unit>[KR])|(?P<nm>\d+)))?(?:\.(?P<rep>\d+))?$")


class TestDefinition:
    """One test of the catalogue under its full name (e.g. ``FLAT02_730``, ``BIAS01.2``)."""

    __test__ = False

    def __init__(self, name: str, family: Family, name_values: dict[str, Any], repeat: int | None,
                 data_from: str | None = None):
        self.name = name
        self.family = family
        self.name_values = name_values
        self.repeat = repeat
        self.data_from = data_from

    def __repr__(self) -> str:
        return f"TestDefinition({self.name!r})"

    @property
    def params_model(self) -> type[TestParams]:
        return self.family.params_model

    @property
    def waived_keys(self) -> list[str]:
        return list(self.family.waived)

    def params(self, overrides: Mapping[str, Any] | TestParams | None = None) -> TestParams:
        """Validated parameters: nominal values < values fixed by the name < ``overrides``.
        Raises ValueError / ValidationError naming the field."""
        if isinstance(overrides, TestParams):
            overrides = overrides.model_dump()
        overrides = dict(overrides or {})
        for key, fixed in self.name_values.items():
            if key in overrides and overrides[key] != fixed and key not in FAMILY_VALUES.get(self.family.name, {}):
                raise ValueError(f"{key}: fixed to {fixed} by the test name {self.name}")
        return self.params_model(**{**self.name_values, **overrides})

    def build(self, params: TestParams, chamber: "str | Mapping[str, Any] | Chamber") -> Built:
        """(common values, [(frames, column values)]) before layering."""
        return self.family.builder(params, Chamber.resolve(chamber))

    def script(
        self,
        params: Mapping[str, Any] | TestParams | None = None,
        chamber: "str | Mapping[str, Any] | Chamber" = "CHAMBER_A_JUN18",
        equipment: Mapping[str, Value] | BaseModel | None = None,
    ) -> Script:
        """The script: columns of register values, layered defaults < test common values <
        column values < equipment values (operator, serial numbers)."""
        p = params if isinstance(params, self.params_model) else self.params(params)  # type: ignore[arg-type]
        if isinstance(equipment, BaseModel):
            equipment = equipment.model_dump()
        equip = {k: v for k, v in (equipment or {}).items() if k in EQUIPMENT_KEYS}
        unknown = set(equipment or {}) - set(EQUIPMENT_KEYS)
        if unknown:
            raise ValueError(f"equipment: unknown keys {sorted(unknown)} (allowed: {', '.join(EQUIPMENT_KEYS)})")
        common, columns = self.build(p, chamber)
        common = {**common, "test": self.name}
        cols = [ScriptColumn(frames=n, values=compose(common, col, equip)) for n, col in columns]
        return Script(test=self.name, columns=cols, waived_keys=self.waived_keys, data_from=self.data_from)


def _parse_suffix(family: Family, num: str | None, unit: str) -> tuple[str, dict[str, Any]]:
    if num is None:
        if family.suffix_required:
            kinds = {"nm": "_<nm>", "K": "_<T>K", "R": "_<RD>R"}
            raise ValueError(f"test {family.name} needs a suffix: "
                             + " or ".join(f"{family.name}{kinds[k]}" for k in ("nm", "K", "R") if k in family.suffixes))
        return "", {}
    kind = unit or "nm"
    if kind not in family.suffixes:
        raise ValueError(f"test {family.name} takes no '{num}{unit}' suffix")
    value = float(num)
    if kind == "nm":
        if not value.is_integer() or int(value) not in WAVELENGTHS:
            raise ValueError(f"wavelength: {num} nm is not one of {WAVELENGTHS}")
        return f"_{int(value)}", {"wavelength": int(value)}
    if kind == "K":
        return f"_{value:g}K", {"temperature": value}
    return f"_{value:.1f}R", {"RD": value}


def get_test(name: str) -> TestDefinition:
    """The definition of a test by full name (see the module docstring for the naming).
    Raises KeyError for an unknown test, ValueError for a malformed suffix."""
    name = str(name).strip().upper()
    for fam_name in sorted(FAMILIES, key=len, reverse=True):
        if not name.startswith(fam_name):
            continue
        m = _SUFFIX.match(name[len(fam_name):])
        if not m:
            continue
        family = FAMILIES[fam_name]
        suffix, values = _parse_suffix(family, m.group("num") or m.group("nm"), m.group("unit") or "")
        rep = int(m.group("rep")) if m.group("rep") else None
        if rep is not None and rep < 1:
            raise ValueError(f"repeat number must be >= 1 in {name!r}")
        full = fam_name + suffix + (f".{rep}" if rep else "")
        data_from = None
        if fam_name == "BF01":
            data_from = ("PTC02" + suffix if suffix else "PTC01") + (f".{rep}" if rep else "")
            values = {}
        values = {**FAMILY_VALUES.get(fam_name, {}), **values}
        return TestDefinition(full, family, values, rep, data_from)
    raise KeyError(f"unknown test {name!r} (families: {', '.join(FAMILIES)})")


def naming_help() -> str:
    """One line per family: name pattern and purpose."""
    kinds = {"nm": "_<nm>", "K": "_<T>K", "R": "_<RD>R"}
    lines = []
    for f in FAMILIES.values():
        pats = [f.name + kinds[k] for k in ("nm", "K", "R") if k in f.suffixes]
        if not f.suffix_required:
            pats.insert(0, f.name)
        lines.append(f"{' | '.join(pats)}: {f.purpose}")
    return "\n".join(lines)


def validation_message(exc: ValidationError) -> str:
    """``field: message`` of a pydantic ValidationError (model-level errors already name their
    field in the message)."""
    parts = []
    for e in exc.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)

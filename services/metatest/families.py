"""The FPA families: family -> tests -> quantities (``metatest.md`` "Families", keys of the
analyses in the README and ``families.md``).

Quantity names are the analysis result keys for the family's primary test (``gain`` of PTC01,
``ron_img_adu`` of BIAS01) and ``<key>_<TEST>`` for its other tests (``gain_PTC02_590``,
``prnu_pct_FLAT02_730``); a per-mode mapping or a per-fluence list gives ``<key>_<mode>`` /
``<key>_<n>`` (``ron_adu_fwd_bas``, ``column_prnu_pct_2``). A quantity marked ``electrons`` also
gets its ``_e`` variant (``ron_img_adu`` -> ``ron_img_e``, ``dark_current_adu_s`` ->
``dark_current_e_s``) = value in ADU x the latest PTC01 gain (e-/ADU) of the same block, CCD and
quadrant.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

#: the test whose ``gain`` converts ADU to electrons
GAIN_TEST = "PTC01"
GAIN_KEY = "gain"


@dataclass(frozen=True)
class Quantity:
    """One per-quadrant result key; ``electrons``: also aggregated in e- (x gain)."""

    key: str
    unit: str
    electrons: bool = False


@dataclass(frozen=True)
class TestSpec:
    """Tests of a family (``fnmatch`` pattern on the base test name) and the keys they give."""

    __test__ = False  # not a pytest class
    pattern: str
    quantities: tuple[Quantity, ...]

    def matches(self, test: str) -> bool:
        return fnmatch.fnmatchcase(test, self.pattern)


@dataclass(frozen=True)
class MosaicSpec:
    """A master image assembled on the FPA: ``<stem>_CCD<n>.fits`` extension ``extension`` of the
    tests matching ``pattern`` (one mosaic per test)."""

    pattern: str
    stem: str
    extension: str
    label: str


@dataclass(frozen=True)
class Family:
    name: str
    primary: str | None
    tests: tuple[TestSpec, ...]
    mosaics: tuple[MosaicSpec, ...] = ()
    crosstalk: bool = False  # psf: the crosstalk requirement across the FPA
    description: str = ""
    history: tuple[str, ...] = ()  # keys followed across every test of each block (bias: offsets, RON)

    def spec_of(self, test: str) -> TestSpec | None:
        for spec in self.tests:
            if spec.matches(test):
                return spec
        return None

    def uses(self, test: str) -> bool:
        return self.spec_of(test) is not None

    @property
    def converts_to_electrons(self) -> bool:
        return any(q.electrons for spec in self.tests for q in spec.quantities)

    def quantity_name(self, key: str, test: str) -> str:
        """``key`` for the primary test, ``<key>_<TEST>`` for the others."""
        return key if test == self.primary else f"{key}_{test}"


_ADU = re.compile(r"_adu(?=_|$)")


def electron_key(key: str) -> str:
    """``ron_img_adu`` -> ``ron_img_e``; ``dark_current_adu_s`` -> ``dark_current_e_s``."""
    if _ADU.search(key):
        return _ADU.sub("_e", key, count=1)
    return f"{key}_e"


def electron_unit(unit: str) -> str:
    return unit.replace("ADU", "e-") if "ADU" in unit else f"{unit} x e-/ADU"


def Q(key: str, unit: str, electrons: bool = False) -> Quantity:  # noqa: N802 - table shorthand
    return Quantity(key, unit, electrons)


_BIAS = (Q("offset_pre", "ADU"), Q("offset_img", "ADU"), Q("offset_ove", "ADU"),
         Q("ron_pre_adu", "ADU", True), Q("ron_img_adu", "ADU", True), Q("ron_ove_adu", "ADU", True),
         Q("dnl_spread_ratio", ""))
_PTC = (Q("gain", "e-/ADU"), Q("gain_err", "e-/ADU"), Q("a00", "1/e-"), Q("noise_e", "e-"),
        Q("turnoff_adu", "ADU", True), Q("bloom_adu", "ADU", True), Q("her", ""))
_NL = (Q("max_nl_pct", "%"), Q("max_nl_fluence_adu", "ADU", True), Q("rms_nl_resid_pct", "%"))
_BF = (Q("a00", "1/e-"), Q("a10", "1/e-"), Q("a01", "1/e-"), Q("a11", "1/e-"),
       Q("fwhm_x_half", "px"), Q("fwhm_y_half", "px"), Q("fwhm_x_growth_pct", "%"), Q("fwhm_y_growth_pct", "%"))
_FLAT = (Q("prnu_pct", "%"), Q("prnu_raw_pct", "%"), Q("prnu_master_pct", "%"), Q("n_defects", "pixels"),
         Q("n_bad_columns", "columns"), Q("column_prnu_pct", "%"))  # column_prnu_pct_<n>: PRNU per fluence
_TP = (Q("n_dipoles", "dipoles"), Q("tau_median_us", "us"), Q("pc_median", ""),
       Q("injection_adu", "ADU", True), Q("injection_noise_adu", "ADU", True))
_CROSSTALK = (Q("crosstalk_max", ""), Q("crosstalk_n_above", "couplings"), Q("crosstalk_ok", "1 = met"))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bias", "BIAS01", (TestSpec("BIAS01", _BIAS), TestSpec("BIAS02", _BIAS)),
           (MosaicSpec("BIAS0[12]", "master_bias", "STACK", "master bias"),),
           description="RON (ADU, e-), offsets pre/img/ove; master-bias mosaic; offsets and RON vs time",
           history=("offset_pre", "offset_img", "offset_ove", "offset_ref", "ron_pre_adu", "ron_img_adu",
                    "ron_ove_adu")),
    Family("dark", "DARK01", (TestSpec("DARK01", (Q("dark_current_adu_s", "ADU/s", True), Q("n_hot", "pixels"),
                                                  Q("n_cold", "pixels"), Q("n_bad_columns", "columns"))),),
           (MosaicSpec("DARK01", "master_dark", "STACK", "master dark"),),
           description="dark current (ADU/s, e-/s), hot pixels; master-dark mosaic"),
    Family("ptc", "PTC01", (TestSpec("PTC01", _PTC), TestSpec("PTC02*", _PTC)),
           description="gain map (the gain matrix), a00, full well / blooming (ADU, e-), HER; gain vs wavelength, "
                       "temperature, RD"),
    Family("nl", "NL01", (TestSpec("NL01", _NL), TestSpec("NL02*", _NL)),
           description="max non-linearity maps; NL curves per quadrant on the FPA"),
    Family("bf", "BF01", (TestSpec("BF01*", _BF),),
           description="a00, a matrix, FWHM x/y at half well; a-matrices and covariances per quadrant"),
    Family("flat", "FLAT01", (TestSpec("FLAT01", _FLAT), TestSpec("FLAT02*", _FLAT)),
           (MosaicSpec("FLAT0[12]*", "master_flat", "FLAT", "master flat"),),
           description="PRNU per wavelength; master-flat mosaics"),
    Family("cosmetics", "COSMETICS00", (TestSpec("COSMETICS00", (
        Q("n_defects", "pixels"), Q("n_dark_defects", "pixels"), Q("n_flat_defects", "pixels"),
        Q("n_bad_columns", "columns"))),
        TestSpec("DARK01", ()), TestSpec("FLAT0[12]*", ())),  # their masks only: the merged defect mask
        (MosaicSpec("COSMETICS00", "cosmetics_masks", "MASK", "defect mask"),),
        description="defect counts; defect-mask mosaic (COSMETICS00 | DARK01 | FLAT masks merged)"),
    Family("chinj", "CHINJ01", (
        TestSpec("CHINJ01", (Q("ig1_threshold_v", "V"), Q("ig1_notch_v", "V"), Q("slope_adu_per_v", "ADU/V", True),
                             Q("floor_adu", "ADU", True), Q("background_adu", "ADU", True),
                             Q("nonuniformity_max", ""), Q("spill_max", ""))),
        TestSpec("CHINJ02", (Q("idl_threshold_v", "V"), Q("amplitude_adu", "ADU", True),
                             Q("background_adu", "ADU", True), Q("nonuniformity_max", ""), Q("spill_max", ""))),
    ), description="threshold, notch, slope maps (V, ADU, e-)"),
    Family("tp", "TP01", tuple(TestSpec(t, _TP) for t in ("TP01", "TP11", "TP02", "TP21")),
           description="dipole counts, mean tau, injection level maps"),
    Family("psf", None, (
        TestSpec("FOCUS00*", (Q("best_focus_mm", "mm"), Q("fwhm_at_focus_px", "px"), Q("n_spots", "spots"))),
        TestSpec("PSF0[12]*", (Q("fwhm_x_px", "px"), Q("fwhm_y_px", "px"), Q("e1", ""), Q("e2", ""),
                               Q("fwhm_slope_px", "px / 10^4 ADU"), Q("n_spots", "spots"), *_CROSSTALK)),
    ), crosstalk=True, description="best focus, FWHM and BF-slope maps; crosstalk matrices per block; the crosstalk "
       "requirement per victim"),
    Family("persistence", "PERSIST01", (TestSpec("PERSIST01", (
        Q("persistence_adu", "ADU", True), Q("persistence_err_adu", "ADU", True), Q("n_saturated", "pixels"))),),
        description="persistence amplitude map"),
    Family("warm", "MOT_WARM", (TestSpec("MOT_WARM", (
        Q("ron_adu", "ADU", True), Q("offset_adu", "ADU"), Q("ramp_slope_adu_per_row", "ADU/row"),
        Q("ramp_nl_max_pct", "%"), Q("injection_adu", "ADU", True), Q("flat_fluence_adu", "ADU", True),
        Q("n_spots", "spots"), Q("her", ""))),),
        description="RON, offsets, injection maps of the warm check"),
)}

#: quantities of the psf family computed here from the top-level ``crosstalk`` matrix
CROSSTALK_KEYS = tuple(q.key for q in _CROSSTALK)


def families_of(test: str) -> list[Family]:
    """Families that aggregate ``test`` (the base test name, no repeat suffix); a new PTC01 also
    recomputes every family converting to electrons."""
    out = [f for f in FAMILIES.values() if f.uses(test)]
    if test == GAIN_TEST:
        out += [f for f in FAMILIES.values() if f.converts_to_electrons and f not in out]
    return out


def select(names: list[str] | None) -> list[Family]:
    """Families by name (all when ``names`` is empty); ValueError naming an unknown one."""
    if not names:
        return list(FAMILIES.values())
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                         f"(known: {', '.join(FAMILIES)})")
    return [FAMILIES[n] for n in names]


__all__ = ["CROSSTALK_KEYS", "FAMILIES", "Family", "GAIN_KEY", "GAIN_TEST", "MosaicSpec", "Quantity", "TestSpec",
           "electron_key", "electron_unit", "families_of", "select"]

"""Test-specific checks of the validator (campaign.md): dark fluence, flat fluence per script
column and the flux check, NL background and stability frames, source on / off. Frames come
from the simulator's physics at the real geometry, statistics from the validator's own
``frame_stats``; only the exposure-log values claimed for a frame are varied (a wrong filter,
a closed shutter, a wrong exposure time)."""

from __future__ import annotations

import numpy as np
import pytest

from services.sim.frames import exposure_conditions, frame_kind
from services.sim.physics import DetectorModel, PhysicsConfig
from services.validator.checks import all_passed, frame_stats
from services.validator.specific import assess_test_specific, frame_role
from shared.flags import Flag
from shared.geometry import QUADRANTS, Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = chamber_profile("CHAMBER_A_JUN18")
GEOMETRY = Geometry()


def _frame(model: DetectorModel, regs: dict, seed: int) -> np.ndarray:
    """One CCD1 frame (ADU, as digitised) of the register values ``regs``."""
    exp = exposure_conditions(regs, frame_kind(regs), CHAMBER)
    quads = {q: model.simulate_quadrant("CCD1", q, exp, model.rng("t", seed, q), GEOMETRY).data for q in QUADRANTS}
    return np.clip(np.rint(assemble(quads, GEOMETRY)), 0, 65535)


@pytest.fixture(scope="module")
def frames():
    """A 50 % flat at 800 nm (27 s), a 565 s dark and a bias, CCD1 of one block."""
    model = DetectorModel(PhysicsConfig(), "BORN", seed=3)
    flat = {"exptime": 27.0, "shuttr": 1, "source": "flat", "wave": 4, "vstart": 0, "vend": 2086}
    dark = {"exptime": 565.0, "shuttr": 0, "source": "flat", "wave": 4, "vstart": 0, "vend": 2086}
    bias = {"exptime": 0.0, "shuttr": 0, "source": "flat", "wave": 4, "vstart": 0, "vend": 2086}
    return {name: (frame_stats(_frame(model, regs, i), integer=True), regs)
            for i, (name, regs) in enumerate((("flat", flat), ("dark", dark), ("bias", bias)))}


def _check(test, stats, row):
    return assess_test_specific(test, {"CCD1": stats}, {"CCD1": row}, CHAMBER)


def test_nominal_flat_passes_fluence_and_flux(frames):
    stats, row = frames["flat"]
    tree, flags, notes = _check("FLAT01", stats, row)
    assert flags == Flag(0), tree
    assert all_passed(tree) and not notes
    ratios = [tree["fluence"]["CCD1"][q]["value"] for q in QUADRANTS]
    assert all(0.9 < r < 1.1 for r in ratios)  # the simulated gains are 3.1-3.5 e-/ADU around the 3.2 of tFWC
    assert 0.9 < tree["flux"]["CCD1"]["value"] < 1.1


def test_wrong_filter_fails_fluence_and_flux(frames):
    """The log says 590 nm (tFWC 15 s) for a frame taken at 800 nm (54 s): 3.6 x less signal
    than expected."""
    stats, row = frames["flat"]
    tree, flags, _ = _check("FLAT01", stats, {**row, "wave": 1})
    assert Flag.FLUENCE_OOL in flags and Flag.FLUX_OOL in flags
    assert tree["flux"]["CCD1"]["value"] == pytest.approx(54.0 / 15.0, rel=0.1)


def test_closed_shutter_is_source_off(frames):
    """A bias frame where the script expected a 50 % flat: no signal at all."""
    stats, _ = frames["bias"]
    tree, flags, _ = _check("PTC01", stats, frames["flat"][1])
    assert Flag.SOURCEOFF in flags and Flag.FLUENCE_OOL in flags
    assert not all_passed(tree)


def test_wrong_exposure_time_fails_fluence_only_beyond_10_percent(frames):
    stats, row = frames["flat"]
    _, ok, _ = _check("FLAT01", stats, {**row, "exptime": 27.0 * 0.95})
    _, bad, _ = _check("FLAT01", stats, {**row, "exptime": 27.0 * 1.3})
    assert Flag.FLUENCE_OOL not in ok
    assert Flag.FLUENCE_OOL in bad


def test_dark_fluence_in_limits_and_light_leak_is_source_on(frames):
    stats, row = frames["dark"]
    tree, flags, _ = _check("DARK01", stats, row)
    assert flags == Flag(0), tree
    signal = [tree["fluence"]["CCD1"][q]["value"] for q in QUADRANTS]
    assert all(-2 <= s <= 5 for s in signal)  # 0.001-0.003 e-/s x 565 s / ~3.3 e-/ADU: ~0.3 ADU
    # a flat taken while the log says dark: light leak
    tree, flags, _ = _check("DARK01", frames["flat"][0], row)
    assert Flag.FLUENCE_OOL in flags and Flag.SOURCEON in flags


def test_nl_background_and_stability(frames):
    flat_stats, flat_row = frames["flat"]
    bias_stats, bias_row = frames["bias"]
    _, flags, _ = _check("NL01", bias_stats, {**bias_row, "comments": "BGD"})
    assert flags == Flag(0)
    tree, flags, _ = _check("NL01", flat_stats, {**flat_row, "comments": "STAB"})
    assert flags == Flag(0), tree  # the 27 s flat is the 50 % stability level
    _, flags, _ = _check("NL01", flat_stats, {**flat_row, "comments": "BGD"})
    assert Flag.BGD_OOL in flags  # a lit frame claimed as background
    _, flags, _ = _check("NL01", bias_stats, {**flat_row, "comments": "STAB"})
    assert Flag.FLUENCE_OOL in flags and Flag.SOURCEOFF in flags


def test_roles_and_unknown_wavelength():
    assert frame_role("FLAT02_730", {"exptime": 5, "shuttr": 1, "source": "flat"}) == "flat"
    assert frame_role("BIAS01", {"exptime": 0, "shuttr": 0}) == "no_light"
    assert frame_role("CHINJ01", {"exptime": 0, "chinj": 1}) == "injection"
    assert frame_role("NL02", {"comments": "FLU", "exptime": 3, "shuttr": 1}) == "other"
    stats = {q: {r: {"offset": 1000.0} for r in ("pre", "img", "ove")} for q in QUADRANTS}
    tree, flags, notes = assess_test_specific("FLAT01", {"CCD1": stats}, {"CCD1": {"exptime": 5, "shuttr": 1, "wave": 9}}, CHAMBER)
    assert tree == {} and flags == Flag(0) and "no tFWC_flat" in notes[0]


def test_injection_checks_on_the_well_injected_half():
    """CHINJ01 frames from the simulator: a nominal one passes on the well-injected half (E, F
    at id_dly / toi_ch = 2.5); the same pixels claimed at a 6 V lower notch (expected 3 x less)
    fail the level; id_wid < 10 expects nothing."""
    from services.sim.frames import FrameSpec
    from services.validator.specific import injection_registers, injection_stats

    model = DetectorModel(PhysicsConfig(), "BORN", seed=4)
    regs = FrameSpec(test="CHINJ01", values={"chinj": 1, "chinj_on": 30, "chinj_of": 100, "IDL": 11, "IG2_T": 6, "IG2_B": 6,
                                              **{f"IG1_{c}_{s}": 4.0 for c in (1, 2, 3) for s in "TB"},
                                              "id_dly": 1250, "toi_ch": 500, "id_wid": 100}).registers()
    data = _frame(model, regs, 7)
    stats = frame_stats(data, integer=True)
    inj = {"CCD1": injection_stats(data, injection_registers(regs), stats)}
    tree, flags, notes = assess_test_specific("CHINJ01", {"CCD1": stats}, {"CCD1": regs}, CHAMBER, inj)
    assert flags == Flag(0), tree
    assert set(tree["injection"]["CCD1"]) == {"E", "F"}  # G, H inject poorly at this delay: not judged
    ratio = tree["injection"]["CCD1"]["E"]["level"]["value"]
    assert 0.8 < ratio < 1.25 and 0.03 < tree["injection"]["CCD1"]["E"]["std"]["value"] < 0.1
    low_notch = {**regs, "IG2_T": 4.5}  # expected 600 + 0.5 x 6000: 3.6 x less than injected
    _, flags, _ = assess_test_specific("CHINJ01", {"CCD1": stats}, {"CCD1": low_notch}, CHAMBER, inj)
    assert Flag.FLUENCE_OOL in flags
    _, flags, _ = assess_test_specific("CHINJ01", {"CCD1": stats}, {"CCD1": {**regs, "id_wid": 5}}, CHAMBER, inj)
    assert Flag.FLUENCE_OOL in flags  # nothing expected, 12600 ADU seen
    _, flags, notes = assess_test_specific("CHINJ01", {"CCD1": stats}, {"CCD1": {**regs, "IDL": 12}}, CHAMBER, inj)
    assert flags == Flag(0) and "expected injection unknown" in notes[0]

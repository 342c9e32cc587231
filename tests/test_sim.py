"""The acquisition simulator: `vison sim` + `vison qla` round trip at full size, truth.json,
ELVIS files readable by the parsers, reproducibility, HK out-of-limit injection, and the
physics (gain / Poisson, brighter-fatter covariances, non-linearity, blooming, defects) on
single quadrants or small arrays."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from services.sim import hk as simhk
from services.sim import runner as simrunner
from services.sim.frames import FrameSpec, SequenceSpec, exposure_conditions, frame_geometry, frame_kind
from services.sim.physics import (
    FULL_SCALE_ADU,
    REFERENCE_GAIN,
    DetectorModel,
    Exposure,
    PhysicsConfig,
    apply_bf,
    bf_coefficients,
    bf_expected_covariances,
    bf_kernel,
    bloom,
    exponential_c00,
    shot_noise,
)
from services.sim.runner import SimOptions, Simulator, SimTruthError
from shared.explog import read_explog
from shared.fitsio import is_complete_fits, read_frame, to_uint16
from shared.geometry import CCDS, IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, GeometryError, quadrant
from shared.hk import check_hk_limits, read_hk
from shared.refdata import block_offsets, chamber_profile

START = "2024-05-06T10:00:00"
SPEC = """
block: BORN
seed: 7
sequences:
  - {test: BIAS01, frames: 1, exptime: 0}
  - {test: FLAT01, frames: 1, fluence: 0.5, wave: 4}
"""


def vison_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`vison ...` as a separate process."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def vison(capsys):
    """`vison ...` in this process (same entry point, no interpreter start-up): returns an
    object with returncode, stdout, stderr."""
    from services.cli import main

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return call


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One full-size run: a bias (ObsID 1) and a 50 % flat (ObsID 2), CCD1_TEMP_T pushed out of
    its limits from ObsID 2, 4 hot pixels per CCD."""
    out = tmp_path_factory.mktemp("sim")
    spec = out.parent / f"{out.name}-spec.yaml"
    spec.write_text(SPEC)
    res = vison_process("sim", "--out", str(out), "--spec", str(spec), "--start", START,
                "--hk-ool", "CCD1_TEMP_T:hi@2", "--hot-pixels", "4", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["frames"] == 2 and summary["obsids"] == [1, 2]
    return out


def truth(run_dir: Path) -> dict:
    return json.loads((run_dir / "truth.json").read_text())


# --------------------------------------------------------------------------------------------
# full size, through the command line
# --------------------------------------------------------------------------------------------


@pytest.mark.fullsize
def test_qla_round_trip_offsets_and_noise(run_dir, vison):
    t = truth(run_dir)
    bias = t["frames"][0]
    assert bias["kind"] == "bias" and bias["obsid"] == 1
    for rel in bias["files"]:
        res = vison("qla", "--json", str(run_dir / rel))
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        ccd = f"CCD{rel[-6]}"
        for q in QUADRANTS:
            qt = t["ccds"][ccd]["quadrants"][q]
            for region in ("pre", "img", "ove"):
                stats = report[q][region]
                assert abs(stats["mean"] - qt["offset_adu"]) < 0.1, (ccd, q, region, stats["mean"], qt["offset_adu"])
                assert abs(stats["std"] / qt["ron_adu"] - 1) < 0.03, (ccd, q, region, stats["std"], qt["ron_adu"])


@pytest.mark.fullsize
def test_truth_content(run_dir):
    t = truth(run_dir)
    assert t["seed"] == 7 and t["block"] == "BORN" and t["schema"] == simrunner.TRUTH_SCHEMA
    ref = block_offsets("BORN")
    for ccd in CCDS:
        c = t["ccds"][ccd]
        assert len(c["hot_pixels"]) == 4
        for q in QUADRANTS:
            qt = c["quadrants"][q]
            assert abs(qt["offset_adu"] - ref[ccd][q]) <= 3.0
            assert 1.25 <= qt["ron_adu"] <= 1.40 and 3.1 <= qt["gain_e_per_adu"] <= 3.5
            assert qt["ron_analog_adu"] == pytest.approx(np.sqrt(qt["ron_adu"] ** 2 - 1 / 12))
            for key in ("dark_e_per_s", "full_well_e", "prnu_pct", "nl", "bf"):
                assert key in qt
            assert qt["bf"]["a00"] == pytest.approx(-2 * (qt["bf"]["a10"] + qt["bf"]["a01"]))
    assert [f["obsid"] for f in t["frames"]] == [1, 2]
    flat = t["frames"][1]
    assert flat["kind"] == "flat" and flat["nm"] == 800
    assert flat["exptime"] == pytest.approx(0.5 * chamber_profile(t["chamber"])["tFWC_flat"]["nm800"])
    assert flat["hk_injected"] == ["CCD1_TEMP_T"] and t["frames"][0]["hk_injected"] == []
    e = flat["ccds"]["CCD1"]["E"]
    assert {"fluence_e", "fluence_adu", "signal_adu", "expected_cov_e2", "bf_kernel"} <= set(e)
    assert t["runs"][0]["sequence"][0]["test"] == "BIAS01"
    assert t["hk_injections"][0]["key"] == "CCD1_TEMP_T"
    for f in t["frames"]:
        for rel in f["files"] + [f["hk_file"]]:
            assert (run_dir / rel).is_file()


@pytest.mark.fullsize
def test_flat_fluence_matches_truth(run_dir):
    """The written flat's image level (minus the prescan offset) equals the recorded signal."""
    t = truth(run_dir)
    flat = t["frames"][1]
    for rel in flat["files"][:1]:
        frame = read_frame(run_dir / rel)
        ccd = f"CCD{rel[-6]}"
        for q in QUADRANTS:
            quad = quadrant(frame.data, q)
            img = quad[10:IMAGE_ROWS - 10, PRESCAN_COLS + 10: PRESCAN_COLS + IMAGE_COLS - 10]
            pre = quad[10:IMAGE_ROWS - 10, 25:46]
            level = float(img.mean()) - float(pre.mean())
            expected = flat["ccds"][ccd][q]["signal_adu"]
            assert abs(level / expected - 1) < 0.005, (q, level, expected)
            # about half of 2^16 ADU (source at the reference gain, per-quadrant gain 3.1-3.5)
            assert 0.4 < level / FULL_SCALE_ADU < 0.6


@pytest.mark.fullsize
def test_explog_hk_and_fits_headers(run_dir):
    day = run_dir / "060524"
    log = read_explog(day / "EXP_LOG_060524.txt")
    assert log.version == "7.5.X" and not log.partial_tail and not log.errors
    assert [(r.obsid, r.ccd) for r in log.rows] == [(o, c) for o in (1, 2) for c in (1, 2, 3)]
    for row in log.rows:
        assert (day / (row.file_name + ".fits")).is_file()
        assert row.test == ("BIAS01" if row.obsid == 1 else "FLAT01")
        assert row.values["vstart"] == 0 and row.values["vend"] == 2086 and row.values["IPHI"] == "I1I2I3"
    first = log.rows_of(1)[0]
    assert first.date == datetime.fromisoformat(START)
    hdr = read_frame(day / (first.file_name + ".fits")).header
    assert hdr["OBSID"] == 1 and hdr["EXPTIME"] == 0 and hdr["VEND"] == 2086 and hdr["WAVE"] == 4
    assert hdr["DATE"] == START and hdr["EXTNAME"] == "ROE1_CCD1"
    assert hdr["R1C1_TT"] == pytest.approx(first.values["R1C1_TT"]) and hdr["OD_1_T"] == 26

    # per-exposure HK: nominal values pass every limit for ObsID 1; CCD1_TEMP_T fails from ObsID 2
    for obsid in (1, 2):
        row = log.rows_of(obsid)[0]
        hk_file = next(day.glob(f"HK_{obsid}_*_ROE1.txt"))
        table = read_hk(hk_file)
        assert table.kind == "exposure" and table.version == "7.5.X"
        assert len(table.timestamps) == int(np.ceil(simhk_duration(row) / 5.0))
        failed = {v.key for v in check_hk_limits(table, row) if v.passed is False}
        assert failed == (set() if obsid == 1 else {"CCD1_TEMP_T"})
        if obsid == 2:  # the exposure log repeats the HK temperature
            assert row.values["R1C1_TT"] > -119
    daily = read_hk(day / "HK_06-05-24_ROE1.txt")
    assert daily.kind == "daily"
    n_exposure = sum(len(read_hk(p).timestamps) for p in day.glob("HK_*_*T_ROE1.txt"))
    assert len(daily.timestamps) == n_exposure
    assert all(a < b for a, b in zip(daily.timestamps, daily.timestamps[1:]))


def simhk_duration(row) -> float:
    from services.sim.frames import duration_s

    return duration_s({**FrameSpec(test=row.test).registers(), "exptime": row.values["exptime"]})


@pytest.mark.fullsize
def test_seed_reproducible(run_dir, tmp_path, vison):
    res = vison("sim", "--out", str(tmp_path), "--block", "BORN", "--seed", "7", "--start", START,
                "--test", "BIAS01", "--frames", "1", "--hot-pixels", "4", "--hk-ool", "CCD1_TEMP_T:hi@2")
    assert res.returncode == 0, res.stderr
    name = "060524/EUC_1_060524D100000T_ROE1_CCD2.fits"
    a, b = read_frame(run_dir / name).data, read_frame(tmp_path / name).data
    assert np.array_equal(a, b)
    assert truth(tmp_path)["ccds"] == truth(run_dir)["ccds"]
    # another seed: other pixels, other truth
    other = tmp_path / "other"
    res = vison("sim", "--out", str(other), "--block", "BORN", "--seed", "8", "--start", START,
                "--test", "BIAS01", "--frames", "1")
    assert res.returncode == 0, res.stderr
    assert not np.array_equal(a, read_frame(other / name).data)
    assert truth(other)["ccds"]["CCD1"]["quadrants"]["E"]["ron_adu"] != truth(run_dir)["ccds"]["CCD1"]["quadrants"]["E"]["ron_adu"]


@pytest.mark.fullsize
def test_other_truth_refused(run_dir, vison):
    with pytest.raises(SimTruthError):
        Simulator(SimOptions(out=run_dir, block="BORN", seed=99))
    res = vison("sim", "--out", str(run_dir), "--seed", "99", "--test", "BIAS01")
    assert res.returncode == 2 and "another detector model" in res.stderr


@pytest.mark.fullsize
def test_geometry_variants(tmp_path, vison):
    res = vison("sim", "--out", str(tmp_path), "--seed", "1", "--start", START, "--test", "BIAS01",
                "--naxis2", "4132", "--overscan", "29")
    assert res.returncode == 0, res.stderr
    path = next((tmp_path / "060524").glob("EUC_1_*_CCD1.fits"))
    frame = read_frame(path)
    assert frame.data.shape == (4132, 4256) and frame.geometry.overscan == 29
    assert frame.header["VEND"] == 2066
    assert read_explog(next((tmp_path / "060524").glob("EXP_LOG_*"))).rows[0].values["vend"] == 2066


@pytest.mark.fullsize
def test_realtime_cadence_and_write_order(tmp_path, monkeypatch):
    """Realtime playing waits the frame duration / speed-up; the exposure-log rows are appended
    only once the exposure's 3 FITS files exist."""
    appended = []
    original = simrunner._append

    def checked_append(path: Path, text: str, header: str) -> None:
        if path.name.startswith("EXP_LOG_"):
            for line in text.splitlines():
                name = line.split("\t")[1] + ".fits"
                assert (path.parent / name).is_file(), f"log row before its FITS file {name}"
                assert is_complete_fits(path.parent / name)
            appended.append(path.name)
        original(path, text, header)

    monkeypatch.setattr(simrunner, "_append", checked_append)
    opts = SimOptions(out=tmp_path, seed=2, realtime=True, speedup=200.0, start=datetime(2024, 1, 2, 3, 4, 5))
    sim = Simulator(opts)
    tic = time.monotonic()
    records = sim.play([FrameSpec(test="BIAS01")])
    elapsed = time.monotonic() - tic
    assert appended == ["EXP_LOG_020124.txt"]
    assert records[0]["duration_s"] == pytest.approx(93.5, abs=0.1)
    assert elapsed >= 93.5 / 200.0


def test_campaign_tests_dry_run(vison):
    from shared.campaign.catalogue import get_test

    res = vison("sim", "--out", "/nonexistent-never-written", "--tests", "BIAS01,FLAT01", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    expected = sum(get_test(n).script(chamber="CHAMBER_A_JUN18").total_frames for n in ("BIAS01", "FLAT01"))
    assert plan["frames"] == expected
    assert {r["kind"] for r in plan["list"]} == {"bias", "flat"}
    assert not Path("/nonexistent-never-written").exists()


def test_cli_errors(vison):
    res = vison("sim", "--out", "/tmp/x-never", "--dry-run")
    assert res.returncode == 2 and "nothing to simulate" in res.stderr
    res = vison("sim", "--out", "/tmp/x-never", "--test", "BIAS01", "--hk-ool", "NOPE:1", "--dry-run")
    assert res.returncode == 2 and "unknown HK key" in res.stderr
    res = vison("sim", "--out", "/tmp/x-never", "--test", "X", "--exptime", "1", "--fluence", "0.5", "--dry-run")
    assert res.returncode == 2 and "not both" in res.stderr


# --------------------------------------------------------------------------------------------
# physics on single quadrants / small arrays
# --------------------------------------------------------------------------------------------


def _image(quad: np.ndarray) -> np.ndarray:
    return quad[5:IMAGE_ROWS - 5, PRESCAN_COLS + 5: PRESCAN_COLS + IMAGE_COLS - 5].astype(np.float64)


def test_flat_pair_gives_gain_and_poisson_variance():
    """Difference of two flats: var/2 = signal/gain + RON^2 (no BF), mean = recorded fluence."""
    model = DetectorModel(PhysicsConfig(bf_a00=0.0, gain=3.2, ron_adu=1.4), "BORN", seed=3)
    qt = model.truth["CCD1"].quadrants["F"]
    exp = Exposure(kind="flat", exptime=10.0, flux_e_per_s=6000.0, dark_time=10.0)
    geom = Geometry()
    a = model.simulate_quadrant("CCD1", "F", exp, model.rng("a"), geom)
    b = model.simulate_quadrant("CCD1", "F", exp, model.rng("b"), geom)
    ia, ib = _image(to_uint16(a.data)), _image(to_uint16(b.data))
    signal = 0.5 * (ia.mean() + ib.mean()) - qt.offset_adu
    assert signal == pytest.approx(a.info["fluence_adu"], rel=2e-3)
    var = np.var(ia - ib) / 2
    gain = signal / (var - qt.ron_adu**2)
    assert gain == pytest.approx(3.2, rel=0.01)
    # a single flat carries the PRNU on top of the shot noise
    assert np.var(ia) > 1.5 * var


def test_brighter_fatter_covariances_grow_with_fluence():
    bf = bf_coefficients(-2.0e-6, anisotropy=1.3)
    rng = np.random.default_rng(11)
    measured = {}
    for mu in (3.0e4, 1.2e5):
        lam = np.full((1500, 1500), mu, dtype=np.float32)
        dev = apply_bf(shot_noise(lam, rng), bf_kernel(mu, bf))[2:-2, 2:-2].astype(np.float64)
        dev -= dev.mean()
        c00 = float(np.mean(dev * dev))
        c10 = float(np.mean(dev[:, 1:] * dev[:, :-1]))  # serial (x) neighbours
        c01 = float(np.mean(dev[1:, :] * dev[:-1, :]))  # parallel (y) neighbours
        exp = bf_expected_covariances(mu, bf)
        assert c00 == pytest.approx(float(exponential_c00(mu, bf.a00)), rel=0.01)
        assert c00 == pytest.approx(exp["C00"], rel=0.01)
        assert c10 > 0 and c01 > 0 and c01 > c10
        assert c10 == pytest.approx(exp["C10"], rel=0.1) and c01 == pytest.approx(exp["C01"], rel=0.1)
        measured[mu] = (c10, c01)
    # first order: C10 = a10 mu^2
    assert measured[3.0e4][0] == pytest.approx(bf.a10 * 3.0e4**2, rel=0.15)
    assert measured[1.2e5][0] / measured[3.0e4][0] > 8  # ~ (1.2e5 / 3e4)^2 = 16, minus saturation of the model
    # without BF: no correlation
    dev = apply_bf(shot_noise(np.full((800, 800), 1e5, np.float32), rng), bf_kernel(1e5, bf_coefficients(0.0)))
    assert abs(np.mean(dev[:, 1:] * dev[:, :-1])) < 0.02 * 1e5


def test_nonlinearity_curve_as_configured():
    cfg = PhysicsConfig(nl_pct=1.0, nl_at_fraction=0.9, gain=3.3, bf_a00=0.0)
    model = DetectorModel(cfg, "BORN", seed=5)
    qt = model.truth["CCD2"].quadrants["G"]
    assert 100 * qt.nl.beta_per_adu * qt.nl.at_adu == pytest.approx(1.0)
    assert qt.nl.at_adu == pytest.approx(0.9 * FULL_SCALE_ADU)
    geom = Geometry()
    for frac in (0.05, 0.5, 0.9):
        exptime = 10.0
        flux = frac * FULL_SCALE_ADU * 3.3 / exptime
        res = model.simulate_quadrant("CCD2", "G", Exposure(kind="flat", exptime=exptime, flux_e_per_s=flux), model.rng("nl", frac), geom)
        lin = res.info["fluence_adu"]
        measured = _image(res.data).mean() - qt.offset_adu
        nl_pct = 100 * (measured - lin) / lin
        assert nl_pct == pytest.approx(100 * qt.nl.beta_per_adu * lin, abs=0.02)
        assert res.info["pixels_above_full_well"] == 0
    assert 100 * qt.nl.beta_per_adu * 0.9 * FULL_SCALE_ADU == pytest.approx(1.0)


def test_blooming_and_adc_saturation():
    # an isolated saturated run: charge conserved, spread symmetrically along the column only
    q = np.full((300, 40), 1000.0, np.float32)
    q[140:150, 20] = 600_000.0
    total = q.sum(dtype=np.float64)
    out, n = bloom(q.copy(), 200_000.0)
    assert n == 10 and out.max() == 200_000.0
    assert out.sum(dtype=np.float64) == pytest.approx(total, rel=1e-6)
    col = out[:, 20]
    above, below = (col[150:] > 1000).sum(), (col[:140] > 1000).sum()
    assert above == below > 0
    assert np.array_equal(out[:, :20], q[:, :20]) and np.array_equal(out[:, 21:], q[:, 21:])
    # a flat above full scale: clipped by the 16-bit ADC at 65535
    model = DetectorModel(PhysicsConfig(gain=3.1), "BORN", seed=1)
    res = model.simulate_quadrant("CCD1", "H", Exposure(kind="flat", exptime=1.0, flux_e_per_s=1.2 * FULL_SCALE_ADU * 3.3), model.rng("sat"), Geometry())
    img = _image(to_uint16(res.data))
    assert img.max() == 65535 and np.mean(img == 65535) > 0.9
    assert res.info["pixels_above_full_well"] > 0


def test_hot_pixels_and_bad_columns():
    cfg = PhysicsConfig(hot_pixels=6, bad_columns=4, dark_range_e_per_s=(0.001, 0.001))
    model = DetectorModel(cfg, "CURIE", seed=9)
    t = model.truth["CCD3"]
    assert len(t.hot_pixels) == 6 and len(t.bad_columns) == 4
    assert {b.kind for b in t.bad_columns} == {"dead", "hot"}
    q = t.hot_pixels[0].quadrant
    qt = t.quadrants[q]
    dark = model.simulate_quadrant("CCD3", q, Exposure(kind="dark", exptime=565.0, dark_time=565.0), model.rng("d"), Geometry())
    for hp in (h for h in t.hot_pixels if h.quadrant == q):
        expected = qt.offset_adu + hp.dark_e_per_s * 565.0 / qt.gain_e_per_adu
        assert dark.data[hp.row, hp.col] == pytest.approx(expected, rel=0.05)
    dead = next(b for b in t.bad_columns if b.kind == "dead")
    flat = model.simulate_quadrant("CCD3", dead.quadrant, Exposure(kind="flat", exptime=1.0, flux_e_per_s=60000.0), model.rng("f"), Geometry())
    col = flat.data[dead.row_start + 5: IMAGE_ROWS - 5, dead.col] - t.quadrants[dead.quadrant].offset_adu
    ref = flat.data[dead.row_start + 5: IMAGE_ROWS - 5, dead.col + 3] - t.quadrants[dead.quadrant].offset_adu
    assert col.mean() / ref.mean() == pytest.approx(dead.response, rel=0.05)


def test_bias_has_no_signal_and_virtual_regions_only_noise():
    model = DetectorModel(PhysicsConfig(hot_pixels=10, cosmic_rate=0.0), "BORN", seed=4)
    res = model.simulate_quadrant("CCD2", "E", Exposure(kind="bias"), model.rng("b"), Geometry())
    assert res.info == {}
    flat = model.simulate_quadrant("CCD2", "E", Exposure(kind="flat", exptime=10.0, flux_e_per_s=5000.0), model.rng("f"), Geometry())
    off = model.truth["CCD2"].quadrants["E"].offset_adu
    assert abs(flat.data[:IMAGE_ROWS, 5:45].mean() - off) < 0.05  # prescan
    assert abs(flat.data[IMAGE_ROWS + 2:, 100:2000].mean() - off) < 0.1  # parallel overscan
    assert abs(flat.data[:IMAGE_ROWS, PRESCAN_COLS + IMAGE_COLS + 3:].mean() - off) < 0.05  # serial overscan
    assert flat.data[:IMAGE_ROWS, 100:2000].mean() - off > 10000


def test_cosmic_rays_recorded():
    model = DetectorModel(PhysicsConfig(cosmic_rate=0.05), "BORN", seed=4)
    res = model.simulate_quadrant("CCD1", "E", Exposure(kind="dark", exptime=565.0, dark_time=565.0), model.rng("cr"), Geometry())
    n = res.info["cosmic_rays"]
    area = IMAGE_ROWS * IMAGE_COLS * (12e-4) ** 2
    assert n == pytest.approx(0.05 * area * (565 + 72), rel=0.3)
    off = model.truth["CCD1"].quadrants["E"].offset_adu
    assert (res.data[:IMAGE_ROWS] > off + 100).sum() >= n


def test_readout_window_and_geometry():
    assert frame_geometry({"vstart": 0, "vend": 2086}).shape == (4172, 4238)
    assert frame_geometry({"vstart": 0, "vend": 100}, overscan=29).shape == (4132, 4256)
    with pytest.raises(GeometryError):
        frame_geometry({"vstart": 0, "vend": 2075})
    model = DetectorModel(PhysicsConfig(), "BORN", seed=1)
    res = model.simulate_quadrant("CCD1", "G", Exposure(kind="bias", vstart=0, vend=100), model.rng("w"), Geometry(parallel_overscan=False))
    assert res.data.shape == (2066, 2119)
    assert np.all(res.data[100:] == 0) and np.all(res.data[:100] > 1000)


def test_sequence_expansion_and_kinds():
    ch = chamber_profile("CHAMBER_A_JUN18")
    frames = SequenceSpec(test="PTC01", frames=[2, 1], fluence=[0.1, 0.5], wave=4).expand(ch)
    assert [f.values["exptime"] for f in frames] == [5.4, 5.4, 27.0]
    assert [f.column for f in frames] == [0, 0, 1]
    assert frame_kind(FrameSpec(test="BIAS01").registers()) == "bias"
    dark = SequenceSpec(test="DARK01", frames=1, exptime=565).expand(ch)[0]
    assert frame_kind(dark.registers()) == "dark"
    assert frame_kind({"exptime": 2, "shuttr": 1, "source": "point"}) == "point"
    assert frame_kind({"chinj": 1, "exptime": 0}) == "chinj"
    exp = exposure_conditions({**frames[2].registers()}, "flat", ch, drift_factor=1.01)
    assert exp.flux_e_per_s == pytest.approx(FULL_SCALE_ADU * REFERENCE_GAIN / 54.0 * 1.01)
    with pytest.raises(ValueError):
        SequenceSpec(test="X", frames=[1, 2, 3], exptime=[1, 2]).expand(ch)


def test_hk_nominal_within_limits_and_injection():
    regs = FrameSpec(test="BIAS01", values={"IDL": 11}).registers()
    start = datetime(2024, 1, 1, 12, 0, 0)
    times = simhk.sample_times(start, 93.5, 5.0)
    assert len(times) == 19 and (times[-1] - start).total_seconds() == 90
    rows = simhk.hk_samples(times, regs, np.random.default_rng(0), obsid=5, run_start=start)
    stats = {k: {"min": min(r[k] for _, r in rows), "max": max(r[k] for _, r in rows)} for k in rows[0][1]}
    verdicts = check_hk_limits(stats, regs)
    assert len(verdicts) == 2 * len(simhk.hk_keys())
    assert all(v.passed for v in verdicts), [v.reason for v in verdicts if not v.passed]
    assert np.mean([r["FPGA_BIAS_ID2"] for _, r in rows]) == pytest.approx(11, abs=0.02)  # commanded IDL
    inj = [simhk.parse_hk_injection("RPSU_28V_PRI_I:lo@5-6"), simhk.parse_hk_injection("SPW_STATUS_REG:hi@t30"),
           simhk.parse_hk_injection("CCD2_TEMP_B:-100")]
    assert inj[0].from_obsid == 5 and inj[0].to_obsid == 6 and inj[1].from_s == 30 and inj[2].from_obsid is None
    rows = simhk.hk_samples(times, regs, np.random.default_rng(0), obsid=5, run_start=start, injections=inj)
    assert [r["SPW_STATUS_REG"] for _, r in rows][5:7] == [12192, 12193]
    stats = {k: {"min": min(r[k] for _, r in rows), "max": max(r[k] for _, r in rows)} for k in rows[0][1]}
    failed = {v.key for v in check_hk_limits(stats, regs, kinds=("P",)) if v.passed is False}
    assert failed == {"RPSU_28V_PRI_I", "SPW_STATUS_REG", "CCD2_TEMP_B"}
    assert not inj[0].active(obsid=7, seconds_from_start=0)
    with pytest.raises(ValueError):
        simhk.parse_hk_injection("CCD1_TEMP_T")


def test_charge_injection_and_point_sources():
    from services.sim.injection import injection_level_adu
    from services.sim.physics import SPOTS_PER_QUADRANT

    model = DetectorModel(PhysicsConfig(), "BORN", seed=6)
    qt = model.truth["CCD1"].quadrants["E"]
    pump = {"IDL": 11, "IG1_1_T": 4, "IG1_1_B": 4, "IG2_T": 6, "IG2_B": 6, "id_wid": 100, "id_dly": 1250, "toi_ch": 500}
    level = injection_level_adu(pump, "E", 1, qt.injection)
    assert level == pytest.approx(600 + qt.injection.slope_adu_per_v * (2 + qt.injection.dx_notch_v), rel=1e-3)
    assert injection_level_adu({**pump, "IDL": 13}, "E", 1, qt.injection) < 0.05 * level  # above the IDL threshold
    assert injection_level_adu({**pump, "id_wid": 5}, "E", 1, qt.injection) == 0
    values = {**pump, "chinj": 1, "chinj_on": 30, "chinj_of": 100}
    res = model.simulate_quadrant("CCD1", "E", Exposure(kind="chinj", values=values), model.rng("ci"), Geometry())
    prof = np.median(res.data[:IMAGE_ROWS, PRESCAN_COLS + 5:PRESCAN_COLS + IMAGE_COLS - 5], axis=1) - qt.offset_adu
    assert res.info["well_injected"] and prof[5:25].mean() == pytest.approx(level, rel=0.02) and abs(prof[40:120].mean()) < 1
    assert prof[130:160].mean() == pytest.approx(level, rel=0.02)
    poor = model.simulate_quadrant("CCD1", "G", Exposure(kind="chinj", values=values), model.rng("ci2"), Geometry())
    assert not poor.info["well_injected"]  # id_dly / toi_ch = 2.5: E and F inject well

    ch = chamber_profile("CHAMBER_A_JUN18")
    regs = FrameSpec(test="PSF01_800", values={"source": "point", "mirr_on": 1, "mirr_pos": 86.0, "exptime": 0.8}).registers()
    exp = exposure_conditions(regs, frame_kind(regs), ch)
    assert exp.kind == "point" and exp.fwhm0_px == pytest.approx(1.5) and exp.mirror_mm == exp.mirror_nominal_mm == 86.0
    res = model.simulate_quadrant("CCD1", "E", exp, model.rng("pt"), Geometry())
    pt = model.truth["CCD1"].point
    assert len(res.info["spots"]) == SPOTS_PER_QUADRANT == 5 and abs(pt.z_best_offset_mm) <= 0.06
    expected_peak = 0.8 / ch["tFWC_point"]["nm800"] * FULL_SCALE_ADU * REFERENCE_GAIN / qt.gain_e_per_adu
    sums = []
    for spot, x, y in zip(res.info["spots"], pt.quadrants["E"].x, pt.quadrants["E"].y):
        r, c = int(round(spot["row"])), int(round(spot["col"]))
        assert (spot["x"], spot["y"]) == (x, y) and c == int(round(x)) + PRESCAN_COLS
        stamp = res.data[r - 8:r + 9, c - 8:c + 9] - qt.offset_adu
        assert np.unravel_index(np.argmax(stamp), stamp.shape) == (8, 8)  # centres within 0.2 px of a pixel centre
        assert stamp.max() == pytest.approx(spot["peak_adu"], rel=0.05)
        assert stamp.max() == pytest.approx(expected_peak, rel=0.2)
        assert spot["fwhm_px"] > 1.5  # pixel-sampled, brighter-fatter widening
        sums.append((res.data[r - 25:r + 26, c - 25:c + 26] - qt.offset_adu).sum())
    assert np.mean(sums) == pytest.approx(res.info["spot_flux_e"] / qt.gain_e_per_adu, rel=0.01)
    defocused = exposure_conditions({**regs, "mirr_pos": 86.8}, "point", ch)
    res2 = model.simulate_quadrant("CCD1", "E", defocused, model.rng("pt2"), Geometry())
    assert res2.info["spot_flux_e"] == pytest.approx(res.info["spot_flux_e"])  # defocus keeps the flux
    assert res2.info["spots"][2]["peak_adu"] < 0.5 * res.info["spots"][2]["peak_adu"]
    assert res2.info["fwhm_optical_px"] == pytest.approx(1.5 * np.sqrt(1 + ((0.8 - pt.z_best_offset_mm) / 0.2) ** 2))


def test_persistence_test_saturation_fraction():
    """PERSIST01's defocused 600 s exposure saturates 0.2-20 % of the image (validator range)."""
    from shared.campaign import get_test

    ch = chamber_profile("CHAMBER_B_BORN")
    col = next(c for c in get_test("PERSIST01").script(chamber="CHAMBER_B_BORN").columns if c.values["comments"] == "SATUR")
    regs = FrameSpec(test="PERSIST01", values=col.values).registers()
    exp = exposure_conditions(regs, frame_kind(regs), ch)
    model = DetectorModel(PhysicsConfig(), "BORN", seed=1)
    res = model.simulate_quadrant("CCD2", "F", exp, model.rng("p"), Geometry())
    img = to_uint16(res.data)[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS]
    assert 0.002 < np.mean(img == 65535) < 0.2


CAMPAIGN = """
name: simtest
block: CURIE
chamber: CHAMBER_B_CURIE
operator: sim
equipment: {sn_ccd1: A-1, sn_ccd2: A-2, sn_ccd3: A-3, sn_roe: FM09, sn_rpsu: FM09}
preset: mini
"""


@pytest.mark.fullsize
def test_campaign_play_passes_structure_check(tmp_path, vison):
    """`vison sim --campaign FILE --tests BIAS01` writes what the campaign's script expects."""
    from shared.campaign import check_structure, load_campaign
    from shared.explog import merge_explogs

    config = tmp_path / "campaign.yaml"
    config.write_text(CAMPAIGN)
    out = tmp_path / "data"
    res = vison("sim", "--out", str(out), "--campaign", str(config), "--tests", "BIAS01", "--seed", "3", "--json")
    assert res.returncode == 0, res.stderr
    t = truth(out)
    assert t["block"] == "CURIE" and t["chamber"] == "CHAMBER_B_CURIE"
    assert t["runs"][0]["sequence"]["tests"][0]["test"] == "BIAS01"
    script = next(s for s in load_campaign(config).scripts() if s.test == "BIAS01")
    log = merge_explogs(sorted(out.glob("*/EXP_LOG_*.txt")))
    for ccd in (1, 2, 3):
        rows = [r.values for r in log.rows if r.ccd == ccd]
        assert len(rows) == script.total_frames == 3
        result = check_structure(script, rows, finished=True)
        assert result.passed, result.mismatches
    assert log.rows[0].values["sn_roe"] == "FM09" and log.rows[0].values["operator"] == "sim"

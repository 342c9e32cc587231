"""The validator: per-quadrant statistics and checks (pure), the structure seam, and the service
against the real broker on full-size frames (offsets recovered, flags, failures, idempotency)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.validator.checks import (
    RON_LIMITS_ADU,
    all_passed,
    assess_hk,
    assess_image,
    failed_leaves,
    frame_stats,
    is_bias_like,
    quadrant_stats,
)
from services.validator.structure import ValidatorStore, check_exposure_structure
from shared.flags import Flag
from shared.geometry import QUADRANTS, Geometry
from shared.refdata import block_offsets
from tests.test_ingest_data import frame_data, hk_values, write_exposure

REF = block_offsets("BORN")


def _stats(offset_delta=0.0, noise=1.2, saturated=0, lost=0, img_signal=0.0):
    out = {}
    for ccd in ("CCD1", "CCD2", "CCD3"):
        out[ccd] = {}
        for q in QUADRANTS:
            off = REF[ccd][q] + offset_delta
            out[ccd][q] = {"pre": {"offset": off, "noise": noise}, "img": {"offset": off + img_signal, "noise": noise},
                           "ove": {"offset": off + 1.0, "noise": noise}, "saturated": saturated, "lost": lost,
                           "npix": 2086 * 2119}
    return out


BIAS_ROWS = {c: {"exptime": 0.0, "chinj": 0} for c in ("CCD1", "CCD2", "CCD3")}
FLAT_ROWS = {c: {"exptime": 10.0, "chinj": 0} for c in ("CCD1", "CCD2", "CCD3")}


def test_quadrant_stats_regions_and_counts():
    g = Geometry()
    quad = np.full((g.quad_rows, g.quad_cols), 1000.0, dtype=np.float32)
    quad[:, 51:2099] = 1500.0  # image
    quad[:, 2099:] = 1003.0  # overscan
    quad[10, 60:70] = 65535.0
    quad[2070, 100:105] = 0.0  # parallel overscan row: inside the readout window (vend 2086)
    rng = np.random.default_rng(0)
    quad[:, 25:46] += rng.normal(0, 1.3, (g.quad_rows, 21)).astype(np.float32)
    s = quadrant_stats(quad, 0, 2086)
    assert s["img"]["offset"] == 1500.0 and s["ove"]["offset"] == 1003.0
    assert abs(s["pre"]["offset"] - 1000.0) < 0.05 and abs(s["pre"]["noise"] - 1.3) < 0.02
    assert s["img"]["noise"] > 0 and s["ove"]["noise"] == 0.0
    assert s["saturated"] == 10 and s["lost"] == 5 and s["npix"] == g.quad_rows * g.quad_cols
    # a readout window of 100 rows excludes the lost pixels
    s = quadrant_stats(quad, 0, 100)
    assert s["lost"] == 0 and s["saturated"] == 10 and s["npix"] == 100 * g.quad_cols


def test_frame_stats_recovers_offsets_in_canonical_orientation():
    offsets = {"E": 1000.0, "F": 1100.0, "G": 1200.0, "H": 1300.0}
    stats = frame_stats(frame_data(offsets))
    for q, off in offsets.items():
        assert abs(stats[q]["pre"]["offset"] - off) < 0.1
        assert abs(stats[q]["img"]["offset"] - off) < 0.1
        assert abs(stats[q]["pre"]["noise"] - 1.2) < 0.05


def test_assess_image_nominal_bias_passes():
    tree, flags = assess_image("BIAS01", REF, _stats(), BIAS_ROWS)
    assert flags == 0 and all_passed(tree) and failed_leaves(tree) == []
    leaf = tree["offsets"]["CCD2"]["G"]["img"]
    assert leaf == {"passed": True, "value": REF["CCD2"]["G"], "lo": REF["CCD2"]["G"] - 50, "hi": REF["CCD2"]["G"] + 50}
    assert tree["noise"]["CCD1"]["E"]["pre"]["lo"] == RON_LIMITS_ADU[0]


@pytest.mark.parametrize(
    "kwargs,test,rows,expected",
    [
        ({"offset_delta": 60.0}, "BIAS01", BIAS_ROWS, Flag.POORQUALDATA),
        ({"noise": 2.0}, "BIAS01", BIAS_ROWS, Flag.RON_OOL),
        ({"noise": 0.5}, "DARK01", FLAT_ROWS, Flag.RON_OOL),
        ({"img_signal": 20.0}, "BIAS01", BIAS_ROWS, Flag.POORQUALDATA),
        ({"saturated": 2086 * 2119 // 5}, "FLAT01", FLAT_ROWS, Flag.SATURATION),
        ({"saturated": 2086 * 2119 // 5}, "PERSIST01", FLAT_ROWS, Flag(0)),
        ({"lost": 3}, "FLAT01", FLAT_ROWS, Flag.LOSTPIXELS),
        ({"img_signal": 20000.0, "noise": 3.0}, "FLAT01", FLAT_ROWS, Flag(0)),
    ],
)
def test_assess_image_flags(kwargs, test, rows, expected):
    tree, flags = assess_image(test, REF, _stats(**kwargs), rows)
    assert flags == expected
    assert all_passed(tree) == (expected == 0)


def test_bias_like():
    assert is_bias_like("BIAS02", {"exptime": 0})
    assert is_bias_like("DARK01", {"exptime": 565})
    assert is_bias_like("MOT_WARM", {"exptime": 0, "chinj": 0})
    assert not is_bias_like("CHINJ01", {"exptime": 0, "chinj": 1})
    assert not is_bias_like("FLAT01", {"exptime": 3.2})


def test_assess_hk_flags_ccd_temperature_and_other_keys(tmp_path):
    from shared.hk import check_hk_limits, format_hk_row, hk_header, read_hk
    from tests.test_ingest_data import BASE_DATE, explog_values

    path = tmp_path / "HK_1_140326D100000T_ROE1.txt"
    rows = [hk_values(), hk_values(CCD2_TEMP_B=-117.0)]
    path.write_text(hk_header() + "".join(format_hk_row(BASE_DATE, r) for r in rows))
    commanded = explog_values(1, 1, BASE_DATE, "BIAS01")
    tree, flags = assess_hk(check_hk_limits(read_hk(path), commanded))
    assert flags == Flag.CCDTEMP_OOL
    assert tree["P"]["CCD2_TEMP_B"] == {"passed": False, "value": -117.0, "lo": -121.0, "hi": -119.0}
    assert tree["P"]["CCD1_OD_T"]["passed"] and tree["P"]["CCD1_OD_T"]["lo"] == pytest.approx(25.8)
    path.write_text(hk_header() + format_hk_row(BASE_DATE, hk_values(CCD1_OD_T=27.0)))
    tree, flags = assess_hk(check_hk_limits(read_hk(path), commanded))
    assert flags == Flag.HK_OOL and not tree["P"]["CCD1_OD_T"]["passed"]


def test_structure_seam(tmp_path):
    pytest.importorskip("shared.campaign.config")
    from shared.campaign.config import CampaignConfig
    from tests.test_ingest_data import BASE_DATE, explog_values

    store = ValidatorStore(tmp_path / "v.sqlite")
    rows = {c: explog_values(1, c, BASE_DATE, "BIAS01") for c in (1, 2, 3)}
    status, tree, flags = check_exposure_structure(store, "BORN", "BIAS01", 1, rows)
    assert status.startswith("not checked") and tree == {} and flags == 0
    config = CampaignConfig(block="BORN", chamber="CHAMBER_A_JUN18", operator="tester",
                            tests=[{"name": "BIAS01", "params": {"N": 2}}])
    definition = config.define()
    store.save_campaign("BORN", definition.model_dump(mode="json"))
    script = definition.test("BIAS01").script
    known = set(explog_values(0, 1, BASE_DATE, "X")) - {"test"}
    col = {k: v for k, v in script.columns[0].values.items() if k in known}
    for obsid in (1, 2, 3):
        rows = {c: {**explog_values(obsid, c, BASE_DATE, "BIAS01"), **col} for c in (1, 2, 3)}
        status, tree, flags = check_exposure_structure(store, "BORN", "BIAS01", obsid, rows)
        if obsid < 3:
            assert status == "checked" and flags == 0, tree
            assert tree["CCD1"]["col001"]["frames"]["value"] == obsid
        else:  # a third frame of a 2-frame test
            assert flags & Flag.MISSDATA and not tree["CCD2"]["extra_frames"]["passed"]
    # the same exposure again (redelivery) is not counted twice
    status, tree, flags = check_exposure_structure(store, "BORN", "BIAS01", 2, rows)
    status, tree, flags = check_exposure_structure(store, "BORN", "NOTATEST", 4, rows)
    assert flags == Flag.WRONGTEST and "not in the campaign" in status


# ------------------------------------------------------------------------------------- broker


def campaign_available() -> bool:
    try:
        import shared.campaign.config  # noqa: F401
        import shared.campaign.structure  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def settings(vison_env, monkeypatch):
    from shared.config import get_settings

    monkeypatch.setenv("VISON_BLOCK", "BORN")
    get_settings.cache_clear()
    return get_settings()


def _ingested(root: Path, info, block="BORN", test="BIAS01", corrupt_sha=False):
    from shared.events import ExposureIngested, FileRef
    from shared.explog import read_explog
    from tests.test_ingest_data import sha256

    rows = [r for r in read_explog(next(info["folder"].glob("EXP_LOG_*.txt"))).rows if r.obsid == info["obsid"]]
    files = [FileRef(ccd=c, path=p.relative_to(root).as_posix(), sha256=("0" * 64 if corrupt_sha and c == 2 else sha256(p)),
                     size=p.stat().st_size) for c, p in sorted(info["files"].items())]
    return ExposureIngested(obsid=info["obsid"], block=block, test=test, files=files, explog=[r.values for r in rows])


@pytest.mark.broker
@pytest.mark.fullsize
def test_validator_service_on_full_frames(settings):
    from services.validator.service import BINDINGS, SERVICE, Validator
    from shared.bus import Consumer, Publisher, Subscription
    from shared.events import ExposureValidated, ProcessingFailed, parse_event
    from shared.fitsio import write_frame
    from shared.metrics import REGISTRY

    root = Path(settings.data_root)
    definition, script_values = None, {}
    if campaign_available():
        from shared.campaign.config import CampaignConfig
        from shared.explog import explog_layouts

        definition = CampaignConfig(block="BORN", chamber="CHAMBER_A_JUN18", operator="tester",
                                    tests=[{"name": "BIAS01", "params": {"N": 2}}]).define()
        columns = set(explog_layouts()["7.5.X"])
        from shared.campaign.keys import iphi_string

        values = definition.test("BIAS01").script.columns[0].values
        script_values = {k: v for k, v in values.items() if k in columns and k != "test"}
        # what ELVIS writes under its own 7.5.X spellings
        script_values.update({"IPHI": iphi_string(values), "v_tp_mod": values["v_tpmod"],
                              "s_tp_mod": values["s_tpmod"], "motr": values["motr_on"]})
    good = write_exposure(root, 1, block="BORN", hk={"CCD3_TEMP_T": -115.0}, explog_extra=script_values)
    bad_sha = write_exposure(root, 2, block="BORN")
    wrong = write_exposure(root, 3, block="BORN")
    write_frame(wrong["files"][3], np.full((4172, 4000), 1000.0, dtype=np.float32), 3)
    validator = Validator(settings, pool="thread", workers=3)
    consumer = Consumer(settings, SERVICE, BINDINGS, validator)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    assert consumer.ready.wait(10)
    events = []
    with Subscription(settings, ["exposure.validated.#", "processing.failed.#"]) as sub, Publisher(settings, "test") as pub:
        if definition is not None:
            from shared.events import CampaignDefined

            pub.publish(CampaignDefined(block="BORN", campaign="test", definition=definition.model_dump(mode="json")))
        first = _ingested(root, good)
        pub.publish(first)
        pub.publish(first)  # a duplicate delivery: validated once
        pub.publish(_ingested(root, bad_sha, corrupt_sha=True))
        pub.publish(_ingested(root, wrong))
        end = time.monotonic() + 60
        while time.monotonic() < end and len(events) < 3:
            for rk, _, body in sub.messages(timeout=0.5):
                events.append(parse_event(body, rk))
        time.sleep(1.0)
        events += [parse_event(b, rk) for rk, _, b in sub.messages(timeout=0.5)]
    consumer.stop()
    thread.join(20)
    validator.close()
    validated = [e for e in events if isinstance(e, ExposureValidated)]
    failed = [e for e in events if isinstance(e, ProcessingFailed)]
    assert [e.obsid for e in validated] == [1]
    ev = validated[0]
    assert ev.routing_key() == "exposure.validated.BIAS01.BORN" and ev.ingested_event_id == first.event_id
    for ccd in ("CCD1", "CCD2", "CCD3"):
        for q in QUADRANTS:
            injected = good["offsets"][ccd][q]
            assert abs(ev.stats[ccd][q].pre.offset - injected) <= 0.5
            assert abs(ev.stats[ccd][q].img.offset - injected) <= 0.5
            assert abs(ev.stats[ccd][q].pre.noise - 1.2) < 0.1
            assert ev.stats[ccd][q].saturated == 0 and ev.stats[ccd][q].lost == 0
    assert ev.flag_names == ["CCDTEMP_OOL"] and ev.flags == int(Flag.CCDTEMP_OOL) and not ev.passed
    assert failed_leaves(ev.compliance) == ["hk.P.CCD3_TEMP_T"]
    assert ev.compliance["offsets"]["CCD1"]["E"]["pre"]["passed"]
    if definition is not None:
        assert ev.structure == "checked", ev.structure
        assert ev.compliance["structure"]["CCD2"]["col001"]["frames"]["value"] == 1
        assert ev.compliance["structure"]["CCD2"]["col001"]["test"]["passed"]
    else:
        assert ev.structure.startswith("not checked")
    by_obsid = {e.obsid: e for e in failed}
    assert by_obsid[2].what == "checksum" and "SHA-256 mismatch" in by_obsid[2].why and by_obsid[2].where.endswith("CCD2.fits")
    assert by_obsid[3].what == "fits" and "NAXIS1=4000" in by_obsid[3].why and by_obsid[3].where.endswith("CCD3.fits")
    assert len(failed) == 2
    gauge = REGISTRY.get_sample_value("vison_quadrant_offset_adu", {"block": "BORN", "ccd": "CCD2", "quadrant": "G", "region": "pre"})
    assert abs(gauge - good["offsets"]["CCD2"]["G"]) <= 0.5
    assert REGISTRY.get_sample_value("vison_exposure_flag_total", {"block": "BORN", "test": "BIAS01", "flag": "CCDTEMP_OOL"}) >= 1


def test_integer_statistics_equal_numpy():
    from services.validator.checks import integer_median_std

    rng = np.random.default_rng(3)
    for size in (1, 2, 7, 1000, 100001):
        values = np.rint(rng.normal(2000, 1.4, size)).astype(np.float32)
        values[:: max(1, size // 5)] = 65535.0
        median, std = integer_median_std(values.reshape(1, -1))
        assert median == float(np.median(values))
        assert std == pytest.approx(float(values.std(dtype=np.float64)), rel=1e-12, abs=1e-12)
    quad = np.rint(frame_data({q: 2000.0 for q in QUADRANTS})[:2086, :2119])
    a, b = quadrant_stats(quad, integer=True), quadrant_stats(quad, integer=False)
    for region in ("pre", "img", "ove"):
        assert a[region]["offset"] == b[region]["offset"]
        assert a[region]["noise"] == pytest.approx(b[region]["noise"], rel=1e-9)


def test_test_ended_early_is_reported_when_the_next_test_starts(tmp_path, monkeypatch):
    """A 3-frame BIAS01 that stops after 2 frames: the first DARK01 exposure makes the validator
    publish test.checked for BIAS01 with ended_early and MISSDATA; a complete test passes."""
    pytest.importorskip("shared.campaign.config")
    from services.validator.structure import finish_test_structure
    from shared.campaign.config import CampaignConfig
    from tests.test_ingest_data import BASE_DATE, explog_values

    store = ValidatorStore(tmp_path / "v.sqlite")
    config = CampaignConfig(block="BORN", chamber="CHAMBER_A_JUN18", operator="tester",
                            tests=[{"name": "BIAS01", "params": {"N": 3}}, {"name": "DARK01", "params": {"N": 1}}])
    definition = config.define()
    store.save_campaign("BORN", definition.model_dump(mode="json"))
    known = set(explog_values(0, 1, BASE_DATE, "X")) - {"test"}

    def rows_of(test, obsid):
        col = {k: v for k, v in definition.test(test).script.columns[0].values.items() if k in known}
        return {c: {**explog_values(obsid, c, BASE_DATE, test), **col} for c in (1, 2, 3)}

    for obsid in (1, 2):
        assert store.switch_test("BORN", "BIAS01", obsid) is None
        check_exposure_structure(store, "BORN", "BIAS01", obsid, rows_of("BIAS01", obsid))
    assert store.switch_test("BORN", "DARK01", 3) == "BIAS01"
    assert store.switch_test("BORN", "DARK01", 3) is None  # redelivery: no second report
    assert store.switch_test("BORN", "BIAS01", 2) is None  # a late, older exposure: no report
    over = finish_test_structure(store, "BORN", "BIAS01")
    assert over["ended_early"] and over["flag_names"] == ["MISSDATA"] and not over["passed"]
    assert over["frames_expected"] == 3 and over["frames_seen"] == {"CCD1": 2, "CCD2": 2, "CCD3": 2}
    assert over["compliance"]["CCD1"]["complete"] == {"passed": False, "value": 2, "lo": 3, "hi": 3}
    check_exposure_structure(store, "BORN", "DARK01", 3, rows_of("DARK01", 3))
    done = finish_test_structure(store, "BORN", "DARK01")
    assert done["passed"] and not done["ended_early"] and done["flags"] == 0

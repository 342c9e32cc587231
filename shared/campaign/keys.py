"""Script register keys (ELVIS 7.5.X acquisition scripts), their defaults and the layering of
defaults < test common values < column values < equipment values.

Units: voltages in V, phase times (``toi_*``), ``id_wid``, ``id_dly``, dwells in us, ``exptime``
in s, ``mirr_pos`` in mm, ``wave`` = filter-wheel position (1..6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

#: A register value as written in a script: numbers or strings.
Value = Union[int, float, str]

IG1_KEYS = tuple(f"IG1_{c}_{s}" for c in (1, 2, 3) for s in ("T", "B"))
IG2_KEYS = ("IG2_T", "IG2_B")
OD_KEYS = tuple(f"OD_{c}_{s}" for c in (1, 2, 3) for s in ("T", "B"))
RD_KEYS = ("RD_T", "RD_B")
IPHI_KEYS = ("IPHI1", "IPHI2", "IPHI3", "IPHI4")
EQUIPMENT_KEYS = ("operator", "sn_ccd1", "sn_ccd2", "sn_ccd3", "sn_roe", "sn_rpsu")

#: Every register key of a 7.5.X script, in the order of the written spreadsheet.
SCRIPT_KEYS: tuple[str, ...] = (
    "frames", "program", "test", "IDL", "IDH",
    *IG1_KEYS, *IG2_KEYS, *OD_KEYS, *RD_KEYS, *IPHI_KEYS,
    "rdmode", "flushes", "siflsh", "siflsh_p", "swellw", "swelldly", "inisweep", "vstart", "vend",
    "toi_fl", "toi_tp", "toi_ro", "toi_ch",
    "chinj", "chinj_on", "chinj_of", "id_wid", "id_dly", "chin_dly",
    "s_tpump", "s_tpmod", "v_tpump", "v_tpmod", "s_tp_cnt", "v_tp_cnt", "dwell_v", "dwell_s",
    "exptime", "shuttr", "e_shuttr", "mirr_on", "mirr_pos", "wave", "motr_on", "motr_cnt", "motr_siz",
    "source", *EQUIPMENT_KEYS, "comments", "roe-tab",
)

#: Keys whose values are strings (everything else is a number).
STRING_KEYS = frozenset({"program", "test", "rdmode", "source", *EQUIPMENT_KEYS, "comments", "roe-tab"})


#: Defaults of campaign.md ("Script format"); keys campaign.md leaves open are documented here:
#: program CALCAMP, swellw/swelldly 0 (no summing-well timing), chin_dly 0, s/v_tpump 0,
#: exptime 0 s, e_shuttr 0, mirr_on 0, motr_on 0, equipment / comments / roe-tab "".
DEFAULTS: dict[str, Value] = {
    "program": "CALCAMP", "test": "",
    "IDL": 13, "IDH": 18,
    **{k: 6 for k in IG1_KEYS}, **{k: 2 for k in IG2_KEYS},
    **{k: 26 for k in OD_KEYS}, **{k: 16 for k in RD_KEYS},
    "IPHI1": 1, "IPHI2": 1, "IPHI3": 1, "IPHI4": 0,
    "rdmode": "fwd_bas", "flushes": 7, "siflsh": 1, "siflsh_p": 500, "swellw": 0, "swelldly": 0,
    "inisweep": 1, "vstart": 0, "vend": 2086,
    "toi_fl": 143, "toi_tp": 1000, "toi_ro": 1000, "toi_ch": 1000,
    "chinj": 0, "chinj_on": 1, "chinj_of": 1, "id_wid": 100, "id_dly": 1500, "chin_dly": 0,
    "s_tpump": 0, "s_tpmod": 23, "v_tpump": 0, "v_tpmod": 123, "s_tp_cnt": 1000, "v_tp_cnt": 1000,
    "dwell_v": 0, "dwell_s": 0,
    "exptime": 0, "shuttr": 1, "e_shuttr": 0, "mirr_on": 0, "mirr_pos": 70, "wave": 4,
    "motr_on": 0, "motr_cnt": 2, "motr_siz": 50, "source": "flat",
    **{k: "" for k in EQUIPMENT_KEYS}, "comments": "", "roe-tab": "",
}
assert set(DEFAULTS) == set(SCRIPT_KEYS) - {"frames"}

#: Exposure-log (7.5.X) column -> script key, where the two spell the same register differently.
EXPLOG_ALIASES: dict[str, str] = {"v_tp_mod": "v_tpmod", "s_tp_mod": "s_tpmod", "motr": "motr_on"}


def ig1(value: float) -> dict[str, Value]:
    """IG1 (V) on every CCD and half."""
    return {k: value for k in IG1_KEYS}


def ig2(value: float) -> dict[str, Value]:
    """IG2 (V) on both halves."""
    return {k: value for k in IG2_KEYS}


def rd(value: float) -> dict[str, Value]:
    """RD (V) on both halves."""
    return {k: value for k in RD_KEYS}


def normalise(key: str, value: Value) -> Value:
    """A register value in its canonical type: strings for string keys, int for integral numbers,
    float otherwise. Raises ValueError naming the key for a non-numeric number."""
    if key in STRING_KEYS:
        return "" if value is None else str(value)
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{key}: not a finite number ({value!r})")
    return int(number) if number.is_integer() else float(number)


def compose(
    common: Mapping[str, Value],
    column: Mapping[str, Value],
    equipment: Mapping[str, Value] | None = None,
) -> dict[str, Value]:
    """Register values of one column: defaults < test common values < column values < equipment
    values (operator, serial numbers), in SCRIPT_KEYS order (without ``frames``)."""
    layered: dict[str, Value] = dict(DEFAULTS)
    for layer in (common, column, equipment or {}):
        for key, value in layer.items():
            if key not in DEFAULTS:
                raise ValueError(f"{key}: not a script register key")
            layered[key] = value
    return {key: normalise(key, layered[key]) for key in SCRIPT_KEYS if key != "frames"}


def iphi_string(values: Mapping[str, Value]) -> str:
    """The exposure-log IPHI string of IPHI1..4 (e.g. 1,1,1,0 -> ``I1I2I3``)."""
    return "".join(f"I{i}" for i, key in enumerate(IPHI_KEYS, start=1) if int(float(values.get(key, 0))))

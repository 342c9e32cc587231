"""Charge-injection rules shared by the injection and trap-pumping families (pure)."""

from __future__ import annotations


def well_injected_half(id_dly_us: float, toi_ch_us: float) -> tuple[str, str]:
    """Quadrants that inject well at this injection delay (families.md): ``id_dly / toi_ch`` in
    (1, 2] -> G and H; in (2, 3] -> E and F; outside (1, 3] (e.g. the 0.75 of a 750 us delay at
    the default 1000 us phase time) -> E and F, so that the campaign's two delays cover both
    halves."""
    ratio = id_dly_us / max(toi_ch_us, 1e-9)
    return ("G", "H") if 1.0 < ratio <= 2.0 else ("E", "F")

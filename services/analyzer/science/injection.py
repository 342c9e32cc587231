"""Charge-injection rules shared by the injection and trap-pumping families: the campaign's rules
in :mod:`shared.injection` (one definition for the validator and the analyses)."""

from shared.injection import expected_injection_adu, injected_rows, well_injected_half  # noqa: F401

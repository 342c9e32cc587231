"""The exposure / test flag bitmask, with the historical bit values of the original campaign
software (so that products compare with the old campaign)."""

from __future__ import annotations

from enum import IntFlag


class Flag(IntFlag):
    """Quality flags; combine with ``|``. Values are the historical ones (2**n)."""

    MISSDATA = 1 << 0
    POORQUALDATA = 1 << 1
    BADDATA = 1 << 2
    WRONGTEST = 1 << 3
    WRONG_ROE_CONF = 1 << 4
    SOURCEON = 1 << 5
    SOURCEOFF = 1 << 6
    WRONGSOURCE = 1 << 7
    HK_OOL = 1 << 8
    CCDTEMP_OOL = 1 << 9
    UNDERPERFORM = 1 << 10
    REQNOTMET = 1 << 11
    BADDATAPROD = 1 << 12
    DEADCCD = 1 << 13
    DEADQUAD = 1 << 14
    LOWMEMORY = 1 << 15
    TOOSLOW = 1 << 16
    UNKNOWN = 1 << 17
    RON_OOL = 1 << 18
    FLUENCE_OOL = 1 << 19
    FLUENCEGRAD_OOL = 1 << 20
    FOCUS_OOL = 1 << 21
    BGD_OOL = 1 << 22
    CCDSATUR = 1 << 23
    FLUX_OOL = 1 << 24
    STARS_MISSING = 1 << 25
    SUBTASKCRASH = 1 << 26
    BADFIT = 1 << 27
    SATURATION = 1 << 28
    LOSTPIXELS = 1 << 29
    NONSATURATION = 1 << 30


def flag_names(value: int) -> list[str]:
    """Names of the flags set in ``value``, lowest bit first."""
    return [f.name for f in Flag if value & f.value]


def flags_from_names(names: list[str]) -> Flag:
    """The bitmask of flag names (KeyError on an unknown name)."""
    result = Flag(0)
    for name in names:
        result |= Flag[name]
    return result

"""Optical crosstalk of the simulator (families.md, "Point sources"): a fraction ``c[s, v]`` of
the signal of source quadrant ``s`` appears at the same canonical position in victim quadrant
``v`` (any of the other 11 quadrants of the block). Applied to point-source frames only (the
frames the crosstalk analysis uses; other frame kinds keep their legacy content), after the 3
CCDs of an exposure are simulated and before they are written.

The per-block matrix (``truth.json`` ``crosstalk``: ``{"CCD1.E": {"CCD1.F": c, ...}}``, source
-> victim) is drawn from the model seed: per victim a dominant coupling from its neighbour on the
same CCD (1.5e-4 .. 5.5e-4); a few victims get one more coupling above the requirement's 7.6e-5
(they pass), a few get two more (they violate: REQNOTMET); every other coupling is log-uniform in
1e-6 .. 4e-5, well away from the thresholds so that the verdict is unambiguous.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from shared.geometry import CCDS, QUADRANTS

DOMINANT_MAX = 6e-4
SECONDARY_MAX = 7.6e-5
NEIGHBOUR = {"E": "F", "F": "E", "G": "H", "H": "G"}


def labels() -> list[str]:
    """The 12 quadrant labels of a block, ``CCD1.E`` .. ``CCD3.H``."""
    return [f"{c}.{q}" for c in CCDS for q in QUADRANTS]


def draw_crosstalk(rng: np.random.Generator, n_pass_secondary: int = 3, n_violate: int = 3) -> dict[str, dict[str, float]]:
    """The coupling matrix ``{source: {victim: c}}`` (module docstring)."""
    names = labels()
    m = {s: {} for s in names}
    order = rng.permutation(len(names))
    violate = {names[i] for i in order[:n_violate]}
    secondary = {names[i] for i in order[n_violate:n_violate + n_pass_secondary]}
    for v in names:
        ccd, q = v.split(".")
        dominant = f"{ccd}.{NEIGHBOUR[q]}"
        others = [s for s in names if s not in (v, dominant)]
        strong = set()
        k = 2 if v in violate else 1 if v in secondary else 0
        if k:
            strong = {others[i] for i in rng.choice(len(others), size=k, replace=False)}
        for s in names:
            if s == v:
                continue
            if s == dominant:
                c = rng.uniform(1.5e-4, 5.5e-4)
            elif s in strong:
                c = rng.uniform(1.1e-4, 3.0e-4)
            else:
                c = float(np.exp(rng.uniform(np.log(1e-6), np.log(4e-5))))
            m[s][v] = float(round(c, 9))
    return m


def requirement_met(couplings: Mapping[str, float], dominant_max: float = DOMINANT_MAX, secondary_max: float = SECONDARY_MAX) -> bool:
    """Requirement per victim (``couplings`` = source -> c into this victim): the dominant coupling
    <= 6e-4 and at most one other coupling > 7.6e-5."""
    values = sorted((abs(float(c)) for c in couplings.values()), reverse=True)
    if not values:
        return True
    return values[0] <= dominant_max and sum(1 for c in values[1:] if c > secondary_max) <= 1


def apply_crosstalk(quads: Mapping[str, Mapping[str, np.ndarray]], offsets: Mapping[str, Mapping[str, float]],
                    matrix: Mapping[str, Mapping[str, float]], boxes: Mapping[str, Mapping[str, list[tuple[slice, slice]]]]) -> int:
    """Add ``c[s, v] x (source - offset)`` to every victim at the same canonical array position,
    inside the boxes around each source's spots (where the source has signal). ``quads`` =
    ``{CCD: {Q: canonical float32 quadrant}}`` (modified in place). Returns the boxes applied."""
    sources = []
    for s_ccd, qs in boxes.items():
        for s_q, bxs in qs.items():
            if s_ccd not in quads or s_q not in quads[s_ccd]:
                continue
            src = quads[s_ccd][s_q]
            for rs, cs in bxs:
                sources.append((f"{s_ccd}.{s_q}", rs, cs, src[rs, cs] - np.float32(offsets[s_ccd][s_q])))
    for s, rs, cs, signal in sources:
        for v, c in matrix.get(s, {}).items():
            v_ccd, v_q = v.split(".")
            if v_ccd in quads and v_q in quads[v_ccd]:
                quads[v_ccd][v_q][rs, cs] += np.float32(c) * signal
    return len(sources)


def spot_boxes(infos: Mapping[str, Mapping[str, Mapping]], prescan: int) -> dict[str, dict[str, list[tuple[slice, slice]]]]:
    """Boxes (canonical array slices) around each simulated spot: ``infos[CCD][Q]["spots"]``."""
    boxes: dict[str, dict[str, list]] = {}
    for ccd, quads in infos.items():
        for q, info in quads.items():
            bxs = []
            for sp in info.get("spots", []):
                half = int(np.ceil(6 * max(sp.get("fwhm_px", 0.0), sp.get("disk_px", 0.0)))) + 8
                r, c = int(round(sp["row"])), int(round(sp["col"]))
                bxs.append((slice(max(r - half, 0), r + half + 1), slice(max(c - half, prescan), c + half + 1)))
            boxes.setdefault(ccd, {})[q] = bxs
    return boxes


def apply_point_crosstalk(model, quads: Mapping[str, Mapping[str, np.ndarray]], infos: Mapping[str, Mapping[str, Mapping]]) -> int:
    """Crosstalk of one simulated point-source exposure (``model``: the DetectorModel; ``quads``
    and ``infos``: ``{CCD: {Q: ...}}`` of its simulated quadrants), in place."""
    from shared.geometry import PRESCAN_COLS

    offsets = {ccd: {q: model.truth[ccd].quadrants[q].offset_adu for q in qs} for ccd, qs in quads.items()}
    return apply_crosstalk(quads, offsets, model.crosstalk, spot_boxes(infos, PRESCAN_COLS))

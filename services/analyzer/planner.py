"""What to run for a test run (pure apart from the registry and catalogue look-ups):

- which family analyses it (:func:`family_for`) and which tests re-analyse its frames
  (``BF01 <- PTC01``: :func:`derived_runs`);
- its extraction units (:func:`extraction_units`: per exposure, or pairs through
  ``family.units``; only exposures with all their CCD frames);
- whether it is complete (:func:`is_complete`: the expected exposures from ``campaign.defined``,
  else the catalogue default, or an operator's ``test.close``);
- its declared needs (:func:`resolve_needs`): ``required`` waits; ``wait`` waits up to
  ``VISON_CALIB_WAIT_S`` then runs without it, flagged **MISSDATA** with a note naming the
  calibration (an input of the analysis is missing); ``rerun`` runs at once and triggers a
  re-analysis when the calibration arrives (:func:`rerun_needed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from services.analyzer import registry
from services.analyzer.definitions import Plan, derived_tests
from services.analyzer.family import Calibration, ExposureFrames, Family, Need
from services.analyzer.model import FrameMeta, split_test_name
from shared.flags import Flag


def family_for(label: str) -> Family | None:
    return registry.find(label)


def derived_runs(label: str, plans: Mapping[str, Plan] | None = None) -> list[str]:
    """Test runs analysing the frames of ``label`` that a family handles (``PTC01`` -> ``BF01``)."""
    return [d for d in derived_tests(label, plans or None) if registry.find(d) is not None]


def complete_frames(frames: Iterable[FrameMeta], ccds: int = 3) -> list[FrameMeta]:
    """Frames of the exposures that have all ``ccds`` CCD frames."""
    by: dict[int, list[FrameMeta]] = {}
    for f in frames:
        by.setdefault(f.obsid, []).append(f)
    return [f for _, fs in sorted(by.items()) if len({x.ccd for x in fs}) >= ccds for f in sorted(fs, key=lambda m: m.ccd)]


def extraction_units(family: Family, frames: Iterable[FrameMeta], block: str, ccds: int = 3) -> list[tuple[str, list[FrameMeta]]]:
    """``[(unit, frames of the unit)]`` of the complete exposures (pairs: as formed now;
    deterministic for a given set of exposures)."""
    if family.unit == "none":
        return []
    by: dict[int, list[FrameMeta]] = {}
    for f in complete_frames(frames, ccds):
        by.setdefault(f.obsid, []).append(f)
    exposures = [ExposureFrames.from_frames(fs, block) for _, fs in sorted(by.items())]
    return [(unit, [f for e in inputs for f in by[e.obsid]]) for unit, inputs in family.units(exposures)]


def is_complete(n_exposures: int, expected: int | None, closed: bool) -> bool:
    """Closed by an operator, or at least the expected exposures (unknown expected: only closed)."""
    return bool(closed) or (expected is not None and n_exposures >= expected)


def pick_calibration(need: Need, available: Iterable[Calibration]) -> Calibration | None:
    """The calibration satisfying ``need``: the first source test (base name) in the need's
    order of preference that provided it; within one source, the latest."""
    cands = [c for c in available if c.name == need.name]
    if not cands:
        return None
    if not need.sources:
        return cands[-1]
    for src in need.sources:
        mine = [c for c in cands if split_test_name(c.test)[0] == src]
        if mine:
            return mine[-1]
    return None


@dataclass
class NeedDecision:
    """Outcome of the needs of a solve at one moment."""

    ready: bool
    use: list[Calibration] = field(default_factory=list)  # calibrations to pass to the solve
    waiting: list[str] = field(default_factory=list)  # needs waited for (names)
    without: list[str] = field(default_factory=list)  # needs run without (wait timed out / rerun)
    flags: int = 0
    notes: list[str] = field(default_factory=list)
    wait_deadline: float | None = None  # when the waiting ends (None: never, a required need)


def resolve_needs(needs: Iterable[Need], available: Iterable[Calibration], waiting_since: float | None, now: float,
                  wait_s: float) -> NeedDecision:
    """Decide whether a solve can run now (see the module docstring). ``waiting_since``: when the
    run started waiting (None: not yet; ``now`` is used)."""
    available = list(available)
    since = waiting_since if waiting_since is not None else now
    d = NeedDecision(ready=True)
    required_missing = False
    for need in needs:
        cal = pick_calibration(need, available)
        if cal is not None:
            d.use.append(cal)
            continue
        if need.mode == "required":
            d.waiting.append(need.name)
            required_missing = True
        elif need.mode == "wait":
            if now - since < wait_s:
                d.waiting.append(need.name)
                d.wait_deadline = since + wait_s if d.wait_deadline is None else min(d.wait_deadline, since + wait_s)
            else:
                d.without.append(need.name)
                d.flags |= int(Flag.MISSDATA)
                d.notes.append(f"calibration {need.name} (from {', '.join(need.sources) or 'any test'}) not available "
                               f"after {wait_s:.0f} s: analysed without it")
        else:  # rerun
            d.without.append(need.name)
            d.notes.append(f"calibration {need.name} (from {', '.join(need.sources) or 'any test'}) not available yet: "
                           "analysed without it (re-analysed when it arrives)")
    if d.waiting:
        d.ready = False
        if required_missing:
            d.wait_deadline = None
    return d


def rerun_needed(needs: Iterable[Need], used: Iterable[Calibration], available: Iterable[Calibration]) -> list[tuple[Need, Calibration]]:
    """``rerun`` needs for which a calibration is available now that the last solve did not use
    (absent then, or provided since by a newer analysis)."""
    used_ids = {(c.name, str(c.event_id)) for c in used}
    out = []
    for need in needs:
        if need.mode != "rerun":
            continue
        cal = pick_calibration(need, available)
        if cal is not None and (cal.name, str(cal.event_id)) not in used_ids:
            out.append((need, cal))
    return out


def extract_jobs(fam: Family, block: str, label: str, frames: Iterable[FrameMeta], params: dict, calibrations: list[Calibration],
                 reply_to: str = "", ccds: int = 3, verify: bool = False, reprocess: str | None = None) -> list:
    """The :class:`ExtractJob` of every unit of a set of frames."""
    from services.analyzer.jobs import ExtractJob

    xcal = [c for c in calibrations if c.name in fam.extract_needs]
    out = []
    for unit, ufr in extraction_units(fam, frames, block, ccds):
        job_id = ExtractJob.make_id(block, label, fam.name, fam.version, unit, ufr, params, xcal)
        out.append(ExtractJob(job_id=job_id, block=block, label=label, family=fam.name, family_version=fam.version, unit=unit,
                              frames=ufr, params=params, calibrations=xcal, reply_to=reply_to, verify=verify, reprocess=reprocess))
    return out


def solve_job(fam: Family, block: str, label: str, frames: list[FrameMeta], done: Iterable, params: dict,
              calibrations: list[Calibration], expected: int | None, flags: int = 0, notes: Iterable[str] = (),
              reply_to: str = "", reprocess: str | None = None, ccds: int = 3):
    """The :class:`SolveJob` of a run from the replies of its extractions (failed units: MISSDATA)."""
    from services.analyzer.jobs import ExtractionRef, SolveJob

    notes = list(notes)
    refs = []
    for d in done:
        if d.status == "completed" and d.extraction is not None:
            refs.append(d.extraction)
        else:
            refs.append(ExtractionRef(unit=d.unit or "?", failed=True, error=d.error, job_id=d.job_id))
            notes.append(f"unit {d.unit} not analysed: {d.error}")
            flags |= int(Flag.MISSDATA)
    complete = complete_frames(frames, ccds)
    n = len({f.obsid for f in complete})
    if expected is not None and n != expected:
        flags |= int(Flag.MISSDATA)
    cals = [c for c in calibrations if any(need.name == c.name for need in fam.needs)]
    job_id = SolveJob.make_id(block, label, fam.name, fam.version, refs, complete, params, cals, flags, expected)
    return SolveJob(job_id=job_id, block=block, label=label, family=fam.name, family_version=fam.version, extractions=refs,
                    frames=complete, params=params, calibrations=cals, reply_to=reply_to, expected_exposures=expected,
                    flags=flags, notes=notes, reprocess=reprocess)


__all__ = ["extract_jobs", "solve_job", "NeedDecision", "complete_frames", "derived_runs", "extraction_units", "family_for", "is_complete",
           "pick_calibration", "rerun_needed", "resolve_needs"]

"""The acquisition simulator (``vison sim``): ELVIS-like FITS frames, exposure logs and HK files
at the real geometry, with the injected detector truth recorded in ``truth.json``.

- :mod:`services.sim.physics` - pure detector physics per quadrant (offsets, noise, gain, dark,
  illumination + PRNU, shot noise, brighter-fatter, full well / blooming, non-linearity, defects,
  cosmic rays, charge injection, point sources);
- :mod:`services.sim.frames` - frame specs, simple sequences, register values -> exposure log /
  FITS header / duration / physics conditions;
- :mod:`services.sim.hk` - housekeeping near nominal, out-of-limit injection;
- :mod:`services.sim.runner` - plays frame specs into a data folder (ELVIS write order, realtime);
- :mod:`services.sim.campaign` - campaign scripts (``shared.campaign``) -> frame specs;
- :mod:`services.sim.cli` - the ``vison sim`` command.
"""

"""metatest: FPA-level aggregation of per-block results (maps, mosaics, gain matrix).

Not built yet: no issue has asked for it so far. The folder holds its place in the architecture
(`services/<service>/`); `vison stack up` starts only the services that exist."""

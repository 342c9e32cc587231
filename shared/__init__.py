"""vison common code: the data model every service uses (geometry, FITS I/O, ELVIS file formats,
limits, test definitions, events, bus client, settings, metrics helpers)."""

__version__ = "0.1.0"

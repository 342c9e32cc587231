"""vison services: ingest, validator, analyzer, metatest, scriptgen, plus the simulator and CLI."""

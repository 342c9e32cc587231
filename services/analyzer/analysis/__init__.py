"""Pure analysis modules of the analyzer: arrays of canonical quadrants + exposure metadata in,
typed results out (no I/O, no bus). ``common`` holds the shared preprocessing and robust
statistics; one module per test family (bias, dark, cosmetics, flat, ptc, nl, bf)."""

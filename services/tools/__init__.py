"""Command-line tools for people (quick look, inspection, results, stack, demo)."""

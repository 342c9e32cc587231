"""scriptgen."""

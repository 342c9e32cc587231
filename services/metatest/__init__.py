"""metatest."""

"""Image embedders behind one registry (``galleria models`` lists them)."""

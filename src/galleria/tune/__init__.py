"""Choices made for a gallery from its own images: pseudo-queries, the tuned default."""

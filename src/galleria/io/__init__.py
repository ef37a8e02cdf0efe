"""Atomic, versioned artifact I/O (JSON headers + numpy arrays, never pickle)."""

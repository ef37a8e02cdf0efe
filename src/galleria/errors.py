"""Exceptions raised by galleria. All derive from :class:`GalleriaError`."""

from __future__ import annotations


class GalleriaError(Exception):
    """Base class of every error galleria raises on purpose."""


class InputError(GalleriaError, ValueError):
    """Bad input at a public entry point (shape, dtype, NaN, empty, unknown name)."""


class CompatibilityError(GalleriaError):
    """Two artifacts that do not belong together (model fingerprint, dimension, version)."""


class FormatError(GalleriaError):
    """An artifact on disk is missing, corrupt, or of an unsupported format version."""


class MissingDependencyError(GalleriaError, ImportError):
    """An optional package or a weight file the user asked for is not available."""


class DatasetMissingError(GalleriaError, FileNotFoundError):
    """A data set under ../shared/datasets (or GALLERIA_DATASETS) is not present."""


class StorageError(GalleriaError, OSError):
    """The disk refused a write (full, read-only, I/O error); nothing half-written is kept."""


class BusyError(GalleriaError):
    """Another writer holds the gallery for longer than the caller is willing to wait."""


class ClusterError(GalleriaError):
    """A compute cluster (Ray) cannot be reached, or lost the workers a job needed.

    The work a job committed before is kept; running the same command again does the rest.
    """

"""Where the shared real data sets live.

Resolution order: ``$GALLERIA_DATASETS``; ``../shared/datasets`` beside the
repository (found from this file's location); ``../shared/datasets`` from the
current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from galleria.errors import DatasetMissingError


def _candidates() -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("GALLERIA_DATASETS")
    if env:
        out.append(Path(env))
    here = Path(__file__).resolve()
    # src/galleria/eval/paths.py -> repo root is parents[3]
    if len(here.parents) > 3:
        out.append(here.parents[3].parent / "shared" / "datasets")
    out.append(Path.cwd().parent / "shared" / "datasets")
    out.append(Path.cwd() / "shared" / "datasets")
    return out


def datasets_root(*, required: bool = True) -> Path | None:
    """The data-set root, or None (``required=False``) / DatasetMissingError when absent."""
    for cand in _candidates():
        if cand.is_dir():
            return cand
    if required:
        tried = ", ".join(str(c) for c in _candidates())
        raise DatasetMissingError(
            "the shared data sets are not present (looked in: "
            f"{tried}); set GALLERIA_DATASETS to the folder that holds revisitop/, "
            "smvs_dvd_covers/, caltech101/ ..."
        )
    return None


def dataset_dir(name: str) -> Path:
    root = datasets_root()
    assert root is not None
    p = root / name
    if not p.is_dir():
        raise DatasetMissingError(f"data set folder {p} is missing (expected under {root})")
    return p

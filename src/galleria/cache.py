"""The user cache folder (exported ONNX graphs, embeddings of evaluation sets).

``$GALLERIA_CACHE`` or ``~/.cache/galleria``. Everything in it can be deleted.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("GALLERIA_CACHE") or Path.home() / ".cache" / "galleria")
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p

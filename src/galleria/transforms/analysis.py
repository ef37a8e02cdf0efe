"""Analysis of embedding spaces: the distribution of pairwise cosine similarities.

AE-SVC's premise is that a lower variance of the cosine-similarity
distribution (no few high-variance directions dominating) makes cosine search
more discriminative. These helpers measure it before and after a transform.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError, MissingDependencyError
from galleria.io.atomic import write_bytes
from galleria.validate import as_embeddings, l2_normalize


def pairwise_cosines(X: object, *, sample: int | None = 2000, seed: int = 0) -> np.ndarray:
    """Off-diagonal pairwise cosine similarities of (a seeded sample of) ``(N, D)`` rows.

    Args:
        X: ``(N, D)`` embeddings (normalised here).
        sample: use at most this many rows, drawn without replacement with
            ``seed`` (None = all rows; ``N * (N - 1) / 2`` values).

    Returns:
        ``(M * (M - 1) / 2,)`` float64 similarities of the ``M`` used rows (``i < j``).
    """
    arr = l2_normalize(as_embeddings(X))
    n = arr.shape[0]
    if n < 2:
        raise InputError(f"need at least 2 embeddings for pairwise similarities, got {n}")
    if sample is not None and n > sample:
        if sample < 2:
            raise InputError(f"sample must be >= 2, got {sample}")
        idx = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
        arr = arr[idx]
    A = arr.astype(np.float64)
    S = A @ A.T
    iu = np.triu_indices(A.shape[0], k=1)
    return S[iu]


def cosine_similarity_stats(
    X: object, *, sample: int | None = 2000, seed: int = 0
) -> dict[str, Any]:
    """Mean, variance and std of the off-diagonal pairwise cosine similarities.

    Returns ``{"mean", "variance", "std", "n_rows", "n_pairs"}`` computed on a
    seeded sample of at most ``sample`` rows (see :func:`pairwise_cosines`).
    """
    s = pairwise_cosines(X, sample=sample, seed=seed)
    n_rows = int((1 + np.sqrt(1 + 8 * s.size)) / 2)
    return {
        "mean": float(s.mean()),
        "variance": float(s.var()),
        "std": float(s.std()),
        "n_rows": n_rows,
        "n_pairs": int(s.size),
    }


def plot_similarity_histograms(
    spaces: dict[str, object],
    path: str | os.PathLike[str],
    *,
    sample: int | None = 2000,
    seed: int = 0,
    bins: int = 100,
    title: str | None = None,
) -> Path:
    """Write a PNG overlaying the cosine-similarity histograms of several embedding spaces.

    Args:
        spaces: ``{name: (N, D) embeddings}`` (dimensions may differ between spaces).
        path: output PNG file.
        sample, seed: the seeded row sample per space (see :func:`pairwise_cosines`).
        bins: histogram bins on ``[-1, 1]``.
        title: optional figure title.

    Returns:
        The path written. The legend gives each space's similarity variance.
    """
    if not spaces:
        raise InputError("plot_similarity_histograms needs at least one embedding space")
    try:
        # The Agg canvas is chosen here, on a private Figure: neither importing this
        # module nor calling it touches the global (pyplot) backend.
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib
        from matplotlib.figure import Figure  # lazy: matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dev/plots extra
        raise MissingDependencyError(
            "plotting needs matplotlib: pip install 'galleria[plots]'"
        ) from exc

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    for name, X in spaces.items():
        s = pairwise_cosines(X, sample=sample, seed=seed)
        ax.hist(
            s, bins=edges, density=True, histtype="step", linewidth=1.4,
            label=f"{name} (var {s.var():.4f})",
        )
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title or "pairwise cosine similarities")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    out = Path(path)
    write_bytes(out, buf.getvalue())
    return out

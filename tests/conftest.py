"""Shared test fixtures.

``require_shared`` returns the data-set root; on a user machine without
``../shared/datasets`` the test is skipped, under CI (``CI=true``) it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from galleria.eval.paths import datasets_root


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_root() -> Path:
    root = datasets_root(required=False)
    if root is None:
        msg = (
            "../shared/datasets not found (set GALLERIA_DATASETS to its path); "
            "needed for real-data tests"
        )
        if _ci():
            pytest.fail(msg + " -- under CI a missing ../shared is a failure")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def require_shared(shared_root: Path):
    """Return a function that checks one data-set folder exists and returns its path."""

    def need(name: str) -> Path:
        p = shared_root / name
        if not p.exists():
            msg = f"data set {name!r} missing under {shared_root}"
            if _ci():
                pytest.fail(msg)
            pytest.skip(msg)
        return p

    return need


@pytest.fixture()
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Exported ONNX graphs and embedding caches go to a per-session folder."""
    if "GALLERIA_CACHE" not in os.environ:
        os.environ["GALLERIA_CACHE"] = str(tmp_path_factory.mktemp("galleria-cache"))
    yield


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """A folder of real photos shipped with scikit-image (no ../shared needed)."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"):
        img = getattr(data, name)()
        Image.fromarray(img).save(root / f"{name}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def photos_gallery(photos, tmp_path_factory) -> Path:
    """Five of the ``photos`` indexed with effnet-lite0 (``rocket.jpg`` is left out, to be
    uploaded); copy it before writing to it."""
    from galleria.extract.job import index_images
    from galleria.images.sources import list_source

    items = [it for it in list_source(photos) if it.id != "rocket.jpg"]
    out = tmp_path_factory.mktemp("photos-gallery") / "g"
    index_images(items, out, model="effnet-lite0", batch_size=8)
    return out


@pytest.fixture()
def one_torch_thread():
    """Training tests run torch on one thread, restored afterwards (a process-wide setting)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Phone-like views are seeded; member features fill resumably; query views are cached."""

from __future__ import annotations

import numpy as np
from PIL import Image

from galleria.extractors.registry import create_extractor
from galleria.fusion.data import compute_views, fill_features, load_features, manifest_labels
from galleria.images.augment import phone_view
from galleria.images.sources import SourceItem, iter_folder
from galleria.store.gallery import Gallery


def test_phone_view_is_seeded_and_changes_the_image(photos):
    img = Image.open(next(iter(sorted(photos.iterdir())))).convert("RGB")
    a = phone_view(img, np.random.default_rng([0, 1]))
    b = phone_view(img, np.random.default_rng([0, 1]))
    c = phone_view(img, np.random.default_rng([0, 2]))
    assert a.mode == "RGB" and max(a.size) <= 320
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))


def test_fill_features_resumes_and_loads_in_order(photos, tmp_path):
    items = list(iter_folder(photos))
    ext = create_extractor("effnet-lite0", size=96, runtime="onnx", threads=1)
    g = Gallery.open_or_create(tmp_path / "f.gallery")
    fill_features(g, items[:3], [ext], batch_size=2)  # a first, interrupted run
    assert g.count(ext.fingerprint) == 3
    fill_features(g, items, [ext], batch_size=2, flush_every=2)
    assert g.count(ext.fingerprint) == len(items)
    (x,) = load_features(g, [it.id for it in items[::-1]], [ext.fingerprint])
    g.close()
    ref = ext.embed_images([Image.open(it.path).convert("RGB") for it in items[::-1]])
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_views_are_cached_and_view_zero_is_clean(photos, tmp_path):
    items = [SourceItem(id=p.name, path=p) for p in sorted(photos.iterdir())][:3]
    calls = []

    def trunk(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, :, ::56, ::56].copy()  # (B, 3, 4, 4): a stand-in trunk

    from galleria.fusion.extractor import _lite_preprocessing

    prep = _lite_preprocessing()
    v = compute_views(items, trunk, prep, tmp_path, trunk_id="t", n_views=3, part_size=2)
    assert v.shape == (3, 3, 3, 4, 4) and v.dtype == np.float16
    clean = prep(Image.open(items[1].path).convert("RGB"))[:, ::56, ::56]
    np.testing.assert_allclose(v[1, 0], clean, atol=2e-2)
    assert not np.allclose(v[1, 1], v[1, 0], atol=1e-2)
    n = len(calls)
    again = compute_views(items, trunk, prep, tmp_path, trunk_id="t", n_views=3, part_size=2)
    assert len(calls) == n and np.array_equal(again, v)


def test_manifest_labels():
    items = [SourceItem(id=str(i), path=None, meta={"c": c})  # type: ignore[arg-type]
             for i, c in enumerate("xyxz")]
    assert manifest_labels(items, "c").tolist() == [0, 1, 0, 2]
    assert manifest_labels(items, None).tolist() == [0, 1, 2, 3]

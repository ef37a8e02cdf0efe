"""Transforms in the engine: fit on a gallery, index through a transform, and the
query path applying the same transform automatically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from galleria.cli.main import main as cli
from galleria.errors import CompatibilityError
from galleria.extract.job import index_images
from galleria.search.searcher import Searcher
from galleria.store.gallery import Gallery


def test_fit_apply_then_search_through_transform(tmp_path, photos, capsys):
    g = tmp_path / "g"
    index_images(photos, g, model="effnet-lite0")
    assert cli(["fit-transform", str(g), "--kind", "pca", "--dim", "4", "--out",
                str(tmp_path / "pca4"), "--apply", "--json", "-q"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["output_dim"] == 4 and "|pca@" in stats["new_space"]
    with Gallery.open(g) as gal:
        assert gal.primary_space == stats["new_space"]
        assert {s.dim for s in gal.spaces()} == {1280, 4}
    # the searcher rebuilds model + transform from the gallery record
    s = Searcher.open(g)
    assert s.extractor.dim == 4 and s.extractor.fingerprint == stats["new_space"]
    _, res, fails = s.search_paths([photos / "coffee.jpg"], k=2)
    assert not fails and res is not None and res.ids[0, 0] == "coffee.jpg"
    # a fresh index built through the saved transform lands in the same space
    g2 = tmp_path / "g2"
    rep = index_images(photos, g2, model="effnet-lite0", transform=tmp_path / "pca4")
    assert rep.space == stats["new_space"]
    with Gallery.open(g) as a, Gallery.open(g2) as b:
        ka, va = a.load_vectors(stats["new_space"])
        kb, vb = b.load_vectors(stats["new_space"])
        order_a = np.argsort(a.ids_of(ka).astype(str))
        order_b = np.argsort(b.ids_of(kb).astype(str))
        np.testing.assert_allclose(va[order_a], vb[order_b], atol=1e-4)


def test_transform_of_another_model_is_refused(tmp_path, photos):
    g = tmp_path / "g"
    index_images(photos, g, model="effnet-lite0")
    assert cli(["fit-transform", str(g), "--kind", "center", "--out", str(tmp_path / "c"),
                "-q"]) == 0
    with pytest.raises(CompatibilityError) as ei:
        index_images(photos, tmp_path / "other", model="opennsfw-r50", transform=tmp_path / "c")
    assert "effnet-lite0" in str(ei.value) and "opennsfw-r50" in str(ei.value)

"""The live switch to a fused model finishes as a fresh ``galleria index --fusion``.

Reference: a fresh ``galleria index SRC --fusion F`` of the same images. After
``upgrade start --fusion F`` / ``run`` / ``finish`` the gallery must hold the same
spaces (the fused one and the light one), the same primary space (the one the
label-free adaptation chose), the same vectors in each, the same adaptation
decision, and give the same answers.
"""

from __future__ import annotations

import numpy as np
import pytest

import _tiny
from _fusionmodel import small_fusion_model
from galleria.cli.main import main
from galleria.decision import open_searcher
from galleria.extract.job import index_images
from galleria.fusion.adapt_job import fusion_state
from galleria.store.gallery import Gallery
from galleria.upgrade.change import start_fusion
from galleria.upgrade.job import finish_upgrade, run_upgrade
from galleria.upgrade.online import OnlineConfig

N = 56  # past the adaptation's min_items (50): the fit runs in both


@pytest.mark.slow  # two fused indexings + two adaptations of 56 images (effnet-lite0 members)
def test_fusion_switch_finishes_identical_to_a_fresh_fused_index(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    _tiny.noise_pngs(images, N, 11, side=40)
    model = small_fusion_model(tmp_path / "F")
    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    start_fusion(g, model, threads=1, online=OnlineConfig(enabled=False))
    run_upgrade(g, threads=1)
    finish_upgrade(g)
    fresh = tmp_path / "fresh"
    assert main(["index", str(images), "--out", str(fresh), "--fusion", str(model), "-q",
                 "--threads", "1"]) == 0
    capsys.readouterr()
    paths = sorted(images.glob("*.png"))[:12]
    with Gallery.open(g) as a, Gallery.open(fresh) as b:
        spaces = sorted(s.space for s in a.spaces())
        assert spaces == sorted(s.space for s in b.spaces()) and len(spaces) >= 2
        assert a.primary_space == b.primary_space
        sa, sb = fusion_state(a), fusion_state(b)
        assert sa is not None and sb is not None
        assert (sa["answer"], sa["space"], sa["n_items"]) == \
            (sb["answer"], sb["space"], sb["n_items"])
        for sp in spaces:
            ka, va = a.load_vectors(sp)
            kb, vb = b.load_vectors(sp)
            da = dict(zip(a.ids_of(ka), va, strict=True))
            db = dict(zip(b.ids_of(kb), vb, strict=True))
            assert sorted(da) == sorted(db)
            np.testing.assert_allclose(np.stack([da[i] for i in sorted(da)]),
                                       np.stack([db[i] for i in sorted(db)]), atol=1e-5)
        ra = open_searcher(a, threads=1).search_paths(paths, 10)[1]
        rb = open_searcher(b, threads=1).search_paths(paths, 10)[1]
        assert (ra.ids == rb.ids).all()
        np.testing.assert_allclose(ra.scores, rb.scores, atol=1e-5)
        assert a.get_setting("upgrade") is None and not (g / "upgrade").exists()

"""``index --fusion`` through the Ray embedder (a simulated 2-node cluster on 127.0.0.1): the
fused gallery extractor pickles as its config (the model folder inside the gallery, an
absolute root), every member and the mixer run on the workers, and the gallery equals the
single-process one."""

from __future__ import annotations

import numpy as np
import pytest

from _fusionmodel import small_fusion_model
from _raycluster import sim_cluster
from galleria.extract.job import index_images
from galleria.fusion.extractor import gallery_extractor
from galleria.images.sources import list_source
from galleria.store.gallery import Gallery

pytestmark = [pytest.mark.shared, pytest.mark.slow]  # a Ray cluster: ~40 s on 2 cores


def _vectors(path) -> dict[str, np.ndarray]:
    with Gallery.open(path) as g:
        keys, vecs = g.load_vectors()
        return dict(zip(g.ids_of(keys), vecs, strict=True))


def test_index_fusion_on_ray_equals_single_process(require_shared, tmp_path):
    pytest.importorskip("ray")
    from galleria.distributed.ray_embed import RayEmbedder

    model = small_fusion_model(tmp_path / "F")
    items = sorted((it for it in list_source(require_shared("ukbench56"))
                    if it.path.suffix.lower() == ".jpg"), key=lambda it: it.id)[:24]
    with sim_cluster(2, 1) as sim, RayEmbedder() as emb:
        ext = gallery_extractor(model, tmp_path / "ray", threads=1)
        rep = index_images(items, tmp_path / "ray", extractor=ext, embedder=emb,
                           batch_size=4)
    assert not sim.left, f"Ray processes left: {sorted(sim.left)}"
    one = index_images(items, tmp_path / "one",
                       extractor=gallery_extractor(model, tmp_path / "one", threads=1),
                       batch_size=4)
    assert rep.embedded == one.embedded == 24 and rep.spaces == one.spaces
    a, b = _vectors(tmp_path / "ray"), _vectors(tmp_path / "one")
    assert sorted(a) == sorted(b)
    assert max(float(np.abs(a[i] - b[i]).max()) for i in a) <= 1e-5


"""The ``hybrid`` answers of a local change after an item with published local features
is removed.

The local index the job published still holds the removed item until the next
publication (while the job is paused: until the next run). Hybrid must leave it
out and answer as before for the others; it used to give up for the whole batch
and answer with the global model alone (while the guard's decision and match
probabilities name hybrid). Reference: each query whose source item has local
features and whose hybrid top-1 was its source (and the global top-1 was not)
keeps it after the removal; the removed item is never answered. Seeded textures,
SIFT; a few seconds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

import _tiny
from galleria.extract.job import index_images
from galleria.extractors.registry import create_extractor
from galleria.images.pseudo import clutter
from galleria.store.gallery import Gallery
from galleria.upgrade.change import start_local
from galleria.upgrade.job import run_upgrade
from galleria.upgrade.local_search import GLOBAL, HYBRID, LocalChangeSearcher

N = 16


def test_hybrid_leaves_a_removed_item_out_and_keeps_answering(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        clutter((160, 160), rng, 60).save(imgs / f"{i:02d}.png")
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_local(g, "sift", extractor=create_extractor("sift"), seed=0)
    run_upgrade(g, limit=N // 2, batch_size=4, commit_every=4)
    paths = sorted(imgs.glob("*.png"))
    # views the global model finds hard and SIFT does not: a rotated central crop
    pics = [Image.open(p).convert("RGB").crop((30, 30, 130, 130)).rotate(90) for p in paths]
    qg, ql = _tiny.tiny(1).embed_images(pics), create_extractor("sift").embed_images(pics)
    src = np.array([p.name for p in paths], dtype=object)
    with Gallery.open(g) as gal:
        s = LocalChangeSearcher(gal, rule=HYBRID)
        before = s.search_queries(qg, ql, k=5).ids
        s.close()
        s = LocalChangeSearcher(gal, rule=GLOBAL)
        glob = s.search_queries(qg, None, k=5).ids
        s.close()
        done = set(gal.ids(s.state.new_space))
        wins = [i for i in range(N) if src[i] in done and before[i, 0] == src[i]
                and glob[i, 0] != src[i]]
        gone = next(i for i in sorted(done) if i not in src[wins])
        assert wins, "no query where hybrid beats the global answers"
        gone_key = int(gal.keys_of([gone])[0])
        gal.remove([gone])
        s = LocalChangeSearcher(gal, rule=HYBRID)  # the snapshot still holds `gone`
        assert gone_key in set(s._published.item_keys.tolist())
        after = s.search_queries(qg, ql, k=5).ids
        s.close()
    assert gone not in set(after.ravel())
    assert all(after[i, 0] == src[i] for i in wins), (wins, after[wins, 0])

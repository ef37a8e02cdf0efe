"""Another writer during `upgrade run`: a delete between re-embedding and the move
neither crashes the run nor resurrects the item; a job from another version is refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.finish import finish_upgrade
from galleria.upgrade.job import run_upgrade, start_upgrade
from galleria.upgrade.state import STATE_KEY, UpgradeError, active_upgrade


@pytest.fixture()
def gallery(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(3)
    for n in range(24):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(
            imgs / f"{n:02d}.png")
    out = tmp_path / "g"
    index_images(imgs, out, extractor=_tiny.tiny(1))
    return out


class DeletingExtractor(_tiny.Tiny):
    """The new model; while it embeds a batch, another writer deletes items of it."""

    def __init__(self, gallery, victims):
        super().__init__(2)
        self.gallery, self.victims, self.done = gallery, list(victims), False

    def embed_prepared(self, per_scale):
        if not self.done:
            self.done = True
            # another thread (as another process would) deletes while the run embeds
            t = threading.Thread(target=self._delete)
            t.start()
            t.join()
        return super().embed_prepared(per_scale)

    def _delete(self):
        with Gallery.open(self.gallery) as g:
            g.remove(self.victims)


def test_delete_during_upgrade_run_is_neither_a_crash_nor_a_resurrection(gallery):
    new = _tiny.tiny(2)
    start_upgrade(gallery, "tiny-test", extractor=new)
    with Gallery.open(gallery) as g:
        order = g.ids()
    victims = order[:3]  # random order: some are in the first batch, maybe not all
    ext = DeletingExtractor(gallery, victims)
    ext.set_config(new.config())
    rep = run_upgrade(gallery, extractor=ext, batch_size=24, commit_every=24, order="id")
    assert not rep.interrupted
    with Gallery.open(gallery) as g:
        state = active_upgrade(g)
        assert not set(victims) & set(g.ids()), "a deleted item came back"
        old, newids = set(g.ids(state.old_space)), set(g.ids(state.new_space))
        assert not old & newids and old | newids == set(g.ids()) and len(g) == 21
    finish_upgrade(gallery)
    with Gallery.open(gallery) as g:
        assert len(g) == 21 and g.count() == 21 and g.check().ok


def test_a_job_of_another_version_is_refused(gallery):
    start_upgrade(gallery, "tiny-test", extractor=_tiny.tiny(2))
    with Gallery.open(gallery) as g:
        st = g.get_setting(STATE_KEY)
        g.set_setting(STATE_KEY, {**st, "version": 99})
        with pytest.raises(UpgradeError, match="job version 99"):
            active_upgrade(g)

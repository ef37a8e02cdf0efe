"""``galleria upgrade status`` of a local-feature change names the answers search serves.

The guard's decision may name any of the three rules of a local change
(``hybrid``, the default candidate; ``rank-merge``; ``old-only``, the global
answers). Reference: the rule :class:`LocalChangeSearcher` resolves ``auto`` to
(what the service serves) for the same published decision; the per-rule MRR line
gives each rule once, under its own name. Seeded textures, SIFT; a few seconds.
"""

from __future__ import annotations

import numpy as np

import _tiny
from galleria.cli.main import main
from galleria.extract.job import index_images
from galleria.extractors.registry import create_extractor
from galleria.images.pseudo import clutter
from galleria.store.gallery import Gallery
from galleria.upgrade.change import start_local
from galleria.upgrade.job import run_upgrade
from galleria.upgrade.local_guard import LocalGuardConfig, publish_decision
from galleria.upgrade.local_search import GLOBAL, HYBRID, MERGED, LocalChangeSearcher
from galleria.upgrade.state import require_upgrade

N = 16
NAMES = {HYBRID: "the hybrid answers", MERGED: "the merged answers",
         GLOBAL: "the global answers"}


def test_status_names_the_rule_the_guard_serves(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        clutter((128, 128), rng, 60).save(imgs / f"{i:02d}.png")
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_local(g, "sift", extractor=create_extractor("sift"), seed=0,
                guard=LocalGuardConfig(pseudo_queries=10))
    run_upgrade(g, limit=N // 2, batch_size=4, commit_every=4)
    with Gallery.open(g) as gal:
        d = require_upgrade(gal).online["decision"]
        assert set(d["scores"]) == {HYBRID, MERGED, GLOBAL}
    for rule in (HYBRID, MERGED, GLOBAL):
        with Gallery.open(g) as gal:
            publish_decision(gal, {**d, "rule": rule})
            s = LocalChangeSearcher.open(gal, with_models=False)
            assert s.rule == rule
            s.close()
        capsys.readouterr()
        assert main(["upgrade", "status", str(g)]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.strip().startswith("guard:"))
        assert f"search serves {NAMES[rule]}" in line, line
        mrr = line.split("pseudo-query MRR")[1]
        for r in (HYBRID, MERGED, GLOBAL):  # each rule once, under its own name
            assert mrr.count(NAMES[r].split()[1] + " ") == 1, line


def test_start_refuses_too_few_pseudo_queries_as_it_did(tmp_path, capsys):
    """``--pseudo-queries 0`` (or any count under 10) is refused with a clear error and no
    job is started, for a model and for a local-feature change alike; it was silently
    replaced by the default (500 / 200 views) once the flag's default became ``None``."""
    from galleria.store.gallery import Gallery as G
    from galleria.upgrade.state import STATE_KEY

    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", 8, 3)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(2))  # `tiny-test` (seed 1): a new model
    for change in (["--new-model", "tiny-test"], ["--add-local", "tiny-local"]):
        for n in ("0", "5"):
            capsys.readouterr()
            assert main(["upgrade", "start", str(g), *change, "--pseudo-queries", n]) == 2
            assert "pseudo-queries" in capsys.readouterr().err
            with G.open(g, readonly=True) as gal:
                assert gal.get_setting(STATE_KEY) is None


def test_pseudo_scene_is_refused_outside_the_local_change(tmp_path, capsys):
    """``--pseudo-scene`` only shapes the local guard's pseudo-queries: on a model change
    it is refused (exit 2, no job), where it used to be silently ignored."""
    from galleria.store.gallery import Gallery as G
    from galleria.upgrade.state import STATE_KEY

    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", 8, 3)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(2))
    capsys.readouterr()
    assert main(["upgrade", "start", str(g), "--new-model", "tiny-test", "--pseudo-scene"]) == 2
    assert "--pseudo-scene" in capsys.readouterr().err
    with G.open(g, readonly=True) as gal:
        assert gal.get_setting(STATE_KEY) is None

"""Transforms in the engine: fit on a gallery, index through a transform, and the
query path applying the same transform automatically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from galleria.cli.main import main as cli
from galleria.errors import CompatibilityError
from galleria.extract.job import index_images
from galleria.search.searcher import PlainSearcher
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
    s = PlainSearcher.open(g)
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


def _toy_gallery(path, n=40, d=16, seed=0):
    """A gallery of seeded synthetic vectors (no model needed for fit/apply)."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Gallery.create(path) as g:
        g.register_space("toy@0123456789abcdef", d, {"recipe": {"model": "toy"}})
        g.add([f"i{i:03d}" for i in range(n)], x, space="toy@0123456789abcdef")
    return "toy@0123456789abcdef"


def _spaces(path):
    with Gallery.open(path) as g:
        return g.primary_space, sorted(s.space for s in g.spaces())


def test_reapplying_never_stacks_a_second_transform(tmp_path, capsys):
    from galleria.errors import InputError
    from galleria.transforms.attach import add_transformed_space, fit_on_gallery

    g = tmp_path / "g"
    base = _toy_gallery(g)
    fit = ["fit-transform", str(g), "--json", "-q"]
    assert cli([*fit, "--kind", "pca", "--dim", "8", "--out", str(tmp_path / "p8"),
                "--apply"]) == 0
    first = json.loads(capsys.readouterr().out)["new_space"]
    assert _spaces(g) == (first, sorted([base, first]))
    # the same command again: refused before fitting, nothing added, the reason names both
    assert cli([*fit, "--kind", "pca", "--dim", "8", "--out", str(tmp_path / "p8b"),
                "--apply"]) == 2
    err = capsys.readouterr().err
    assert "already has a transformed space" in err and first in err and "--replace" in err
    assert not (tmp_path / "p8b").exists() and _spaces(g) == (first, sorted([base, first]))
    # without --apply the default fits on the model's space, not on the primary (transformed)
    assert cli([*fit, "--kind", "pca", "--dim", "4", "--out", str(tmp_path / "p4")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["input_fingerprint"] == base and stats["output_fingerprint"].count("|") == 1
    # --replace: the new transform of the base replaces the old one (dropped, files too)
    assert cli([*fit, "--kind", "pca", "--dim", "4", "--out", str(tmp_path / "p4"),
                "--apply", "--replace"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["replaced"] == [first] and out["new_space"].count("|") == 1
    assert _spaces(g) == (out["new_space"], sorted([base, out["new_space"]]))
    assert len(list((g / "transforms").iterdir())) == 1
    with Gallery.open(g) as gal:
        assert gal.count(out["new_space"]) == 40
    # --replace with the transform already applied: idempotent
    assert cli([*fit, "--kind", "pca", "--dim", "4", "--out", str(tmp_path / "p4"),
                "--apply", "--replace"]) == 0
    assert json.loads(capsys.readouterr().out)["replaced"] == []
    assert _spaces(g) == (out["new_space"], sorted([base, out["new_space"]]))
    # fitting on a transformed space is an explicit choice (--stack), and never applied
    named = [*fit, "--space", out["new_space"], "--kind", "center", "--out", str(tmp_path / "s")]
    assert cli(named) == 2
    assert "would stack a second transform" in capsys.readouterr().err
    assert cli([*named, "--stack"]) == 0
    assert json.loads(capsys.readouterr().out)["output_fingerprint"].count("|") == 2
    assert cli([*named, "--stack", "--apply", "--replace"]) == 2
    assert "cannot be applied" in capsys.readouterr().err
    assert _spaces(g) == (out["new_space"], sorted([base, out["new_space"]]))
    # the library entry points keep the same rules
    with Gallery.open(g) as gal:
        with pytest.raises(InputError, match="stack"):
            fit_on_gallery(gal, "center", space=out["new_space"])
        tr, _ = fit_on_gallery(gal, "center", space=out["new_space"], stack=True)
        tr.save(tmp_path / "lib")
        with pytest.raises(InputError, match="cannot be applied"):
            add_transformed_space(gal, tr, tmp_path / "lib", space=out["new_space"],
                                  replace=True)


def test_replace_keeps_the_gallery_searchable(tmp_path, photos, capsys):
    g = tmp_path / "g"
    index_images(photos, g, model="effnet-lite0")
    fit = ["fit-transform", str(g), "--json", "-q", "--apply"]
    assert cli([*fit, "--kind", "center", "--out", str(tmp_path / "c")]) == 0
    assert cli([*fit, "--kind", "pca", "--dim", "4", "--out", str(tmp_path / "p")]) == 2
    assert cli([*fit, "--kind", "pca", "--dim", "4", "--out", str(tmp_path / "p"),
                "--replace"]) == 0
    capsys.readouterr()
    s = PlainSearcher.open(g)
    assert s.extractor.dim == 4
    _, res, fails = s.search_paths([photos / "coffee.jpg"], k=2)
    assert not fails and res is not None and res.ids[0, 0] == "coffee.jpg"

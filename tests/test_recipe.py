"""A gallery owns its recipe: `galleria index` into an existing gallery embeds with the
gallery's own spaces (global, local, transform), refuses another model unless asked
to add a space, and reports each image once; the README's "add more images"
commands as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _tiny  # registers tiny-test / tiny-local
from galleria.cli.main import main as cli
from galleria.errors import CompatibilityError, InputError
from galleria.extract.job import index_images
from galleria.extract.recipe import recipe_spaces
from galleria.store.gallery import Gallery
from galleria.store.state import GalleryState, SpaceState


def _folder(root: Path, n: int, seed: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:03d}.png")
    return root


def test_more_images_use_the_gallerys_spaces_and_count_once(tmp_path):
    a = _folder(tmp_path / "a", 8, 0)
    b = _folder(tmp_path / "b", 5, 1)
    g = tmp_path / "g"
    first = index_images(a, g, extractor=_tiny.tiny(3), local_extractor=_tiny.tiny_local())
    assert first.embedded == 8 and len(first.spaces) == 2
    assert first.embedded_per_space == {sp: 8 for sp in first.spaces}
    more = index_images(b, g, id_prefix="more/")  # no model: the gallery's recipe
    assert more.spaces == first.spaces and more.embedded == 5
    assert more.recipe == "the gallery's spaces"
    with Gallery.open(g) as gal:
        for sp in first.spaces:
            assert gal.count(sp) == 13
        x = gal.get_vectors(gal.keys_of(["more/002.png"]), space=first.spaces[0])
        res = gal.search(x, 1, space=first.spaces[0])
        assert res.ids[0, 0] == "more/002.png"
    again = index_images(b, g, id_prefix="more/")
    assert again.embedded == 0 and again.already_done == 10


def test_another_model_is_refused_unless_a_space_is_added_on_purpose(tmp_path):
    a = _folder(tmp_path / "a", 4, 0)
    g = tmp_path / "g"
    index_images(a, g, extractor=_tiny.tiny(3))
    other = _tiny.tiny(4)
    with pytest.raises(CompatibilityError) as e:
        index_images(a, g, extractor=other)
    msg = str(e.value)
    assert other.fingerprint in msg and _tiny.tiny(3).fingerprint in msg
    assert "--add-space" in msg
    rep = index_images(a, g, extractor=other, add_space=True)
    assert other.fingerprint in rep.spaces and rep.embedded_per_space[other.fingerprint] == 4
    same = index_images(a, g, extractor=_tiny.tiny(3))  # the gallery's own model: fine
    assert same.embedded == 0


def test_transformed_gallery_embeds_new_images_through_its_transform(tmp_path):
    from galleria.transforms.attach import add_transformed_space, fit_on_gallery

    a = _folder(tmp_path / "a", 30, 0)
    g = tmp_path / "g"
    index_images(a, g, extractor=_tiny.tiny(3, dim=16))
    with Gallery.open(g) as gal:
        tr, _ = fit_on_gallery(gal, "pca", dim=4)
        tr.save(tmp_path / "t")
        out = add_transformed_space(gal, tr, tmp_path / "t")
    b = _folder(tmp_path / "b", 3, 2)
    rep = index_images(b, g, id_prefix="b/")
    assert out in rep.spaces and rep.embedded == 3
    with Gallery.open(g) as gal:
        assert gal.primary_space == out and gal.count(out) == 33
        base = gal.space_info(out).info["base_space"]  # the recorded info is kept as it was
        assert gal.count(base) == 33
        x = gal.get_vectors(gal.keys_of(["b/001.png"]), space=out)
        assert gal.search(x, 1, space=out).ids[0, 0] == "b/001.png"


def test_recipe_during_an_upgrade():
    def sp(name, count, kind="global"):
        return SpaceState(name, kind, 8, count, 1, "exact", {})

    spaces = (sp("old", 10), sp("new", 4), sp("loc", 14, "local"))
    online = GalleryState(Path("g"), spaces, "old", {"upgrade": {
        "old_space": "old", "new_space": "new", "mode": "online"}})
    r = recipe_spaces(online)
    assert r.names == ("new", "loc") and r.done_if_in == ("old",)
    shadow = GalleryState(Path("g"), spaces, "old", {"upgrade": {
        "old_space": "old", "new_space": "new", "mode": "shadow"}})
    assert recipe_spaces(shadow).names == ("old", "loc")
    assert recipe_spaces(GalleryState(Path("g"), (), None, {})) is None


def test_online_upgrade_new_images_go_to_the_new_space(tmp_path):
    a = _folder(tmp_path / "a", 6, 0)
    g = tmp_path / "g"
    index_images(a, g, model="tiny-test")
    with Gallery.open(g) as gal:  # an upgrade job as `galleria upgrade start` records it
        old = gal.primary_space
        new_ext = _tiny.tiny(5)
        gal.register_space(new_ext.fingerprint, new_ext.dim, {
            "config": new_ext.config(), "fingerprint": new_ext.fingerprint, "kind": "global"})
        gal.set_setting("upgrade", {"old_space": old, "new_space": new_ext.fingerprint,
                                    "new_model": "tiny-test", "mode": "online"})
    b = _folder(tmp_path / "b", 3, 1)
    rep = index_images(b, g, id_prefix="b/")
    with Gallery.open(g) as gal:
        assert rep.spaces == [new_ext.fingerprint]
        assert gal.count(new_ext.fingerprint) == 3 and gal.count(old) == 6  # old ones wait
        # an updated image (same id, other file) moves: it leaves the old space
        Image.new("RGB", (24, 24), (9, 200, 9)).save(a / "000.png")
        index_images(a, g)
        assert gal.count(new_ext.fingerprint) == 4 and gal.count(old) == 5


@pytest.mark.slow  # effnet-lite2's ONNX export in a fresh cache (~35 s)
def test_readme_add_more_images_commands_as_written(tmp_path, photos, capsys):
    """README: index PHOTOS/ --model effnet-lite2; index MORE/ --out my.gallery
    --id-prefix more/ (same file names, other images); search finds them; --update."""
    work = tmp_path / "w"
    photos_dir = work / "PHOTOS"
    shutil.copytree(photos, photos_dir)
    more = work / "MORE"
    more.mkdir()
    for n, p in enumerate(sorted(photos.glob("*.jpg"))):  # same names, other images
        img = Image.open(p).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.rotate(90 * (n % 3 + 1), expand=True).save(more / p.name)
    g = str(work / "my.gallery")
    assert cli(["index", str(photos_dir), "--model", "effnet-lite2", "--out", g, "-q"]) == 0
    assert cli(["index", str(more), "--out", g, "--id-prefix", "more/", "-q"]) == 0
    out = capsys.readouterr().out
    assert "6 embedded" in out and "effnet-lite2" in out and "effnet-lite0" not in out
    assert cli(["search", g, str(more / "coffee.jpg"), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out.splitlines()[0])
    assert hit["results"][0]["id"] == "more/coffee.jpg"
    assert cli(["check", g]) == 0
    capsys.readouterr()
    # a different model is refused, naming both and the option that adds a space
    assert cli(["index", str(more), "--out", g, "--id-prefix", "more/", "--model",
                "effnet-lite0"]) == 2
    err = capsys.readouterr().err
    assert "effnet-lite0" in err and "effnet-lite2" in err and "--add-space" in err
    # changed images replace their vectors (README: index PHOTOS/ --out my.gallery --update)
    Image.open(more / "rocket.jpg").save(photos_dir / "rocket.jpg")
    assert cli(["index", str(photos_dir), "--out", g, "--update", "-q"]) == 0
    assert "1 embedded, 1 updated" in capsys.readouterr().out
    with Gallery.open(g) as gal:
        assert len(gal) == 12 and [s.space for s in gal.spaces()] == [gal.primary_space]
    with pytest.raises(InputError, match="--transform applies to a global model"):
        index_images(more, g, transform=tmp_path)

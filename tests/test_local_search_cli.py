"""``galleria index --local sift`` then ``galleria search --pipeline ...`` end to end.

Default suite: a local-only gallery of the scikit-image photos (queries: a
rotated, rescaled crop of one of them; a blank image). ``shared``: 12 SMVS
covers with a global model too, phone photos as queries, every pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galleria.cli.main import main
from galleria.decision import SearchRequest, choose, open_searcher
from galleria.errors import InputError
from galleria.search.gallery_pipeline import open_pipeline
from galleria.store.gallery import Gallery


def _search(capsys, *argv: str) -> tuple[int, list[dict], str]:
    rc = main(["search", *argv, "--json", "--quiet"])
    cap = capsys.readouterr()
    return rc, [json.loads(line) for line in cap.out.splitlines() if line.strip()], cap.err


@pytest.fixture(scope="module")
def local_gallery(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-g") / "g"
    assert main(["index", str(photos), "--out", str(out), "--local", "sift", "--quiet",
                 "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def queries(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("local-q")
    img = Image.open(photos / "chelsea.jpg")
    w, h = img.size
    img.crop((w // 8, h // 8, w - w // 10, h - h // 12)).rotate(12, expand=True) \
        .resize((int(w * 0.7), int(h * 0.7))).save(root / "cat.jpg", quality=85)
    Image.new("RGB", (300, 200), (128, 128, 128)).save(root / "blank.png")
    return root


def test_local_only_gallery_default_pipeline(local_gallery, queries, capsys):
    with Gallery.open(local_gallery, readonly=True) as g:
        assert choose(g.state(), SearchRequest()).pipeline == "local"
        assert g.primary_space is None
    for pipeline in (None, "local", "local+mds"):
        argv = [str(local_gallery), str(queries / "cat.jpg"), "-k", "3"]
        rc, out, _ = _search(capsys, *argv, *(["--pipeline", pipeline] if pipeline else []))
        assert rc == 0
        assert out[0]["results"][0]["id"] == "chelsea.jpg", (pipeline, out)


def test_global_pipelines_refused_without_global_model(local_gallery, queries, capsys):
    for pipeline in ("global", "global+sv"):
        rc, _, err = _search(capsys, str(local_gallery), str(queries / "cat.jpg"),
                             "--pipeline", pipeline)
        assert rc == 2 and ("local features only" in err or "needs a global model" in err), err


def test_blank_query_is_a_clear_failure(local_gallery, queries, capsys):
    rc, out, err = _search(capsys, str(local_gallery), str(queries / "blank.png"),
                           str(queries / "cat.jpg"), "--pipeline", "local")
    assert rc == 0 and [r["query"] for r in out] == [str(queries / "cat.jpg")]
    assert "blank.png" in err and "no keypoints" in err
    rc, out, err = _search(capsys, str(local_gallery), str(queries / "blank.png"))
    assert rc == 1 and out == [] and "no keypoints" in err
    s = open_pipeline(local_gallery, "local")
    q = s.embed_images([Image.open(queries / "blank.png")])
    with pytest.raises(InputError, match="no keypoints"):
        s.search(q, 3)


def test_incremental_remove_and_add_are_searched(local_gallery, queries, photos, tmp_path):
    g_path = tmp_path / "g"
    shutil.copytree(local_gallery, g_path)
    s = open_searcher(g_path, pipeline="local")
    q, _, _ = s.embed_paths([queries / "cat.jpg"])
    with Gallery.open(g_path) as g:
        before = s.search(q, 6)
        assert before.ids[0][0] == "chelsea.jpg"
        g.remove(["chelsea.jpg"])
        after = s.search(q, 6)  # the same searcher sees the commit
        assert "chelsea.jpg" not in list(after.ids[0])
        feats = s.models[s.local_space].embed_images([Image.open(photos / "chelsea.jpg")])
        g.add_local(["cat-again"], feats, space=s.local_space)
        again = s.search(q, 6)
        assert again.ids[0][0] == "cat-again"
        assert again.generation > before.generation
    # local+mds folds base + delta into one index (image-to-image similarities)
    mds = open_searcher(g_path, pipeline="local+mds")
    assert mds.search(q, 3).ids[0][0] == "cat-again"


def test_saved_local_index_is_reused_and_checked(local_gallery):
    with Gallery.open(local_gallery, readonly=True) as g:
        sp = next(s for s in g.spaces() if s.kind == "local")
        snap = g.db.one("SELECT folder, generation FROM index_snapshots WHERE space=?",
                        (sp.space,))
        assert snap is not None and "asmk" in snap[0]
        from galleria.errors import CompatibilityError
        from galleria.store.views import load_any_index as load_index

        idx = load_index(g.path / snap[0], fingerprint=sp.space, dim=sp.dim)
        assert len(idx) == sp.count
        with pytest.raises(CompatibilityError):
            load_index(g.path / snap[0], fingerprint="xfeat@0000", dim=sp.dim)
        v = g.view(sp.space)
        assert type(v.base).__name__ == "AsmkIndex" and v.count == sp.count


@pytest.mark.shared
def test_smvs_every_pipeline(require_shared, tmp_path, capsys):
    root = require_shared("smvs_dvd_covers")
    refs = sorted((root / "jpg" / "Reference").iterdir())[:12]
    src = tmp_path / "refs"
    src.mkdir()
    for p in refs:
        shutil.copy(p, src / p.name)
    g = tmp_path / "g"
    assert main(["index", str(src), "--out", str(g), "--local", "sift", "--model",
                 "effnet-lite0", "--quiet", "--threads", "2",
                 "--no-tune"]) == 0  # the default by the gallery's spaces (untuned)
    capsys.readouterr()
    phones = [next((root / "jpg" / cam).glob(p.stem + ".*")) for cam in ("Droid", "Palm")
              for p in refs[:3]]
    for pipeline in ("global", "global+sv", "local", "local+mds", None):
        rc, out, _ = _search(capsys, str(g), *map(str, phones), "-k", "3",
                             *(["--pipeline", pipeline] if pipeline else []))
        assert rc == 0 and len(out) == len(phones)
        top = [Path(r["results"][0]["id"]).stem for r in out]
        right = np.mean([t == Path(p).stem for t, p in zip(top, phones, strict=True)])
        if pipeline != "global":
            assert right == 1.0, (pipeline, top)
    with Gallery.open(g, readonly=True) as gal:
        assert choose(gal.state(), SearchRequest()).pipeline == "hybrid"

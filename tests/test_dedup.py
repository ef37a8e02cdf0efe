"""Near-duplicate detection: candidate pairs and groups against brute force, the rule,
and `galleria dedup` on real photos with planted copies (crop, re-encode, resize),
with and without local-feature verification."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from galleria.dedup import DedupConfig, candidate_pairs, decide, find_duplicates, groups
from galleria.dedup.core import calibrated_threshold
from galleria.errors import InputError
from galleria.store.gallery import Gallery
from galleria.validate import l2_normalize


def test_candidate_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.standard_normal((300, 8)).astype(np.float32))
    x[150:160] = l2_normalize(x[:10] + 0.05 * rng.standard_normal((10, 8)).astype(np.float32))
    keys = np.arange(300, dtype=np.int64) * 3 + 7
    s = x @ x.T
    k = 6
    nn = np.argsort(-s, axis=1)[:, :k]
    pairs, sc = candidate_pairs(keys, keys[nn], np.take_along_axis(s, nn, 1), 0.7)
    want = set()
    for i in range(300):
        for j in nn[i]:
            if i != j and s[i, j] >= 0.7:
                want.add((int(keys[min(i, j)]), int(keys[max(i, j)])))
    assert {tuple(p) for p in pairs.tolist()} == want
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(pairs) == len(want)
    for (a, b), v in zip(pairs.tolist(), sc.tolist(), strict=True):
        assert abs(v - s[(a - 7) // 3, (b - 7) // 3]) < 1e-5


def test_groups_are_connected_components():
    assert groups(np.array([[1, 2], [2, 3], [7, 9], [4, 5], [5, 1]])) == [[1, 2, 3, 4, 5], [7, 9]]
    assert groups(np.zeros((0, 2), np.int64)) == []


def test_the_rule():
    cfg = DedupConfig(candidate=0.8, threshold=0.9, sure=0.97, min_inliers=20)
    s = np.array([0.85, 0.93, 0.98, 0.85])
    assert decide(s, None, cfg).tolist() == [False, True, True, False]
    assert decide(s, np.array([30, 5, -1, 19]), cfg).tolist() == [True, False, True, False]
    with pytest.raises(InputError, match="verify must be one of"):
        DedupConfig(verify="sometimes")
    with pytest.raises(InputError, match="cosine similarity"):
        DedupConfig(threshold=1.5)
    assert calibrated_threshold({}) is None
    assert calibrated_threshold({"dedup_threshold": {"threshold": 0.88, "x": 1}}) == {
        "threshold": 0.88}


def _copies(src: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    w, h = src.size
    out = []
    x0, y0 = int(0.1 * w), int(0.08 * h)  # crop 80 %
    out.append(src.crop((x0, y0, x0 + int(0.8 * w), y0 + int(0.8 * h))))
    buf = io.BytesIO()
    src.save(buf, format="JPEG", quality=25)  # heavy re-encode
    out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    out.append(src.resize((w // 2, h // 2)))  # half size
    return out


@pytest.fixture(scope="module")
def planted(photos, tmp_path_factory):
    """The six test photos plus three copies of chelsea and coffee, indexed with
    effnet-lite0 and sift."""
    from galleria.extract.job import index_images

    root = tmp_path_factory.mktemp("dedup")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for p in sorted(photos.glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        img.save(src / p.name, quality=92)
        if p.stem in ("chelsea", "coffee"):
            for n, c in enumerate(_copies(img, rng)):
                c.save(src / f"{p.stem}-copy{n}.jpg", quality=90)
    g = root / "g"
    index_images(src, g, model="effnet-lite0", local="sift", batch_size=4)
    return g


@pytest.mark.slow  # effnet-lite0 + sift on 12 photos: ~50 s on a loaded machine
def test_dedup_finds_the_planted_copies(planted, tmp_path, capsys):
    from galleria.cli.main import main as cli

    want = [["chelsea-copy0.jpg", "chelsea-copy1.jpg", "chelsea-copy2.jpg", "chelsea.jpg"],
            ["coffee-copy0.jpg", "coffee-copy1.jpg", "coffee-copy2.jpg", "coffee.jpg"]]
    with Gallery.open(planted, readonly=True) as g:
        rep = find_duplicates(g)
        assert rep.local_space is not None and rep.thresholds_from == "defaults"
        assert sorted(rep.groups) == want and rep.duplicates == 6
        assert all(p["inliers"] is None or p["inliers"] == -1 or p["inliers"] >= 25
                   for p in rep.pairs)
        # global embeddings alone (threshold 0.92): the re-encodes and resizes; a crop
        # moves the embedding further (the reason for the local check)
        glob = find_duplicates(g, DedupConfig(verify="never"))
        assert glob.local_space is None
        assert {x for grp in glob.groups for x in grp} >= {
            f"{s}{c}.jpg" for s in ("chelsea", "coffee") for c in ("", "-copy1", "-copy2")}
        assert {x for grp in glob.groups for x in grp} <= {x for grp in want for x in grp}
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    assert cli(["dedup", str(planted), "--out", str(out), "--html", str(page), "-q"]) == 0
    text = capsys.readouterr().out
    assert "2 groups of near-duplicates (6 images beyond the first" in text
    rep2 = json.loads(out.read_text())
    assert sorted(rep2["groups"]) == want and rep2["rule"]["min_inliers"] == 25
    html = page.read_text()
    assert html.count("<figure>") == 8 and "data:image/jpeg;base64," in html


def test_dedup_needs_a_global_space(tmp_path):
    g = Gallery.create(tmp_path / "g")
    with pytest.raises(InputError, match="no global space"):
        find_duplicates(g)
    g.close()


def test_dedup_cli_json_and_html_on_a_small_gallery(tmp_path, capsys):
    """The plumbing, fast: tiny test extractors (global + local), two re-encoded copies."""
    import _tiny
    from galleria.cli.main import main as cli
    from galleria.extract.job import index_images

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).resize(
            (96, 96), Image.Resampling.NEAREST).save(src / f"{i}.png")
    for i in (2, 5):
        Image.open(src / f"{i}.png").save(src / f"{i}-copy.jpg", quality=95)
    g = tmp_path / "g"
    index_images(src, g, extractor=_tiny.tiny(3), local_extractor=_tiny.tiny_local())
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    assert cli(["dedup", str(g), "--out", str(out), "--html", str(page), "-q",
                "--verify", "never"]) == 0
    rep = json.loads(out.read_text())
    assert sorted(rep["groups"]) == [["2-copy.jpg", "2.png"], ["5-copy.jpg", "5.png"]]
    assert rep["local_space"] is None and rep["duplicates"] == 2
    assert page.read_text().count("<figure>") == 4
    assert "2 groups of near-duplicates" in capsys.readouterr().out
    assert cli(["dedup", str(g), "--json", "-q"]) == 0  # verified with the local space
    rep = json.loads(capsys.readouterr().out)
    assert rep["local_space"] is not None and rep["candidate_pairs"] >= 2

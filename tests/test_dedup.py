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


def test_complete_linkage_groups_are_cliques_and_single_linkage_components():
    """``linkage="complete"``: every pair inside a group was confirmed, and no two groups
    could merge (some cross pair is missing); ``single``: the connected components."""
    rng = np.random.default_rng(5)
    for _ in range(40):
        n = int(rng.integers(3, 25))
        allp = [(a, b) for a in range(n) for b in range(a + 1, n)]
        keep = rng.random(len(allp)) < rng.uniform(0.05, 0.6)
        pairs = np.array([p for p, k in zip(allp, keep, strict=True) if k] or [(0, 1)],
                         np.int64) * 7 + 3
        scores = rng.random(len(pairs)).astype(np.float32)
        linked = {tuple(p) for p in pairs.tolist()} | {tuple(p[::-1]) for p in pairs.tolist()}
        comp = groups(pairs, linkage="single")
        cl = groups(pairs, scores, linkage="complete")
        seen = [x for g in cl for x in g]
        assert len(seen) == len(set(seen))  # a partition
        for g in cl:
            assert len(g) >= 2 and all((a, b) in linked for a in g for b in g if a != b)
            assert any(set(g) <= set(c) for c in comp)  # inside one component
        for i, g in enumerate(cl):  # maximal: no two groups are fully linked
            for h in cl[i + 1:]:
                assert not all((a, b) in linked for a in g for b in h)
        # brute-force components
        parent = {int(x): int(x) for x in pairs.reshape(-1)}

        def f(x, parent=parent):
            while parent[x] != x:
                x = parent[x]
            return x

        for a, b in pairs.tolist():
            parent[f(a)] = f(b)
        want = {}
        for x in parent:
            want.setdefault(f(x), []).append(x)
        assert sorted(sorted(v) for v in want.values()) == sorted(comp)
    chain = np.array([[1, 2], [2, 3], [3, 4]], np.int64)  # a chain is not one group
    assert groups(chain, linkage="single") == [[1, 2, 3, 4]]
    assert groups(chain, np.array([0.9, 0.8, 0.95]), linkage="complete") == [[1, 2], [3, 4]]
    with pytest.raises(InputError):
        groups(chain, linkage="average")
    with pytest.raises(InputError):
        DedupConfig(linkage="average")


def test_score_at_inverts_the_calibration():
    """The threshold meaning "P(match) >= p": the smallest score whose calibrated
    probability reaches p (isotonic and logistic maps, against a dense grid)."""
    from galleria.calibration import apply, fit, score_at

    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(0.9, 0.05, 300), rng.normal(0.6, 0.1, 900)])
    y = np.concatenate([np.ones(300, bool), np.zeros(900, bool)])
    grid = np.linspace(-1, 1, 20001)
    for method in ("isotonic", "logistic"):
        cal = fit(s[:, None], y[:, None], method=method)
        pr = apply(cal, grid[None, :])[0]
        for p in (0.2, 0.5, 0.9):
            t = score_at(cal, p)
            first = grid[np.flatnonzero(pr >= p - 1e-6)[0]]
            assert t is not None and abs(t - first) <= 2e-4, (method, p, t, first)
        assert score_at(cal, 1.0) is None or apply(cal, np.array([[score_at(cal, 1.0)]]))[0, 0] \
            >= 1.0 - 1e-6


def test_dedup_threshold_from_the_calibrated_probability(tmp_path, capsys):
    """`--min-probability P` takes the threshold from the gallery's tuned calibration of
    its global model; without one it is a clear error, never a silent default."""
    import _tiny
    from galleria.calibration import fit
    from galleria.cli.main import main as cli
    from galleria.extract.job import index_images
    from galleria.tune.record import FORMAT_VERSION, RECORD_TYPE, TUNED_KEY

    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).resize(
            (96, 96), Image.Resampling.NEAREST).save(src / f"{i}.png")
    Image.open(src / "3.png").save(src / "3-copy.jpg", quality=95)
    g = tmp_path / "g"
    index_images(src, g, extractor=_tiny.tiny(3))
    with pytest.raises(InputError, match="galleria tune"), Gallery.open(g, readonly=True) as gal:
        find_duplicates(gal, DedupConfig(min_probability=0.5))
    s = np.concatenate([np.full(50, 0.99), np.full(50, 0.2)])
    cal = fit(s[:, None], (s > 0.5)[:, None], method="logistic")
    with Gallery.open(g) as gal:
        space = gal.primary_space
        gal.update_settings({TUNED_KEY: {
            "type": RECORD_TYPE, "format_version": FORMAT_VERSION, "candidates": [
                {"key": "global", "pipeline": "global", "params": {}, "supported": True,
                 "spaces": [space], "calibration": cal}]}})
    out = tmp_path / "r.json"
    assert cli(["dedup", str(g), "--min-probability", "0.5", "--out", str(out), "-q"]) == 0
    rep = json.loads(out.read_text())
    assert "calibrated match probability" in rep["thresholds_from"]
    assert ["3-copy.jpg", "3.png"] in rep["groups"]

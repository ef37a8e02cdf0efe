"""One contract over every searcher kind, and one decision behind every entry.

The conformance check (tests/_contract.py) runs over plain search, each local
pipeline and the backfill searcher of an upgrade in progress (the sharded one in
tests/test_ray.py, on a simulated cluster). Then the same photo is searched
through the CLI, the Python API and the HTTP service on a global gallery, a
gallery with local features and a gallery under upgrade: the same top-10 from
all three, chosen by the one decision.
"""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

import _tiny
from _contract import assert_conforms
from galleria.cli.main import main
from galleria.decision import SearchRequest, SearchSpec, choose, open_searcher
from galleria.errors import InputError
from galleria.extract.job import index_images
from galleria.images.sources import SourceItem
from galleria.search.pipelines import PIPELINES
from galleria.store.gallery import Gallery
from galleria.upgrade.job import run_upgrade, start_upgrade

N = 24


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-imgs")
    rng = np.random.default_rng(7)
    items = []
    for i in range(N):
        arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        p = root / f"im{i:02d}.png"
        Image.fromarray(arr).save(p)
        items.append(SourceItem(id=p.name, path=p))
    return items


@pytest.fixture(scope="module")
def galleries(images, tmp_path_factory):
    """``{"global": G, "local": G with local features, "upgrade": G half backfilled}``."""
    root = tmp_path_factory.mktemp("contract-g")
    out = {}
    out["global"] = root / "global"
    index_images(images, out["global"], model=None, extractor=_tiny.tiny(1), flush_every=8)
    out["local"] = root / "local"
    index_images(images, out["local"], model=None, extractor=_tiny.tiny(1),
                 local_extractor=_tiny.tiny_local(), flush_every=8)
    out["upgrade"] = root / "upgrade"
    shutil.copytree(out["global"], out["upgrade"])
    start_upgrade(out["upgrade"], "tiny-test", extractor=_tiny.tiny(2), seed=3)
    run_upgrade(out["upgrade"], limit=N // 2, extractor=_tiny.tiny(2), batch_size=4,
                commit_every=4)
    return out


def _queries(images, n=3):
    return [Image.open(it.path).convert("RGB").rotate(3) for it in images[:n]]


# ------------------------------------------------------------------ contract
def test_plain_searcher_conforms(galleries, images):
    s = open_searcher(galleries["global"])
    assert s.kind == "plain" and s.spec.reason == "gallery spaces"
    assert_conforms(s, _queries(images), N)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipeline_conforms(galleries, images, pipeline):
    s = open_searcher(galleries["local"], pipeline=pipeline)
    assert s.describe()["pipeline"] == pipeline and s.spec.reason == "asked"
    assert_conforms(s, _queries(images), N)


@pytest.mark.parametrize("rule", ["auto", "naive"])
def test_backfill_searcher_conforms(galleries, images, rule):
    s = open_searcher(galleries["upgrade"], rule=rule)
    assert s.kind == "backfill" and s.spec.reason == "upgrade in progress"
    assert len(s.spaces) == 2
    assert_conforms(s, _queries(images), N)


# ------------------------------------------------------------------ decision
def test_the_decision_is_pure_and_names_its_reason(galleries):
    with Gallery.open(galleries["local"], readonly=True) as g:
        state = g.state()
    a, b = choose(state, SearchRequest()), choose(state, SearchRequest())
    assert isinstance(a, SearchSpec) and a == b and hash(a) == hash(b)
    assert (a.kind, a.pipeline, a.reason) == ("pipeline", "hybrid", "gallery spaces")
    assert choose(state, SearchRequest.of("global")).kind == "plain"
    assert choose(state, SearchRequest.of("global", sharded=True)).kind == "sharded"
    # a tuned default wins over the spaces' default, an explicit pipeline over both
    tuned = type(state)(state.path, state.spaces, state.primary,
                        {**state.settings, "tuned": {"pipeline": "global+sv", "params": {},
                                                      "rule": {"mode": "select"}}})
    t = choose(tuned, SearchRequest())
    assert (t.pipeline, t.reason) == ("global+sv", "tuned") and t != a
    assert choose(tuned, SearchRequest.of("local")).pipeline == "local"
    # a record of the former automatic vote (no rule mode) no longer sets the pipeline
    old = type(state)(state.path, state.spaces, state.primary,
                      {**state.settings, "tuned": {"pipeline": "local", "params": {}}})
    assert (choose(old, SearchRequest()).pipeline, choose(old, SearchRequest()).reason) == \
        ("hybrid", "gallery spaces")
    with pytest.raises(InputError, match="unknown pipeline"):
        SearchRequest.of("nope")
    with Gallery.open(galleries["upgrade"], readonly=True) as g:
        up = g.state()
    assert choose(up, SearchRequest()).kind == "backfill"
    assert choose(up, SearchRequest(sharded=True)).kind == "backfill"  # never sharded
    assert choose(up, SearchRequest(space=up.primary)).kind == "plain"  # expert override


def test_a_local_only_gallery_is_searched_by_every_entry(images, tmp_path):
    from _service import thread_server
    from galleria.service.engine import ServiceConfig

    g = tmp_path / "loc"
    index_images(images, g, model=None, local_extractor=_tiny.tiny_local(), flush_every=8)
    s = open_searcher(g)
    assert (s.kind, s.describe()["pipeline"], s.spec.reason) == \
        ("pipeline", "local", "gallery spaces")
    with pytest.raises(InputError, match="local features only"):
        open_searcher(g, pipeline="global")
    photo = tmp_path / "q.png"
    _queries(images, 1)[0].save(photo)
    _, res, _ = s.search_paths([photo], 5)
    with thread_server(ServiceConfig(gallery=g, warm_up=False, threads=1)) as url:
        r = httpx.post(url + "/v1/search", timeout=60, data={"k": "5"},
                       files={"image": ("q.png", photo.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"]] == [i for i, _ in res.row(0)]
        r = httpx.post(url + "/v1/search", timeout=60, data={"k": "5", "pipeline": "global"},
                       files={"image": ("q.png", photo.read_bytes(), "image/png")})
        assert r.status_code == 422 and "local features only" in r.json()["message"]


# ------------------------------------------------- one answer from every entry
def _cli_top(capsys, gallery, photo, k):
    capsys.readouterr()
    assert main(["search", str(gallery), str(photo), "-k", str(k), "--json",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out) if out.lstrip().startswith("[") else \
        [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r["id"] for r in rows[0]["results"]]


def _api_top(gallery, photo, k):
    s = open_searcher(gallery)
    _, res, fails = s.search_paths([photo], k)
    assert not fails
    return [i for i, _ in res.row(0)], s.describe()


@pytest.mark.parametrize("which", ["global", "local", "upgrade"])
def test_cli_python_api_and_service_give_the_same_top10(galleries, images, which, tmp_path,
                                                        capsys):
    from _service import thread_server
    from galleria.service.engine import ServiceConfig

    photo = tmp_path / "q.png"
    _queries(images, 1)[0].save(photo)
    api, desc = _api_top(galleries[which], photo, 10)
    cli = _cli_top(capsys, galleries[which], photo, 10)
    cfg = ServiceConfig(gallery=galleries[which], warm_up=False, threads=1)
    with thread_server(cfg) as url:
        r = httpx.post(url + "/v1/search", timeout=60, data={"k": "10"},
                       files={"image": ("q.png", photo.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
    svc = [h["id"] for h in body["results"]]
    assert len(api) == 10 and api == cli == svc, (which, api, cli, svc)
    assert (body["searcher"], body["pipeline"], body["reason"]) == \
        (desc["searcher"], desc["pipeline"], desc["reason"])
    want = {"global": "plain", "local": "pipeline", "upgrade": "backfill"}[which]
    assert body["searcher"] == want

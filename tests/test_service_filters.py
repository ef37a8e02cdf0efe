"""The service's search API as users of other engines expect it: payload filters and a
score threshold (equal to the library's filtered search), listing / scrolling /
counting with a filter, unknown request fields refused, several galleries per server
each with its own token, the dedup route, full-size images and an offline /docs."""

from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

import _tiny
from _service import ProcessServer
from galleria.decision import open_searcher
from galleria.extract.job import index_images

TOK_A = "token-of-gallery-a-0123456789"
TOK_B = "token-of-gallery-b-0123456789"
LABELS = ["cat", "dog", "bird"]


def _make_gallery(root, name, n, seed):
    rng = np.random.default_rng(seed)
    src = root / f"src-{name}"
    src.mkdir()
    rows = ["path,label,year,tags:list"]
    for i in range(n):
        arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((64, 48), Image.Resampling.NEAREST).save(src / f"{i}.png")
        rows.append(f"{i}.png,{LABELS[i % 3]},{2000 + i},{'a|b' if i % 2 else 'c'}")
    Image.open(src / "3.png").save(src / "3-copy.jpg", quality=95)  # a near-duplicate
    rows.append("3-copy.jpg,cat,2003,c")
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    index_images(src / "m.csv", root / "gals" / name, extractor=_tiny.tiny(3))
    return src


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc-filters")
    srcs = {n: _make_gallery(root, n, 30, s) for n, s in (("a", 1), ("b", 2))}
    (root / "gals" / "notes").mkdir()  # not a gallery: ignored
    (root / "tokens").write_text(f"# one line per gallery\na {TOK_A}\nb {TOK_B}\n")
    with ProcessServer(root / "gals", "--token-file", str(root / "tokens"),
                       log=root / "server.log") as srv:
        srv.root = root  # type: ignore[attr-defined]
        srv.srcs = srcs  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def _ids(resp):
    return [r["id"] for r in resp.json()["results"]]


def test_several_galleries_each_with_its_own_token(client, served):
    gal = client.get("/v1/galleries").json()["galleries"]
    assert [g["name"] for g in gal] == ["a", "b"] and all(g["items"] == 31 for g in gal)
    r = client.post("/v1/search", json={"id": "1.png"})
    assert r.status_code == 404 and r.json()["error"] == "several_galleries"
    assert client.post("/v1/galleries/zz/search", json={"id": "1.png"}).status_code == 404
    for name in ("a", "b"):
        r = client.post(f"/v1/galleries/{name}/search", json={"id": "4.png", "k": 3})
        assert r.status_code == 200 and _ids(r)[0] == "4.png"
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buf, format="PNG")
    up = {"image": ("new.png", buf.getvalue(), "image/png")}
    r = client.post("/v1/galleries/b/items", files=up, data={"id": "new"},
                    headers={"Authorization": f"Bearer {TOK_A}"})
    assert r.status_code == 403  # a's token does not write b
    r = client.post("/v1/galleries/a/items", files=up, data={"id": "new"},
                    headers={"Authorization": f"Bearer {TOK_A}"})
    assert r.status_code == 201, r.text
    r = client.delete("/v1/galleries/a/items/new", headers={"Authorization": f"Bearer {TOK_A}"})
    assert r.status_code == 200
    assert client.get("/v1/galleries/a/info").json()["items"] == 31


def test_filters_and_threshold_equal_the_library(client, served):
    lib = open_searcher(served.root / "gals" / "a", with_models=False)
    q = lib.gallery.get_vectors(lib.gallery.keys_of(["5.png"]))
    for body, where in (
        ({"filter": {"must": [{"key": "label", "match": "dog"}],
                     "must_not": [{"key": "year", "range": {"gte": 2020}}]}},
         {"must": [{"key": "label", "match": "dog"}],
          "must_not": [{"key": "year", "range": {"gte": 2020}}]}),
        ({"where": ["tags=a", "year<2010"]}, ["tags=a", "year<2010"]),
        ({"filter": {"label": "bird"}, "where": "year>=2010"}, ["label=bird", "year>=2010"]),
    ):
        r = client.post("/v1/galleries/a/search", json={"id": "5.png", "k": 30, **body})
        assert r.status_code == 200, r.text
        want = [i for i in lib.search(q, 30, where=where).ids[0] if i is not None]
        assert _ids(r) == want and r.json()["filter"]
        assert len(want) < 31
    r = client.post("/v1/galleries/a/search", json={"id": "5.png", "k": 30, "min_score": 0.5})
    scores = [x["score"] for x in r.json()["results"]]
    assert scores and min(scores) >= 0.5 and r.json()["min_score"] == 0.5
    # multipart takes the same fields
    img = (served.srcs["a"] / "5.png").read_bytes()
    r = client.post("/v1/galleries/a/search", files={"image": ("q.png", img, "image/png")},
                    data={"where": "label=dog", "k": "5"})
    assert r.status_code == 200 and all(x["metadata"]["label"] == "dog"
                                        for x in r.json()["results"])


@pytest.mark.parametrize("req, code, word", [
    ({"json": {"id": "1.png", "filtr": {"label": "cat"}}}, 400, "unknown_field"),
    ({"json": {"id": "1.png", "filter": {"colour": "red"}}}, 400, "bad_filter"),
    ({"json": {"id": "1.png", "filter": {"key": "label"}}}, 400, "bad_filter"),
    ({"json": {"id": "1.png", "where": "year>=soon"}}, 400, "bad_filter"),
    ({"json": {"id": "1.png", "min_score": 3}}, 400, "out_of_range"),
    ({"json": {"queries": [{"id": "1.png", "kk": 3}]}, "path": "search/batch"}, 200, None),
    ({"json": {"queries": [{"id": "1.png"}], "limit": 3}, "path": "search/batch"}, 400,
     "unknown_field"),
    ({"files": {"image": ("q.png", b"not read", "image/png")}, "data": {"topk": "3"}}, 400,
     "unknown_field"),
    ({"json": {"id": "1.png"}, "params": {"kk": "3"}}, 400, "unknown_field"),
])
def test_unknown_fields_and_bad_filters_are_400(client, req, code, word):
    path = req.pop("path", "search")
    r = client.post(f"/v1/galleries/a/{path}", **req)
    assert r.status_code == code, r.text
    if word:
        assert r.json()["error"] == word and r.json()["message"]
    else:  # the bad query object is answered inline
        assert r.json()["responses"][0]["error"]["status"] == 400


def test_list_scroll_and_count_with_a_filter(client, served):
    lib = open_searcher(served.root / "gals" / "b", with_models=False).gallery
    want = [r.id for r in lib.list_items(["label=cat"], limit=1000).items]
    got, cursor = [], None
    while True:
        params = {"where": "label=cat", "limit": 4, "count": "true"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/galleries/b/items", params=params).json()
        got += [x["id"] for x in page["items"]]
        assert page["count"] == len(want) and all("path" not in x["metadata"]
                                                  for x in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert got == want
    r = client.post("/v1/galleries/b/items/scroll",
                    json={"filter": {"key": "tags", "any": ["a"]}, "limit": 100})
    assert [x["id"] for x in r.json()["items"]] == [
        x.id for x in lib.list_items({"key": "tags", "any": ["a"]}, limit=100).items]
    r = client.post("/v1/galleries/b/items/count", json={"where": ["year>=2010"]})
    assert r.json() == {"count": lib.count_items("year>=2010")}
    assert client.post("/v1/galleries/b/items/scroll", json={"cursor": "x"}).status_code == 400
    assert client.post("/v1/galleries/b/items/count", json={"limit": 3}).status_code == 400
    assert client.get("/v1/galleries/b/items", params={"wher": "x"}).status_code == 400


def test_dedup_route_full_image_and_offline_docs(client, served):
    r = client.post("/v1/galleries/a/dedup", json={"verify": "never", "threshold": 0.99})
    assert r.status_code == 200, r.text
    assert [sorted(g) for g in r.json()["groups"]] == [["3-copy.jpg", "3.png"]]
    assert "gallery" not in r.json()
    assert client.post("/v1/galleries/a/dedup", json={"tresh": 1}).status_code == 400
    img = client.get("/v1/galleries/a/items/7.png/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(img.content)).size == (64, 48)
    thumb = client.get("/v1/galleries/a/items/7.png/thumbnail?size=64")
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 64
    page = client.get("/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    js = client.get("/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 500_000
    spec = client.get("/openapi.json").json()
    assert "/v1/galleries/{gallery}/search" in spec["paths"]
    params = spec["paths"]["/v1/galleries/{gallery}/search"]["post"].get("parameters", [])
    assert any(p["name"] == "gallery" and p["in"] == "path" for p in params)
    assert "galleria_gallery_items" in client.get("/v1/galleries/a/metrics").text


def test_single_gallery_folder_keeps_the_plain_routes(tmp_path, served):
    g = tmp_path / "one"
    shutil.copytree(served.root / "gals" / "a", g)
    with ProcessServer(g, log=tmp_path / "log") as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post("/v1/search", json={"id": "2.png", "k": 2, "where": "label=bird"})
        assert r.status_code == 200 and _ids(r)[0] == "2.png"
        assert c.get("/v1/galleries").json()["galleries"][0]["name"] == "one"
        assert c.get("/v1/items?limit=1").json()["next_cursor"]

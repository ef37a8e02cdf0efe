"""The HTTP API against a real `galleria serve` process on real photos with effnet-lite0:
search by upload / base64 / embedding / id, pagination, batches, item writes, info,
metrics, OpenAPI, the bad-input corpus (each a 4xx JSON with a message, the next
request answered) and bearer-token auth."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from _service import ProcessServer

pytest.importorskip("fastapi")

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(photos_gallery, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-api")
    g = tmp / "g"
    shutil.copytree(photos_gallery, g)
    (tmp / "token").write_text(TOKEN + "\n")
    with ProcessServer(g, "--token-file", str(tmp / "token"), "--max-upload-mb", "1",
                       "--request-threads", "2", log=tmp / "server.log") as srv:
        srv.gallery = g  # type: ignore[attr-defined]
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _upload(photos, name: str) -> dict:
    return {"image": (name, (photos / name).read_bytes(), "image/jpeg")}


def test_search_upload_matches_the_library_and_other_query_forms(client, server, photos):
    from galleria.search.searcher import PlainSearcher

    r = client.post("/v1/search", files=_upload(photos, "chelsea.jpg"),
                    data={"k": "3", "return_query": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["id"] == "chelsea.jpg"
    assert body["results"][0]["score"] > 0.99 and len(body["results"]) == 3
    assert body["model"].startswith("effnet-lite0") and isinstance(body["generation"], int)
    assert "path" not in (body["results"][0]["metadata"] or {})
    # the same answer as the library
    s = PlainSearcher.open(server.gallery)
    _, res, _ = s.search_paths([photos / "chelsea.jpg"], 3)
    assert [i for i, _ in res.row(0)] == [h["id"] for h in body["results"]]
    np.testing.assert_allclose([sc for _, sc in res.row(0)],
                               [h["score"] for h in body["results"]], atol=1e-4)
    s.gallery.close()
    # base64, embedding (+ model) and item id give the same ranking
    b64 = base64.b64encode((photos / "chelsea.jpg").read_bytes()).decode()
    r2 = client.post("/v1/search", json={"image_base64": "data:image/jpeg;base64," + b64,
                                         "k": 3}).json()
    q = body["query"][body["model"]]
    r3 = client.post("/v1/search", json={"embedding": q, "model": body["model"], "k": 3}).json()
    r4 = client.post("/v1/search", json={"id": "chelsea.jpg", "k": 3}).json()
    for other in (r2, r3, r4):
        assert [h["id"] for h in other["results"]] == [h["id"] for h in body["results"]]


def test_offset_pages_through_the_ranking(client):
    full = client.post("/v1/search", json={"id": "coffee.jpg", "k": 5}).json()["results"]
    page = client.post("/v1/search", json={"id": "coffee.jpg", "k": 2, "offset": 2}).json()
    assert [h["id"] for h in page["results"]] == [h["id"] for h in full[2:4]]
    assert len(full) == 5  # k larger than the gallery is clamped, never padded


def test_batch_answers_each_query_and_reports_bad_ones_inline(client, photos):
    b64 = base64.b64encode((photos / "astronaut.jpg").read_bytes()).decode()
    r = client.post("/v1/search/batch", json={"k": 2, "queries": [
        {"image_base64": b64}, {"id": "retina.jpg"}, {"image_base64": "@@not base64@@"},
        {"id": "no-such-item"}]})
    assert r.status_code == 200, r.text
    out = r.json()["responses"]
    assert out[0]["results"][0]["id"] == "astronaut.jpg"
    assert out[1]["results"][0]["id"] == "retina.jpg"
    assert out[0]["generation"] == out[1]["generation"]  # one search
    assert out[2]["error"]["status"] == 400 and "base64" in out[2]["error"]["message"]
    assert out[3]["error"]["status"] == 404
    files = [("images", ("a.jpg", (photos / "coffee.jpg").read_bytes(), "image/jpeg")),
             ("images", ("b.jpg", (photos / "chelsea.jpg").read_bytes(), "image/jpeg"))]
    r = client.post("/v1/search/batch", files=files, data={"k": "1"})
    assert [x["results"][0]["id"] for x in r.json()["responses"]] == ["coffee.jpg",
                                                                     "chelsea.jpg"]


def test_add_get_thumbnail_delete_an_item(client, photos):
    meta = {"title": "a rocket", "tags": ["space"]}
    r = client.post("/v1/items", files=_upload(photos, "rocket.jpg"),
                    data={"id": "uploads/rocket", "metadata": json.dumps(meta)}, headers=AUTH)
    assert r.status_code == 201, r.text
    rep = r.json()
    assert rep["spaces"] and not rep["replaced"]
    # searchable at once, with its metadata
    found = client.post("/v1/search", files=_upload(photos, "rocket.jpg"), data={"k": 1}).json()
    assert found["results"][0]["id"] == "uploads/rocket"
    assert found["results"][0]["metadata"]["title"] == "a rocket"
    assert found["generation"] >= max(rep["generation"].values())
    item = client.get("/v1/items/uploads/rocket").json()
    assert item["has_image"] and item["metadata"]["tags"] == ["space"]
    assert item["content"].startswith("sha256:")
    th = client.get("/v1/items/uploads/rocket/thumbnail", params={"size": 128})
    assert th.status_code == 200 and th.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(th.content)).size) <= 128
    again = client.get("/v1/items/uploads/rocket/thumbnail", params={"size": 128},
                       headers={"If-None-Match": th.headers["etag"]})
    assert again.status_code == 304
    # the same id again is a conflict unless replace=true
    r = client.post("/v1/items", files=_upload(photos, "rocket.jpg"),
                    data={"id": "uploads/rocket"}, headers=AUTH)
    assert r.status_code == 409 and "replace" in r.json()["message"]
    r = client.post("/v1/items", files=_upload(photos, "rocket.jpg"),
                    data={"id": "uploads/rocket", "replace": "true"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["replaced"]
    # delete: gone from items and from search
    assert client.delete("/v1/items/uploads/rocket", headers=AUTH).status_code == 200
    assert client.get("/v1/items/uploads/rocket").status_code == 404
    after = client.post("/v1/search", files=_upload(photos, "rocket.jpg"), data={"k": 10})
    assert "uploads/rocket" not in [h["id"] for h in after.json()["results"]]


def test_info_health_metrics_and_docs(client):
    info = client.get("/v1/info").json()
    assert info["items"] == 5 and info["spaces"][0]["count"] == 5 and info["upgrade"] is None
    assert info["auth"] == {"writes": True, "reads": False}
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/search", json={"id": "coffee.jpg", "k": 1})
    m = client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'galleria_requests_total{endpoint="/v1/search",method="POST",status="200"}' in text
    assert 'galleria_request_duration_seconds_bucket{endpoint="/v1/search",le="+Inf"}' in text
    assert "galleria_gallery_items 5" in text and "galleria_upgrade_fraction 1" in text
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/search/batch", "/v1/items", "/v1/upgrade",
            "/v1/info"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/search"]["post"]["requestBody"][
        "content"]
    assert client.get("/docs").status_code == 200
    ui = client.get("/")
    js = client.get("/static/app.js")
    assert ui.status_code == 200 and js.status_code == 200 and "galleria" in ui.text
    for text in (ui.text, js.text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # works offline: no CDN


# ------------------------------------------------------------------ bad input
def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (a decompression bomb: the header is all PIL reads)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _corpus(photos, dim: int, model: str) -> list[tuple[str, dict, int]]:
    jpg = (photos / "coffee.jpg").read_bytes()
    unit = np.zeros(dim)
    unit[0] = 1.0
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")

    def img(data: bytes, name: str = "x.jpg") -> dict:
        return {"files": {"image": (name, data, "image/jpeg")}}

    def js(obj: object) -> dict:
        return {"json": obj}

    s = "/v1/search"
    return [
        ("corrupt image", {"url": s, **img(jpg[: len(jpg) // 3])}, 422),
        ("garbage bytes", {"url": s, **img(bytes(range(256)) * 40)}, 422),
        ("non-image (text)", {"url": s, **img(b"hello, I am not an image\n" * 10, "a.txt")},
         422),
        ("empty file", {"url": s, **img(b"")}, 422),
        ("image too small", {"url": s, **img(buf.getvalue(), "t.png")}, 422),
        ("decompression bomb", {"url": s, **img(_png_header_only(100_000, 100_000),
                                                "bomb.png")}, 413),
        ("upload over the size limit", {"url": s, **img(b"\xff\xd8" + b"0" * (2 << 20))}, 413),
        ("bad base64", {"url": s, **js({"image_base64": "not*base64!"})}, 400),
        ("base64 of a non-image", {"url": s, **js({"image_base64": base64.b64encode(
            b"plain text").decode()})}, 422),
        ("bad JSON", {"url": s, "content": b'{"k": 3,', "headers": {
            "content-type": "application/json"}}, 400),
        ("JSON array body", {"url": s, **js([1, 2])}, 400),
        ("empty body", {"url": s, "content": b"", "headers": {
            "content-type": "application/json"}}, 400),
        ("no query", {"url": s, **js({"k": 3})}, 400),
        ("two queries", {"url": s, **js({"id": "coffee.jpg", "image_base64": "AAAA"})}, 400),
        ("unsupported content type", {"url": s, "content": b"id=x", "headers": {
            "content-type": "text/plain"}}, 415),
        ("wrong embedding dimension", {"url": s, **js({"embedding": [1.0, 0.0, 0.0],
                                                       "model": model})}, 422),
        ("embedding of another model", {"url": s, **js({"embedding": unit.tolist(),
                                                        "model": "effnet-lite2@0000"})}, 422),
        ("embedding without its model", {"url": s, **js({"embedding": unit.tolist()})}, 400),
        ("unnormalised embedding", {"url": s, **js({"embedding": (unit * 1000).tolist(),
                                                    "model": model})}, 422),
        ("zero embedding", {"url": s, **js({"embedding": [0.0] * dim, "model": model})}, 422),
        ("NaN in the embedding", {"url": s, "content": json.dumps(
            {"embedding": [float("nan")] + [0.0] * (dim - 1), "model": model}).encode(),
            "headers": {"content-type": "application/json"}}, 422),
        ("embedding of strings", {"url": s, **js({"embedding": ["a"] * dim,
                                                  "model": model})}, 422),
        ("unknown item id", {"url": s, **js({"id": "no/such/item.jpg"})}, 404),
        ("id that is not a string", {"url": s, **js({"id": 12})}, 400),
        ("id with an unpaired surrogate", {"url": s, "content": b'{"id": "caf\\udce9.jpg"}',
                                           "headers": {"content-type": "application/json"}},
         400),
        ("k = 0", {"url": s, **js({"id": "coffee.jpg", "k": 0})}, 400),
        ("k = -1", {"url": s, **js({"id": "coffee.jpg", "k": -1})}, 400),
        ("k = 1e9", {"url": s, **js({"id": "coffee.jpg", "k": 10**9})}, 400),
        ("k = 2.5", {"url": s, **js({"id": "coffee.jpg", "k": 2.5})}, 400),
        ("k = true", {"url": s, **js({"id": "coffee.jpg", "k": True})}, 400),
        ("k = 'ten'", {"url": s, "files": {"image": ("c.jpg", jpg, "image/jpeg")},
                       "data": {"k": "ten"}}, 400),
        ("offset = -1", {"url": s, **js({"id": "coffee.jpg", "offset": -1})}, 400),
        ("a pipeline the gallery lacks", {"url": s, **js({"id": "coffee.jpg",
                                                          "pipeline": "local"})}, 422),
        ("image field that is not a file", {"url": s, "files": {"other": ("o", b"x")},
                                            "data": {"image": "text"}}, 400),
        ("batch that is not a list", {"url": s + "/batch", **js({"queries": "x"})}, 400),
        ("batch too large", {"url": s + "/batch", **js({"queries": [{"id": "coffee.jpg"}]
                                                        * 65})}, 400),
        ("item without an id", {"url": "/v1/items", "files": {"image": (
            "c.jpg", jpg, "image/jpeg")}, "headers": AUTH}, 400),
        ("item with metadata that is not JSON", {"url": "/v1/items", "files": {"image": (
            "c.jpg", jpg, "image/jpeg")}, "data": {"id": "x", "metadata": "{oops"},
            "headers": AUTH}, 400),
        ("item with metadata that is a list", {"url": "/v1/items", "json": {
            "id": "x", "image_base64": base64.b64encode(jpg).decode(), "metadata": [1]},
            "headers": AUTH}, 400),
        ("item with a corrupt image", {"url": "/v1/items", "files": {"image": (
            "c.jpg", jpg[:500], "image/jpeg")}, "data": {"id": "x"}, "headers": AUTH}, 422),
        ("upgrade with an unknown action", {"url": "/v1/upgrade", "json": {"action": "fly"},
                                            "headers": AUTH}, 400),
        ("upgrade to an unknown model", {"url": "/v1/upgrade", "json": {
            "action": "start", "new_model": "no-such-model"}, "headers": AUTH}, 422),
        ("finish without an upgrade", {"url": "/v1/upgrade", "json": {"action": "finish"},
                                       "headers": AUTH}, 409),
    ]


def test_bad_input_corpus_each_a_4xx_json_message_and_the_next_request_answered(
        client, photos, server):
    info = client.get("/v1/info").json()
    sp = info["spaces"][0]
    failures = []
    for name, req, status in _corpus(photos, sp["dim"], sp["space"]):
        kw = {k: v for k, v in req.items() if k != "url"}
        r = client.post(req["url"], **kw)
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code != status or not body.get("message") or body.get("status") != status:
            failures.append((name, r.status_code, r.text[:200]))
        ok = client.post("/v1/search", json={"id": "coffee.jpg", "k": 1})
        assert ok.status_code == 200 and ok.json()["results"][0]["id"] == "coffee.jpg", name
    assert not failures, failures
    for path, method, status in (("/v1/nope", "GET", 404), ("/v1/search", "GET", 405),
                                 ("/v1/items/no-such", "GET", 404),
                                 ("/v1/items/no-such/thumbnail", "GET", 404),
                                 ("/v1/items/coffee.jpg/thumbnail?size=13", "GET", 400),
                                 ("/v1/items/no-such", "DELETE", 404)):
        r = client.request(method, path, headers=AUTH)
        assert r.status_code == status and r.json()["message"], (path, r.text)
    assert server.proc.poll() is None  # still serving
    assert client.get("/v1/info").json()["items"] == 5  # nothing bad was stored


# ------------------------------------------------------------------ auth
def test_writes_need_the_token_reads_stay_open(client, photos):
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token-xyz"}, 403),
                            ({"Authorization": "Basic abc"}, 401)):
        r = client.post("/v1/items", files=_upload(photos, "rocket.jpg"), data={"id": "r"},
                        headers=headers)
        assert r.status_code == status and r.json()["error"] in ("unauthorized", "forbidden")
        assert client.delete("/v1/items/coffee.jpg", headers=headers).status_code == status
        r = client.post("/v1/upgrade", json={"action": "run"}, headers=headers)
        assert r.status_code == status
    assert client.post("/v1/search", json={"id": "coffee.jpg"}).status_code == 200
    assert client.get("/v1/info").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/v1/items/coffee.jpg").status_code == 200

"""Service behaviour on small galleries of the tiny test extractors (uvicorn in a thread):
reads behind the token, the bounded queue (503 + Retry-After, then served again),
and the upgrade driven over HTTP (start, background run, cancel, resume, finish
switching search without a restart)."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import _tiny
from _service import thread_server

pytest.importorskip("fastapi")

from galleria.extract.job import index_images
from galleria.service.engine import ServiceConfig
from galleria.store.gallery import Gallery

TOKEN = "tok-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _images(folder, n: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(
            folder / f"{i:03d}.png")
    return folder


@pytest.fixture()
def tiny_gallery(tmp_path):
    imgs = _images(tmp_path / "img", 40)
    index_images(imgs, tmp_path / "g", extractor=_tiny.tiny(1), batch_size=8)
    return tmp_path / "g", imgs


def _png(imgs, name="003.png"):
    return {"image": (name, (imgs / name).read_bytes(), "image/png")}


def test_token_reads_protects_searches_and_reads(tiny_gallery):
    g, imgs = tiny_gallery
    with thread_server(ServiceConfig(gallery=g, token=TOKEN, token_reads=True)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/v1/info", "/v1/upgrade", "/metrics", "/v1/items/003.png"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer nope-nope-nope"}
                         ).status_code == 403
            assert c.get(path, headers=AUTH).status_code == 200
        assert c.post("/v1/search", files=_png(imgs)).status_code == 401
        r = c.post("/v1/search", files=_png(imgs), headers=AUTH)
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "003.png"
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200  # the UI page itself; it sends the token


def test_full_queue_answers_503_with_retry_after_then_serves(tiny_gallery, tmp_path):
    _, imgs = tiny_gallery
    slow = tmp_path / "slow"
    index_images(imgs, slow, extractor=_tiny.tiny(3), batch_size=8)
    with Gallery.open(slow) as sg:  # queries take 0.3 s: the served model sleeps
        sp = sg.primary_space
        sg.update_space_info(sp, config={**sg.space_info(sp).info["config"], "delay": 0.3})
    cfg = ServiceConfig(gallery=slow, workers=1, queue=1)
    with thread_server(cfg) as url, httpx.Client(base_url=url, timeout=60) as c:
        with cf.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(c.post, "/v1/search", files=_png(imgs)) for _ in range(8)]
            res = [f.result() for f in futs]
        codes = sorted(r.status_code for r in res)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in res if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["message"]
        assert c.post("/v1/search", files=_png(imgs)).status_code == 200
        assert 'galleria_pool_rejected_total{pool="read"}' in c.get("/metrics").text


def test_upgrade_over_http_cancel_resume_finish_without_restart(tiny_gallery):
    g, imgs = tiny_gallery
    with thread_server(ServiceConfig(gallery=g, token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        before = c.post("/v1/search", files=_png(imgs), data={"k": 5}).json()
        old = before["model"]
        r = c.post("/v1/upgrade", headers=AUTH, json={
            "action": "start", "new_model": "tiny-test",
            "model_options": {"seed": 2, "dim": 16, "delay": 0.3}})
        assert r.status_code == 200, r.text
        new = r.json()["started"]["new_space"]
        again = c.post("/v1/upgrade", headers=AUTH, json={"action": "start",
                                                           "new_model": "tiny-test"})
        assert again.status_code == 409  # one upgrade at a time
        assert c.post("/v1/upgrade", headers=AUTH, json={
            "action": "run", "batch_size": 2, "commit_every": 2}).status_code == 200
        assert c.post("/v1/upgrade", headers=AUTH, json={"action": "run"}).status_code == 409
        deadline = time.monotonic() + 30
        while c.get("/v1/upgrade").json()["done"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        mid = c.post("/v1/search", files=_png(imgs), data={"k": 5}).json()
        assert mid["merge"]["old_space"] == old and mid["merge"]["new_space"] == new
        assert set(mid["generation"]) == {old, new} and mid["results"][0]["id"] == "003.png"
        r = c.post("/v1/upgrade", headers=AUTH, json={"action": "cancel"})
        assert r.status_code == 200 and not r.json()["running"]
        assert r.json()["report"]["interrupted"]
        st = c.get("/v1/upgrade").json()
        assert st["active"] and 0 < st["fraction"] < 1 and st["consistent"]
        fin = c.post("/v1/upgrade", headers=AUTH, json={"action": "finish"})
        assert fin.status_code == 409 and "100 %" in fin.json()["message"]
        # resume to 100 %, then finish: search switches to the new model, same process
        c.post("/v1/upgrade", headers=AUTH, json={"action": "run", "batch_size": 8})
        deadline = time.monotonic() + 60
        while c.get("/v1/upgrade").json()["server_run"]["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = c.get("/v1/upgrade").json()
        assert st["fraction"] == 1.0 and st["items_per_s"] and st["eta_s"] == 0.0
        fin = c.post("/v1/upgrade", headers=AUTH, json={"action": "finish"})
        assert fin.status_code == 200, fin.text
        after = c.post("/v1/search", files=_png(imgs), data={"k": 5}).json()
        assert after["model"] == new and "merge" not in after
        assert after["results"][0]["id"] == "003.png"
        info = c.get("/v1/info").json()
        assert info["primary_space"] == new and info["upgrade"] is None
        assert [s["space"] for s in info["spaces"]] == [new] and info["items"] == 40
        assert not c.get("/v1/upgrade").json()["active"]

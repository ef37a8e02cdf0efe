"""The service's faults of issue 19, each a regression test (all fail on the main of
2026-12-04): upload paths relative to the server's working directory (case 2),
client metadata trusted (case 3), 500s dropping the keep-alive connection and JSON
nested 100,000 deep answering 500 (case 5), ids with a newline, server paths in
error bodies, limit messages quoting PIL's limit and "21.0 MiB" (case 6).

Servers run on 127.0.0.1 with the tiny test model (tests/_tiny.py): in a thread for
the in-process checks, as `galleria serve` in another working directory for case 2.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import _faults
import _tiny
from _service import free_port, thread_server, wait_ready
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery

pytest.importorskip("fastapi")


def _png(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _header_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc-faults")
    imgs = root / "imgs"
    imgs.mkdir()
    for n in range(8):
        (imgs / f"{n}.png").write_bytes(_png(n))
    g = root / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    return g


@pytest.fixture()
def served(gallery, tmp_path):
    from galleria.service.engine import ServiceConfig

    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    cfg = ServiceConfig(gallery=g, workers=1, max_upload_bytes=2**20, max_pixels=1_000_000,
                        refresh_interval_s=0.05)
    with thread_server(cfg) as url:
        yield url, g


def _raw(url: str, requests: list[bytes]) -> list[tuple[int, dict[str, str], bytes] | None]:
    """Send ``requests`` one after the other on ONE connection; ``None`` for a request
    the server answered with a closed connection."""
    host, port = url.removeprefix("http://").split(":")
    out: list[tuple[int, dict[str, str], bytes] | None] = []
    with socket.create_connection((host, int(port)), timeout=30) as s:
        f = s.makefile("rb")
        for req in requests:
            try:
                s.sendall(req)
                line = f.readline()
            except OSError:
                line = b""
            if not line:
                out.append(None)
                continue
            status = int(line.split()[1])
            headers: dict[str, str] = {}
            while (h := f.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            body = f.read(int(headers.get("content-length", "0")))
            out.append((status, headers, body))
    return out


def _req(method: str, path: str, body: bytes = b"", ctype: str = "application/json") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {ctype}\r\n" \
           f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


HEALTH = _req("GET", "/healthz")


# ---------------------------------------------------------------- case 5
def test_an_unexpected_error_is_a_json_500_on_a_kept_connection(served, monkeypatch):
    from galleria.service import items as item_ops

    def broken(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(item_ops, "thumbnail", broken)
    url, _ = served
    first, second = _raw(url, [_req("GET", "/v1/items/0.png/thumbnail"), HEALTH])
    assert first is not None and first[0] == 500
    body = json.loads(first[2])
    assert body["error"] == "internal" and "RuntimeError" in body["message"]
    assert "Traceback" not in first[2].decode() and first[1].get("connection") != "close"
    assert second is not None and second[0] == 200, "the connection was dropped after the 500"


def test_json_nested_100000_deep_is_a_400_on_a_kept_connection(served):
    url, _ = served
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = b'{"id": "0.png", "k": 3, "x": ' + deep + b"}"
    item = json.dumps({"id": "m", "image_base64": base64.b64encode(_png(9)).decode(),
                       "metadata": {"a": [[[[[[[[[[1]]]]]]]]]]}}).encode()
    answers = _raw(url, [_req("POST", "/v1/search", nested),
                         _req("POST", "/v1/search", b'{"id": "0.png", "k": NaN}'),
                         _req("POST", "/v1/items", item),
                         HEALTH])
    for a in answers[:3]:
        assert a is not None and a[0] == 400, a
        assert json.loads(a[2])["error"] in ("bad_json", "bad_option", "bad_metadata")
    assert "nested deeper than 32" in json.loads(answers[0][2])["message"]
    assert answers[3] is not None and answers[3][0] == 200


# ---------------------------------------------------------------- case 3
BAD_META = [{"bbox": ["a", "b", "c", "d"]}, {"bbox": [1, 2, 3]}, {"bbox": [9, 0, 1, 5]},
            {"priority": "high"}, {"path": "/etc/passwd"}, {"uploaded": 1},
            {"bad\nkey": 1}, {"deep": [[[[[[[[[1]]]]]]]]]}]


@pytest.mark.parametrize("meta", BAD_META, ids=lambda m: next(iter(m)).replace("\n", "\\n"))
def test_metadata_is_validated_at_the_boundary(served, meta):
    url, g = served
    r = httpx.post(url + "/v1/items", files={"image": ("x.png", _png(40), "image/png")},
                   data={"id": "m1", "metadata": json.dumps(meta)}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_metadata"
    with Gallery.open(g, readonly=True) as gal:
        assert gal.item("m1") is None  # nothing was written


def test_nan_bbox_text_and_a_good_bbox(served):
    url, _ = served
    r = httpx.post(url + "/v1/items", files={"image": ("x.png", _png(41), "image/png")},
                   data={"id": "m2", "metadata": '{"bbox": [NaN, 0, 5, 5]}'}, timeout=60)
    assert r.status_code == 400 and r.json()["error"] == "bad_metadata", r.text
    assert "NaN" in r.json()["message"]
    r = httpx.post(url + "/v1/items", files={"image": ("x.png", _png(42), "image/png")},
                   data={"id": "m3", "metadata": '{"bbox": [2, 3, 14, 17], "priority": 2}'},
                   timeout=60)
    assert r.status_code == 201, r.text
    t = httpx.get(url + "/v1/items/m3/thumbnail?size=64", timeout=60)
    assert t.status_code == 200 and Image.open(io.BytesIO(t.content)).size == (12, 14)


def test_a_bad_stored_record_is_reported_not_a_500(served):
    """A record written before the API checked metadata (or by another writer)."""
    url, g = served
    with Gallery.open(g) as gal:
        sp = gal.primary_space
        keys = gal.keys_of(["1.png", "2.png"])
        gal.add(["1.png", "2.png"], gal.get_vectors(keys, space=sp), space=sp, replace=True,
                meta=[{"bbox": ["a", "b", "c", "d"]}, {"bbox": [float("nan"), 0, 5, 5]}])
    for i in ("1.png", "2.png"):
        r = httpx.get(f"{url}/v1/items/{i}/thumbnail", timeout=60)
        assert r.status_code == 422 and r.json()["error"] == "bad_record", r.text
        assert "crop box" in r.json()["message"]


# ---------------------------------------------------------------- case 6
def test_ids_with_a_control_character_one_rule_everywhere(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/items", files={"image": ("x.png", _png(43), "image/png")},
                   data={"id": "a\nb"})
        assert r.status_code == 400 and r.json()["error"] == "bad_id"
        for path in ("/v1/items/0.png%0A", "/v1/items/a%0Ab", "/v1/items/0.png%0A/thumbnail"):
            assert c.get(path).status_code == 400, path
            assert c.get(path).json()["error"] == "bad_id"
        assert c.delete("/v1/items/0.png%0A").status_code == 400
        assert c.get("/v1/items/0.png").status_code == 200  # not deleted through 0.png\n
        r = c.post("/v1/search", json={"id": "0.png\n", "k": 2})
        assert r.status_code == 400 and r.json()["error"] == "bad_id"


def test_error_bodies_name_no_server_path(served):
    url, g = served
    with Gallery.open(g, readonly=True) as gal:
        img = Path(gal.meta(["3.png"])[0]["path"])
    moved = img.with_suffix(".gone")
    img.rename(moved)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.get("/v1/items/3.png/thumbnail")
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            texts = [r.text]
            for seg in (g / "segments").rglob("*.npy"):  # no stored vector to search with
                seg.rename(seg.with_suffix(".aside"))
            r = c.post("/v1/search", json={"id": "3.png", "k": 3})  # nor an image to embed
            assert r.status_code >= 400, r.text
            texts.append(r.text)
            r = c.post("/v1/search/batch", json={"queries": [{"id": "3.png"}, {"x": 1}]})
            texts.append(r.text)
    finally:
        moved.rename(img)
    for t in texts:
        for p in (str(g), str(g.resolve()), os.getcwd(), str(img.parent)):
            assert p not in t, (p, t)
        assert "Traceback" not in t


def test_limit_messages_quote_the_configured_limits(served):
    url, _ = served
    big = _req("POST", "/v1/items", b"", ctype="multipart/form-data; boundary=x")
    big = big.replace(b"Content-Length: 0", f"Content-Length: {3 * 2**20}".encode())
    (a,) = _raw(url, [big])
    assert a is not None and a[0] == 413
    msg = json.loads(a[2])["message"]
    assert "1 MiB" in msg and "2.0 MiB" not in msg and "--max-upload-mb" in msg
    side = math.isqrt(2 * Image.MAX_IMAGE_PIXELS) + 100  # past PIL's own hard limit
    for w, h in ((side, side), (2000, 2000)):
        r = httpx.post(url + "/v1/items", timeout=60,
                       files={"image": ("big.png", _header_png(w, h), "image/png")},
                       data={"id": "big"})
        assert r.status_code == 413 and r.json()["error"] == "image_too_large", r.text
        text = r.json()["message"]
        assert "> 1000000" in text and str(2 * Image.MAX_IMAGE_PIXELS) not in text, text


# ---------------------------------------------------------------- case 2
def _serve_from(cwd: Path, gallery_arg: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        _faults.command(0, "", ["serve", gallery_arg, "--port", str(port), "--workers", "1",
                                "--log-level", "warning"]),
        cwd=cwd, env=_faults.env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_uploads_are_found_from_any_working_directory(gallery, tmp_path):
    """The issue's steps: upload through a server started beside the gallery
    (`galleria serve g3.gallery`), then work on the gallery from another directory."""
    from galleria.upgrade.job import run_upgrade, start_upgrade

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(gallery, home / "g3.gallery")
    proc, url = _serve_from(home, "g3.gallery")
    try:
        r = httpx.post(url + "/v1/items", files={"image": ("up.png", _png(50), "image/png")},
                       data={"id": "up1"}, timeout=60)
        assert r.status_code == 201, r.text
    finally:
        _stop(proc)
    g = home / "g3.gallery"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = os.getcwd()
    os.chdir(elsewhere)
    try:
        proc, url = _serve_from(elsewhere, str(g))
        try:
            info = httpx.get(url + "/v1/items/up1", timeout=60).json()
            assert info["has_image"] is True
            t = httpx.get(url + "/v1/items/up1/thumbnail?size=64", timeout=60)
            assert t.status_code == 200, t.text
        finally:
            _stop(proc)
        with Gallery.open(g) as gal:
            assert gal.check().ok
        start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2))
        rep = run_upgrade(g, extractor=_tiny.tiny(2))
        assert rep.moved == 9 and not rep.failed, rep.to_dict()
    finally:
        os.chdir(old)


def test_legacy_cwd_relative_upload_paths_still_resolve(gallery, tmp_path):
    """Galleries written before the fix recorded `g3.gallery/uploads/<hh>/<sha>.png`."""
    g = tmp_path / "g3.gallery"
    shutil.copytree(gallery, g)
    data = _png(60)
    from galleria.service.items import save_upload

    path = save_upload(g, data)
    legacy = f"g3.gallery/{path.relative_to(g).as_posix()}"
    with Gallery.open(g) as gal:
        sp = gal.primary_space
        vec = _tiny.tiny(1).embed_images([Image.open(io.BytesIO(data)).convert("RGB")])
        gal.add(["legacy"], vec, space=sp, meta=[{"path": legacy}])
        assert gal.meta(["legacy"])[0]["path"] == str(path.resolve())
        assert gal.check().ok
        path.unlink()  # an image that cannot be found is reported by check
        rep = gal.check()
        (p,) = [p for p in rep.problems if p.what == "image"]
        assert p.items == ["legacy"] and not rep.ok

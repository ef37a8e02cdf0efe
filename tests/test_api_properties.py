"""Property-based tests of the HTTP API (issue 19): schemathesis over the service's own
OpenAPI document (every route, schema-conforming and schema-violating requests) and
hypothesis for item ids, metadata and manifests. The property: no 5xx, and every 4xx
a JSON ``{error, message, status}`` naming no server path and holding no traceback.

Budgets are fixed (examples per route and mode, seeds derandomized), so the default
suite runs the same requests every time; ``GALLERIA_API_EXAMPLES`` raises the budget
for a longer hunt. The server is `create_app` in a thread on 127.0.0.1 over a small
tiny-model gallery (tests/_tiny.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import string
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

import _tiny
from _service import thread_server
from galleria.extract.job import index_images
from galleria.ids import id_problem

hypothesis = pytest.importorskip("hypothesis")
schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("GALLERIA_API_EXAMPLES", "12"))
"""Examples per route and generation mode (positive / negative) in the default suite."""
BUDGET = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from galleria.service.engine import ServiceConfig

    root = tmp_path_factory.mktemp("api-props")
    imgs = root / "imgs"
    imgs.mkdir()
    for n in range(6):
        (imgs / f"{n}.png").write_bytes(_png(n))
    g = root / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    cfg = ServiceConfig(gallery=g, workers=1, queue=64, max_upload_bytes=2**20,
                        refresh_interval_s=0.05)
    with thread_server(cfg) as url:
        yield url, g, imgs


def _server_paths(g: Path, imgs: Path) -> list[str]:
    return [str(g), str(g.resolve()), str(imgs), str(imgs.resolve()), os.getcwd()]


def assert_sound(status: int, ctype: str, text: str, paths: list[str], what: str) -> None:
    """The property every answer must have (see the module docstring)."""
    assert status < 500, (what, status, text[:500])
    if status >= 400:
        assert ctype.split(";")[0].strip() == "application/json", (what, status, ctype)
        body = json.loads(text)
        assert set(body) == {"error", "message", "status"} and body["status"] == status, \
            (what, body)
        assert isinstance(body["message"], str) and body["message"], (what, body)
    assert "Traceback" not in text, (what, text[:500])
    if status >= 400 or '"error"' in text:
        for p in paths:
            assert p not in text, (what, p, text[:500])


# ---------------------------------------------------------------- schemathesis
def _fuzz(op, mode, url: str, paths: list[str], seen: dict[str, int],
          statuses: dict[int, int]) -> None:
    """EXAMPLES requests of one operation in one generation mode."""
    label = f"{op.method.upper()} {op.path} ({mode.value})"

    @BUDGET
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        resp = case.call(base_url=url, timeout=60)
        seen[label] = seen.get(label, 0) + 1
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        ctype = resp.headers.get("content-type", "")
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert_sound(resp.status_code, ctype, resp.text, paths,
                     f"{label}: {case.as_curl_command()[:300]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # an operation without parameters or body has no schema-violating request
        assert mode.value == "negative", label


def test_every_route_of_the_openapi_schema(server):
    """schemathesis: every operation of /openapi.json, schema-conforming (positive) and
    schema-violating (negative) requests, EXAMPLES of each."""
    from schemathesis import GenerationMode

    url, g, imgs = server
    paths = _server_paths(g, imgs)
    schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json").json())
    ops = [r.ok() for r in schema.get_all_operations()]
    seen: dict[str, int] = {}
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, url, paths, seen, statuses)
    took = time.perf_counter() - t0
    routes = {label.split(" (")[0] for label in seen}
    print(f"\nschemathesis: {len(routes)} routes, {sum(seen.values())} requests "
          f"({EXAMPLES} examples per route and mode), statuses {dict(sorted(statuses.items()))}"
          f", 5xx: {sum(n for s, n in statuses.items() if s >= 500)}, {took:.1f} s")
    assert len(routes) == len(ops) >= 12
    assert not any(s >= 500 for s in statuses)
    assert httpx.get(url + "/readyz").status_code == 200  # still serving


# ---------------------------------------------------------------- ids
ID_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0,
                  max_size=40) | st.sampled_from(["a\nb", "x\x00", "\x1b[31m", "tab\t",
                                                  "é/ü.jpg", "a/../b", "%2F", " ", "a" * 5000])


@BUDGET
@given(item_id=ID_TEXT)
def test_ids_one_rule_for_writes_and_reads(server, item_id):
    url, g, imgs = server
    paths = _server_paths(g, imgs)
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/items", files={"image": ("x.png", _png(7), "image/png")},
                   data={"id": item_id, "replace": "true"})
        assert_sound(r.status_code, r.headers.get("content-type", ""), r.text, paths, item_id)
        valid = id_problem(item_id) is None
        if not valid:
            assert r.status_code in (400, 413), (item_id, r.text)
            return
        assert r.status_code in (200, 201), (item_id, r.text)
        enc = quote(item_id, safe="")
        got = c.get(f"/v1/items/{enc}")
        assert got.status_code == 200 and got.json()["id"] == item_id, (item_id, got.text)
        hit = c.post("/v1/search", json={"id": item_id, "k": 1})
        assert hit.status_code == 200 and hit.json()["results"][0]["id"] == item_id
        gone = c.delete(f"/v1/items/{enc}")
        assert gone.status_code == 200, (item_id, gone.text)
        assert c.get(f"/v1/items/{enc}").status_code == 404


# ---------------------------------------------------------------- metadata
JSON_SCALARS = st.none() | st.booleans() | st.integers(-10**12, 10**12) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
BOXES = st.lists(st.floats(allow_nan=True) | st.integers(-50, 80) | st.text(max_size=3),
                 min_size=0, max_size=5)
METADATA = st.dictionaries(
    st.sampled_from(["bbox", "priority", "group", "path", "uploaded", "x\ny", "tags"])
    | st.text(max_size=10),
    JSON_VALUES | BOXES, max_size=5)


@BUDGET
@given(meta=METADATA)
def test_metadata_is_stored_only_when_every_later_reader_can_use_it(server, meta):
    url, g, imgs = server
    paths = _server_paths(g, imgs)
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/items", files={"image": ("m.png", _png(8), "image/png")},
                   data={"id": "meta-item", "replace": "true",
                         "metadata": json.dumps(meta)})
        assert_sound(r.status_code, r.headers.get("content-type", ""), r.text, paths,
                     repr(meta))
        if r.status_code >= 400:
            assert r.json()["error"] in ("bad_metadata", "bad_json"), r.text
            return
        assert r.status_code in (200, 201), r.text
        t = c.get("/v1/items/meta-item/thumbnail?size=64")  # reads the stored crop box
        assert t.status_code in (200, 404), t.text  # 404: a box outside the image
        assert_sound(t.status_code, t.headers.get("content-type", ""), t.text, paths,
                     repr(meta))


# ---------------------------------------------------------------- manifests
CELL = st.text(string.printable + "é\x00\x1b\u2028", max_size=12) | \
    st.sampled_from(["nan", "inf", "-1", "3.5", "1e400", ""])


@settings(max_examples=4 * EXAMPLES, derandomize=True, deadline=None, database=None)
@given(rows=st.lists(st.tuples(CELL, CELL, CELL, CELL, CELL, CELL), min_size=1, max_size=5))
def test_manifests_are_read_or_refused_clearly(rows, tmp_path_factory):
    import csv

    from galleria.errors import InputError
    from galleria.images.decode import parse_bbox
    from galleria.images.sources import read_manifest

    folder = tmp_path_factory.mktemp("manifest")
    m = folder / "m.csv"
    with open(m, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "id", "x1", "y1", "x2", "y2"])
        w.writerows(rows)
    try:
        items = read_manifest(m)
    except InputError as exc:
        assert str(exc).startswith(f"manifest {m}")
        return
    for it in items:
        assert id_problem(it.id) is None, it.id
        assert it.bbox is None or parse_bbox(list(it.bbox)) == it.bbox
    shutil.rmtree(folder)

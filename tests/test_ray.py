"""galleria on a simulated 3-node Ray cluster (127.0.0.1, started and stopped here).

- ``index --ray`` == the single-process index (same ids, vectors within 1e-6) for a
  global model (EfficientNet-Lite0 on UKBench) and a local extractor in one run;
  ``upgrade run --ray`` == the single-process backfill;
- sharded search (3 shards, one per node) == single-process exact search, also after
  new commits (shards catch up through the change log) and while a writer commits;
- a worker node killed mid-index: the run finishes on the others (or, with no retry
  left, stops with a ClusterError) and every image is stored exactly once; the driver
  killed (kill -9) mid-index: the re-run embeds exactly the rest;
- clear errors for a missing Ray and an unreachable address.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import _tiny  # registers tiny-test / tiny-local
from _raycluster import ROOT, sim_cluster
from galleria.distributed.ray_embed import RayEmbedder, ray_index_images, ray_run_upgrade
from galleria.distributed.ray_search import ShardedSearcher
from galleria.errors import ClusterError, MissingDependencyError
from galleria.extract.job import index_images
from galleria.images.sources import SourceItem, list_source
from galleria.search.searcher import PlainSearcher
from galleria.store.gallery import Gallery


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    with sim_cluster(3, 1) as sim:
        yield sim
    assert not sim.left, f"Ray processes left after shutdown: {sorted(sim.left)}"


def _by_id(path: Path, space: str | None = None) -> dict[str, np.ndarray]:
    with Gallery.open(path) as g:
        keys, vecs = g.load_vectors(space)
        return dict(zip(g.ids_of(keys), vecs, strict=True))


def _rows_per_id(path: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{path / 'gallery.sqlite'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT i.id, COUNT(*) FROM items i JOIN vectors v "
                                "ON v.key=i.key GROUP BY i.id").fetchall())
    finally:
        con.close()


def _images(root: Path, n: int) -> list[SourceItem]:
    items = [it for it in list_source(root) if it.path.suffix.lower() == ".jpg"]
    return sorted(items, key=lambda it: it.id)[:n]


# ----------------------------------------------------------------- index / upgrade
def test_ray_index_equals_single_process(cluster, require_shared, tmp_path):
    items = _images(require_shared("ukbench56"), 56)
    from galleria.extractors.registry import create_extractor

    ext = create_extractor("effnet-lite0")
    kw = {"extractor": ext, "local_extractor": _tiny.tiny_local(), "batch_size": 8}
    with RayEmbedder(imports=["_tiny"]) as emb:
        emb.warm(ext)
        assert len(set(emb.nodes())) == 3  # one actor per node
        rep = index_images(items, tmp_path / "ray", embedder=emb, **kw)
    one = index_images(items, tmp_path / "one", **kw)
    assert rep.embedded == one.embedded == 56 and rep.spaces == one.spaces
    assert rep.embedded_per_space == one.embedded_per_space
    assert set(one.embedded_per_space.values()) == {56}
    a, b = _by_id(tmp_path / "ray"), _by_id(tmp_path / "one")
    assert sorted(a) == sorted(b) == sorted(it.id for it in items)
    assert max(float(np.abs(a[i] - b[i]).max()) for i in a) <= 1e-6
    local = rep.spaces[1]
    with Gallery.open(tmp_path / "ray") as ga, Gallery.open(tmp_path / "one") as gb:
        ids = sorted(a)
        fa = ga.get_local(ga.keys_of(ids), space=local)
        fb = gb.get_local(gb.keys_of(ids), space=local)
        for x, y in zip(fa, fb, strict=True):
            assert np.array_equal(x.keypoints, y.keypoints)
            assert np.abs(x.descriptors - y.descriptors).max() <= 1e-6
    again = ray_index_images(items, tmp_path / "ray", address=cluster.address,
                             imports=["_tiny"], **kw)  # reuses the connection
    assert again.embedded == 0 and again.already_done == 2 * 56


def test_ray_upgrade_equals_single_process(cluster, require_shared, tmp_path):
    from galleria.upgrade.job import run_upgrade, start_upgrade, upgrade_status

    items = _images(require_shared("smvs_dvd_covers"), 60)
    index_images(items, tmp_path / "a", extractor=_tiny.tiny(1))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for g in ("a", "b"):
        start_upgrade(tmp_path / g, "tiny-test", extractor=_tiny.tiny(2), calib_size=10)
    rep = ray_run_upgrade(tmp_path / "a", address=cluster.address, imports=["_tiny"],
                          batch_size=8, commit_every=16)
    one = run_upgrade(tmp_path / "b", batch_size=8, commit_every=16)
    assert rep.moved == one.moved == 60 and rep.remaining == 0
    st = upgrade_status(tmp_path / "a")
    assert st.consistent and st.done == 60
    new = _tiny.tiny(2).fingerprint
    a, b = _by_id(tmp_path / "a", new), _by_id(tmp_path / "b", new)
    assert sorted(a) == sorted(b) and max(float(np.abs(a[i] - b[i]).max()) for i in a) <= 1e-6


# ----------------------------------------------------------------- sharded search
@pytest.fixture(scope="module")
def smvs_gallery(cluster, require_shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "g"
    items = _images(require_shared("smvs_dvd_covers"), 300)
    index_images(items[:250], out, extractor=_tiny.tiny(3, dim=16))
    return out, items


def _assert_same(res, ref) -> None:
    assert res.ids.shape == ref.ids.shape
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-6)
    same = res.ids == ref.ids
    # an exact tie may be ordered differently (shard order vs row order): same scores
    tied = np.isclose(res.scores, ref.scores, atol=1e-6)
    assert np.all(same | tied)
    assert same.mean() > 0.99


def test_sharded_search_equals_single_process(cluster, smvs_gallery):
    out, items = smvs_gallery
    g = Gallery.open(out)
    s = ShardedSearcher(g, 3)
    try:
        nodes = {i["node"] for i in s.shard_info}
        assert len(nodes) == 3 and sum(i["count"] for i in s.shard_info) == 250
        plain = PlainSearcher.open(g)
        from PIL import Image

        from _contract import assert_conforms

        assert_conforms(s, [Image.open(it.path).convert("RGB") for it in items[240:243]], 250)
        q, good, fails = s.embed_paths([it.path for it in items[240:260]])
        assert len(good) == 20 and not fails
        for k in (1, 10, 300):
            _assert_same(s.search(q, k), plain.search(q, k))
        # new commits: 50 added, 10 removed; the shards follow through the log
        index_images(items, out, extractor=_tiny.tiny(3, dim=16))
        g.remove([it.id for it in items[:10]])
        res = s.search(q, 10)
        assert res.generation == g.generation(s.space)
        _assert_same(res, plain.search(q, 10))
        info = s.refresh()
        assert sum(i["count"] for i in info) == 290 and all(i["loads"] == 1 for i in info)
        # a shard's process dies: Ray restarts it, it reloads its slice, the search is retried
        import ray

        pid = info[0]["pid"]
        ray.kill(s._actors[0], no_restart=False)
        _assert_same(s.search(q, 10), plain.search(q, 10))
        assert s.refresh()[0]["pid"] != pid
        with pytest.raises(ClusterError, match="cannot place 2 shards"):
            ShardedSearcher(g, 2, cpus_per_shard=4, ready_timeout_s=3)
    finally:
        s.close()
        g.close()


def test_sharded_search_while_a_writer_commits(cluster, tmp_path):
    """Two threads search while a writer commits: every result equals brute force over
    the items committed at the generation it reports."""
    rng = np.random.default_rng(7)
    g = Gallery.create(tmp_path / "g")
    space, dim = "synthetic-16", 16

    def unit(n):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    data = {f"s{i}": v for i, v in enumerate(unit(200))}
    g.add(list(data), np.stack(list(data.values())), space=space)
    states = {g.generation(space): dict(data)}
    s = ShardedSearcher(g, 3, with_model=False)
    extra = unit(300)
    stop = threading.Event()

    def writer():
        w = Gallery.open(tmp_path / "g")
        try:
            for b in range(10):
                ids = [f"w{b}-{i}" for i in range(30)]
                vecs = extra[b * 30 : (b + 1) * 30]
                cur = dict(states[max(states)])
                cur.update(zip(ids, vecs, strict=True))
                w.add(ids, vecs, space=space)
                states[w.generation(space)] = dict(cur)  # every commit's state
                if b % 3 == 2:
                    gone = sorted(cur)[:5]
                    for i in gone:
                        cur.pop(i)
                    w.remove(gone)
                    states[w.generation(space)] = dict(cur)
                time.sleep(0.05)
        finally:
            w.close()
            stop.set()

    queries = unit(8)
    checked: list[set[int]] = [set(), set()]
    errors: list[BaseException] = []

    def reader(n: int) -> None:  # two threads share the searcher
        try:
            deadline = time.monotonic() + 120
            while (not stop.is_set() or not checked[n]) and time.monotonic() < deadline:
                res = s.search(queries, 5)
                gen = res.generation
                wait = time.monotonic() + 5
                while gen not in states and time.monotonic() < wait:
                    time.sleep(0.01)  # the writer records the state just after its commit
                ids = sorted(states[gen])
                x = np.stack([states[gen][i] for i in ids])
                top = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :5]
                assert (res.ids == np.asarray(ids, dtype=object)[top]).all(), gen
                checked[n].add(gen)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert not errors, errors
        assert all(len(c) >= 2 for c in checked), checked
    finally:
        stop.set()
        s.close()
        g.close()


def test_serve_ray_answers_on_shards_and_backfills_locally_during_an_upgrade(
        cluster, require_shared, tmp_path):
    """`galleria serve --ray`: global search on 3 shards equals the single-process
    searcher, follows new commits, and an upgrade switches the service to the local
    backfill searcher (shards serve one space) and back to shards after finish; the
    retired searchers' placement groups are released."""
    import httpx
    from ray.util import placement_group_table

    from _service import thread_server
    from galleria.service.engine import ServiceConfig
    from galleria.upgrade.finish import finish_upgrade
    from galleria.upgrade.job import run_upgrade, start_upgrade

    items = _images(require_shared("smvs_dvd_covers"), 90)
    out = tmp_path / "g"
    index_images(items[:60], out, extractor=_tiny.tiny(3, dim=16))

    def live_groups() -> int:
        return sum(1 for v in placement_group_table().values() if v["state"] != "REMOVED")

    before = live_groups()
    cfg = ServiceConfig(gallery=out, ray=cluster.address, shards=3, refresh_interval_s=0.1)
    with thread_server(cfg, timeout=120) as url, httpx.Client(base_url=url, timeout=60) as c:
        plain = PlainSearcher.open(out)

        def check(ids: list[str], want: str) -> None:
            for i in ids:
                body = c.post("/v1/search", json={"id": i, "k": 5}).json()
                assert body["searcher"] == want, body
                if want == "sharded":
                    q = plain.gallery.get_vectors(plain.gallery.keys_of([i]),
                                                  space=body["model"])
                    ref = plain.search(q, 5)
                    assert [h["id"] for h in body["results"]] == list(ref.ids[0]), i
                    np.testing.assert_allclose([h["score"] for h in body["results"]],
                                               ref.scores[0], atol=1e-5)
                else:
                    assert body["results"][0]["id"] == i

        check([it.id for it in items[:10]], "sharded")
        index_images(items, out, extractor=_tiny.tiny(3, dim=16))  # 30 more, committed
        body = c.post("/v1/search", json={"id": items[80].id, "k": 1}).json()
        assert body["results"][0]["id"] == items[80].id  # the shards followed the log
        check([it.id for it in items[75:85]], "sharded")
        assert live_groups() == before + 1
        start_upgrade(out, "tiny-test", extractor=_tiny.tiny(5, dim=16))
        run_upgrade(out, limit=40, extractor=_tiny.tiny(5, dim=16))
        deadline = time.monotonic() + 30
        while c.post("/v1/search", json={"id": items[0].id, "k": 5}).json()["searcher"] \
                == "sharded" and time.monotonic() < deadline:
            time.sleep(0.1)
        check([it.id for it in items[:5]], "backfill")
        run_upgrade(out, extractor=_tiny.tiny(5, dim=16))
        finish_upgrade(out)
        deadline = time.monotonic() + 30
        while c.post("/v1/search", json={"id": items[0].id, "k": 5}).json()["searcher"] \
                != "sharded" and time.monotonic() < deadline:
            time.sleep(0.1)
        plain.gallery.close()
        plain = PlainSearcher.open(out)
        check([it.id for it in items[:10]], "sharded")
        plain.gallery.close()
    # the server closed its searchers (current and retired): no placement group left
    deadline = time.monotonic() + 30
    while live_groups() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_groups() == before


# ----------------------------------------------------------------- failures
def _kill_when(path: Path, n: int, action, timeout: float = 120.0,
               ready=lambda: True) -> bool:
    """Run ``action`` once ``path`` holds ``n`` rows and ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (path / "gallery.sqlite").exists() and ready():
            try:
                if sum(_rows_per_id(path).values()) >= n:
                    action()
                    return True
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    return False


def test_worker_node_killed_mid_index_every_image_once(cluster, require_shared, tmp_path):
    items = _images(require_shared("smvs_dvd_covers"), 240)
    out = tmp_path / "g"
    ext = _tiny.tiny(5, delay=0.03)
    victim = cluster.workers[0]
    emb = RayEmbedder(imports=["_tiny"])
    # kill once the victim's actor has served a chunk: it is up and fed, so the kill
    # loses work in flight there (before, the kill could land on a node with no actor)
    on_victim = cluster.node_id(victim)
    killer = threading.Thread(target=_kill_when,
                              args=(out, 40, lambda: cluster.kill_node(victim)),
                              kwargs={"ready": lambda: on_victim in dict(emb.served)})
    try:
        killer.start()
        rep = index_images(items, out, extractor=ext, embedder=emb, batch_size=4,
                           flush_every=8)
    finally:
        killer.join(130)
        emb.close()
    assert victim not in cluster.workers, "the node was not killed mid-run"
    assert emb.stats["lost_actors"] >= 1
    assert rep.embedded == 240
    rows = _rows_per_id(out)
    assert sorted(rows) == sorted(it.id for it in items) and set(rows.values()) == {1}
    again = index_images(items, out, extractor=ext)
    assert again.embedded == 0 and again.already_done == 240


def test_worker_node_killed_without_retry_stops_then_rerun_completes(cluster, require_shared,
                                                                      tmp_path):
    items = _images(require_shared("smvs_dvd_covers"), 160)
    out = tmp_path / "g"
    ext = _tiny.tiny(6, delay=0.03)
    victim = cluster.workers[0]
    emb = RayEmbedder(imports=["_tiny"], max_attempts=1)
    killer = threading.Thread(target=_kill_when,
                              args=(out, 24, lambda: cluster.kill_node(victim)))
    try:
        killer.start()
        with pytest.raises(ClusterError, match="run the same command again"):
            index_images(items, out, extractor=ext, embedder=emb, batch_size=4, flush_every=8)
    finally:
        killer.join(130)
        emb.close()
    done = sum(_rows_per_id(out).values())
    assert 0 < done < 160
    with RayEmbedder(imports=["_tiny"]) as emb2:  # the head node alone is left
        rep = index_images(items, out, extractor=ext, embedder=emb2, batch_size=4)
    assert rep.embedded == 160 - done and rep.already_done == done
    rows = _rows_per_id(out)
    assert sorted(rows) == sorted(it.id for it in items) and set(rows.values()) == {1}
    cluster.add_node(1)
    cluster.add_node(1)


def test_driver_killed_mid_index_rerun_exactly_once(cluster, require_shared, tmp_path):
    items = _images(require_shared("smvs_dvd_covers"), 200)
    out = tmp_path / "g"
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\n" + "".join(f"{it.id},{it.path}\n" for it in items))
    # the driver (the one committer) in its own process; tiny-test sleeps per batch
    code = ("import sys, _tiny\n"
            "from galleria.distributed.ray_embed import ray_index_images\n"
            "ray_index_images(sys.argv[1], sys.argv[2], address=sys.argv[3], imports=['_tiny'],"
            " extractor=_tiny.tiny(1, delay=0.05), batch_size=4, flush_every=8)\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.Popen([sys.executable, "-c", code, str(manifest), str(out), cluster.address],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        killed = _kill_when(out, 16, lambda: p.send_signal(signal.SIGKILL), timeout=150)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    done = sum(_rows_per_id(out).values())
    if not killed or done >= 200:
        pytest.fail(f"the driver finished before it could be killed ({done} stored)")
    # the re-run through the CLI (--ray): embeds exactly the rest
    cli = "import sys, _tiny; from galleria.cli.main import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", cli, "index", str(manifest), "--out", str(out),
                        "--model", "tiny-test", "--batch-size", "4", "--quiet", "--json",
                        "--ray", cluster.address, "--ray-import", "_tiny"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    rep = json.loads(r.stdout)
    assert rep["embedded"] == 200 - done and rep["already_done"] == done
    rows = _rows_per_id(out)
    assert sorted(rows) == sorted(it.id for it in items) and set(rows.values()) == {1}


# ----------------------------------------------------------------- errors
def test_unreachable_address_is_a_clear_error():
    import socket

    from galleria.distributed.cluster import connect

    with socket.socket() as sk:  # a port nobody listens on
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
        connect(f"127.0.0.1:{port}", timeout_s=5)
    assert time.monotonic() - t0 < 15
    r = subprocess.run([sys.executable, "-m", "galleria.cli.main", "index", str(ROOT), "--out",
                        "/nonexistent/g", "--ray", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr
    g = Gallery.create(Path(tempfile.mkdtemp()) / "g")  # serve --ray: the same, at start-up
    g.close()
    r = subprocess.run([sys.executable, "-m", "galleria.cli.main", "serve", str(g.path),
                        "--port", "1", "--ray", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr
    shutil.rmtree(g.path.parent)


def test_missing_ray_is_a_clear_error():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from galleria.distributed.cluster import connect\n"
            "from galleria.errors import MissingDependencyError\n"
            "try:\n    connect('127.0.0.1:6379')\n"
            "except MissingDependencyError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert "pip install 'galleria[ray]'" in r.stdout, r.stderr
    assert issubclass(MissingDependencyError, ImportError)

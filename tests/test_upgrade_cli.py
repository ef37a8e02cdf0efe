"""End to end through the CLI with real models: kill -9 in the middle of `upgrade run`.

effnet-lite0 -> effnet-lite2 (torch runtime: no ONNX export needed) on 40 real
photo crops. The run is SIGKILLed after a few commits; then every item must be in
exactly one space, search must answer correctly, the next run must finish the
rest, and after `finish` the gallery must equal a fresh index of effnet-lite2.
(The fast suite has the same SIGKILL check with a tiny stand-in model:
tests/test_upgrade_job.py::test_sigkill_in_the_middle_of_a_run.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.merge import merged_scores
from galleria.upgrade.search import BackfillSearcher

N = 40
OLD, NEW = "effnet-lite0", "effnet-lite2"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GALLERIA_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "galleria.cli.upgrade", "upgrade", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    srcs = sorted(photos.glob("*.jpg"))
    for i in range(N):
        im = Image.open(srcs[i % len(srcs)]).convert("RGB")
        w, h = im.size
        s = rng.uniform(0.5, 0.9)
        x, y = rng.uniform(0, 1 - s) * w, rng.uniform(0, 1 - s) * h
        crop = im.crop((int(x), int(y), int(x + s * w), int(y + s * h))).resize((160, 160))
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(out / f"c{i:02d}.jpg", quality=90)
    return out


def counts(path, old_fp, new_fp):
    con = sqlite3.connect(f"file:{path / 'gallery.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        c = dict(con.execute("SELECT space, COUNT(*) FROM vectors GROUP BY space").fetchall())
    finally:
        con.close()
    return c.get(old_fp, 0), c.get(new_fp, 0)


@pytest.mark.slow  # ~1-2 min on 2 busy cores (7 CLI processes, 3 real embedding passes)
def test_kill9_resume_search_finish(folder, tmp_path):
    g = tmp_path / "g"
    index_images(folder, g, model=OLD, runtime="torch", threads=1)
    with Gallery.open(g) as gal:
        old_fp = gal.primary_space
    same = cli("start", str(g), "--new-model", OLD, "--runtime", "torch", check=False)
    assert same.returncode == 2 and "already uses" in same.stderr
    cli("start", str(g), "--new-model", NEW, "--runtime", "torch", "--seed", "1")
    with Gallery.open(g) as gal:
        new_fp = gal.get_setting("upgrade")["new_space"]

    env = {**os.environ, "GALLERIA_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "galleria.cli.upgrade", "upgrade", "run", str(g), "--runtime",
         "torch", "--batch-size", "2", "--commit-every", "2", "--workers", "1", "-q"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    moved = 0
    while time.time() < deadline and proc.poll() is None:
        moved = counts(g, old_fp, new_fp)[1]
        if moved >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_old, n_new = counts(g, old_fp, new_fp)
    assert 6 <= n_new < N and n_old + n_new == N

    # between the two runs: every item in exactly one space, and search answers correctly
    st = cli("status", str(g), "--json")
    assert '"consistent": true' in st.stdout
    early = cli("finish", str(g), check=False)
    assert early.returncode == 2 and "still in the old space" in early.stderr
    with Gallery.open(g) as gal:
        o_ids, n_ids = set(gal.ids(old_fp)), set(gal.ids(new_fp))
        assert not o_ids & n_ids and o_ids | n_ids == set(gal.ids()) and len(gal) == N
        s = BackfillSearcher.open(gal, rule="rank-merge", runtime="torch", threads=1)
        queries = [folder / "c03.jpg", folder / sorted(n_ids)[0]]
        emb, _, _ = s.embed_paths(queries)  # Queries keyed by space
        qo, qn = emb[old_fp], emb[new_fp]
        res = s.search_vectors(old_queries=qo, new_queries=qn, k=N)
        ko, vo = gal.load_vectors(old_fp)
        kn, vn = gal.load_vectors(new_fp)
        ids = list(gal.ids_of(ko)) + list(gal.ids_of(kn))
        go = np.concatenate([vo, np.zeros((len(kn), vo.shape[1]), np.float32)])
        gn = np.concatenate([np.zeros((len(ko), vn.shape[1]), np.float32), vn])
        mask = np.arange(len(ids)) >= len(ko)
        # (few pairs collected before the kill: below MIN_PAIRS the merge is raw)
        ref = merged_scores(qo @ go.T, qn @ gn.T, mask, s.calibration,
                            old_queries=qo, new_queries=qn)
        want = [[ids[j] for j in row] for row in np.argsort(-ref, axis=1, kind="stable")]
        assert res.ids.tolist() == want
        assert [r[0] for r in res.ids.tolist()] == ["c03.jpg", sorted(n_ids)[0]]

    cli("run", str(g), "--runtime", "torch", "-q")
    n_old, n_new = counts(g, old_fp, new_fp)
    assert (n_old, n_new) == (0, N)
    out = cli("search", str(g), str(folder / "c07.jpg"), "--rule", "naive", "--runtime",
              "torch", "-k", "3", "--json", "--cost")
    assert '"c07.jpg"' in out.stdout and '"forward_passes_per_query": 2.0' in out.stdout
    cli("finish", str(g))

    fresh = tmp_path / "fresh"
    index_images(folder, fresh, model=NEW, runtime="torch", threads=1)
    with Gallery.open(g) as a, Gallery.open(fresh) as b:
        assert [s.space for s in a.spaces()] == [s.space for s in b.spaces()] == [new_fp]
        ka, va = a.load_vectors(new_fp)
        kb, vb = b.load_vectors(new_fp)
        da = dict(zip(a.ids_of(ka), va, strict=True))
        db = dict(zip(b.ids_of(kb), vb, strict=True))
        assert sorted(da) == sorted(db)
        diff = max(float(np.abs(da[i] - db[i]).max()) for i in da)
        assert diff < 1e-5
        q = np.stack([db["c01.jpg"], db["c22.jpg"]])
        ra, rb = a.search(q, N, space=a.primary_space), b.search(q, N, space=b.primary_space)
        assert ra.ids.tolist() == rb.ids.tolist()


def test_cli_errors_are_clear(tmp_path, capsys):
    """No models needed: parser wiring and the error path (exit code 2, one message)."""
    import argparse

    from galleria.cli.upgrade import add_upgrade_parser, main

    p = argparse.ArgumentParser(prog="galleria")
    add_upgrade_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["upgrade", "run", "G", "--limit", "5", "--order", "id"])
    assert (args.upgrade_command, args.limit, args.order) == ("run", 5, "id")
    g = tmp_path / "g"
    with Gallery.create(g) as gal:
        gal.add(["a", "b"], np.eye(2, 4, dtype=np.float32), space="m@1")
    assert main(["upgrade", "status", str(g)]) == 2
    assert "no upgrade in progress" in capsys.readouterr().err
    assert main(["upgrade", "finish", str(g)]) == 2
    assert "galleria upgrade start" in capsys.readouterr().err

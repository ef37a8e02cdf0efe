"""Gallery adaptation end to end on real images (COIL-20): ``galleria index --fusion`` fits the
light query to the gallery and records the decision; search answers from the recorded space
with the recorded query model; the fit refits past the growth threshold; a mismatched fit is
refused; ``kill -9`` during adaptation, then a rerun, ends with the uninterrupted fit."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from _fusionmodel import small_fusion_model
from _fusionmodel import write_manifest as _manifest
from galleria.cli.main import main
from galleria.errors import CompatibilityError, FormatError
from galleria.extractors.registry import extractor_from_config
from galleria.fusion.adapt import AdaptConfig, apply_map
from galleria.fusion.adapt_job import FUSION_KEY, adapt_gallery, fusion_state
from galleria.fusion.model import FusionModel
from galleria.store.gallery import Gallery

pytestmark = pytest.mark.shared
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return small_fusion_model(tmp_path_factory.mktemp("fusion-adapt") / "F")


@pytest.fixture(scope="module")
def coil(require_shared, tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    root = require_shared("coil20")
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 8 objects x 6 views, in a fixed order
    by: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by.setdefault(r["object"], []).append(r)
    pick = [r for o in sorted(by)[:8] for r in by[o][:6]]
    return root, pick


CFG = ["--min-items", "20", "--pseudo-items", "40", "--views", "1"]


@pytest.mark.slow  # 304 s at load 13 (2 cores): index, four fits (fused, light, whitened), searches
def test_index_fusion_adapts_and_search_answers_from_the_recorded_space(
        model_dir, coil, tmp_path, capsys):
    root, rows = coil
    man = _manifest(root, rows[:40], tmp_path / "a.csv")
    g_dir = tmp_path / "G"
    rc = main(["index", str(man), "--fusion", str(model_dir), "--out", str(g_dir), "-q",
               "--json", "--threads", "2"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["embedded"] == 40
    fp = FusionModel.load(model_dir).fingerprint
    fu = rep["fusion"]
    # 40 items < the default 50: nothing fitted yet, the trained query answers
    assert fu["fused_space"] == fp and fu["light_embedded"] == 40 and "< 50" in fu["fit"]
    assert fu["answer"] == "fused"
    rc = main(["fusion", "adapt", str(g_dir), "--json", "-q", "--threads", "2", *CFG])
    fu = json.loads(capsys.readouterr().out)
    assert rc == 0 and fu["fit"] == "refit asked" and fu["light_embedded"] == 0
    with Gallery.open(g_dir, readonly=True) as g:
        st = fusion_state(g)
        assert st["answer"] in ("fused", "light", "whitened") and st["n_items"] == 40
        assert st["space"] == g.primary_space == {
            "light": st["light_space"], "fused": fp,
            "whitened": (st["whitening"] or {}).get("space")}[st["answer"]]
        qc = g.space_info(fp).info["query_config"]
        assert qc["adaptation"] == st["adaptation"] and qc["type"] == "fusion-query"
        assert g.count(st["light_space"]) == 40
    # force each answer in turn and check search against brute force with the recorded model
    out_of_domain = ["--in-domain", "0", "--homogeneous", "2"]
    for force, want in ((["--margin", "-100", *out_of_domain], "fused"),
                        (["--margin", "100", *out_of_domain], "light"),
                        (["--in-domain", "0", "--homogeneous", "0"], "whitened")):
        rc = main(["fusion", "adapt", str(g_dir), *force, "--json", "-q", "--threads", "2",
                   *CFG])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        out = json.loads(cap.out)
        assert rc == 0 and out["answer"] == want, out
        assert main(["fusion", "status", str(g_dir)]) == 0
        assert {"light": "light model's own vectors", "fused": "light query -> fused",
                "whitened": "whitened on itself"}[want] in capsys.readouterr().out
        with Gallery.open(g_dir, readonly=True) as g:
            st = fusion_state(g)
            space = st["space"]
            info = g.space_info(space).info
            ids = g.ids(space)
            gv = g.get_vectors(g.keys_of(ids), space=space)
            model_q = extractor_from_config(info.get("query_config") or info["config"],
                                            root=str(g_dir), threads=2, fingerprint=space)
        assert space == {"light": st["light_space"], "fused": fp,
                         "whitened": (st["whitening"] or {}).get("space")}[want]
        files = [str(root / rows[i]["path"]) for i in (3, 40)]
        from PIL import Image

        q = model_q.embed_images([Image.open(f).convert("RGB") for f in files])
        if want != "light":  # the adapted query: light vector x the gallery's map
            from galleria.fusion.adaptation import QueryAdaptation

            light = extractor_from_config({"type": "fusion-query", "model":
                                           info["config"]["model"], "output": "light"},
                                          root=str(g_dir), threads=2)
            a = QueryAdaptation.load(g_dir / (st["adaptation"] if want == "fused"
                                              else st["whitening"]["query"])["path"])
            x = light.embed_images([Image.open(f).convert("RGB") for f in files])
            np.testing.assert_allclose(q, apply_map(x, a.w, a.b), atol=1e-5)
        if want == "whitened":  # the gallery side: the fused vectors whitened on the gallery
            from galleria.fusion.adaptation import QueryAdaptation

            t = QueryAdaptation.load(g_dir / st["whitening"]["path"])
            with Gallery.open(g_dir, readonly=True) as g:
                fv = g.get_vectors(g.keys_of(ids), space=fp)
            np.testing.assert_allclose(gv, apply_map(fv, t.w, t.b), atol=2e-3)
        rc = main(["search", str(g_dir), *files, "-k", "5", "--json", "--threads", "2"])
        res = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert rc == 0 and len(res) == 2
        # the search JSON and `galleria info` say which space answered, and why
        for r in res:
            assert r["searcher"]["model"] == space, r["searcher"]
            assert f"fusion: {want}: " in r["searcher"]["reason"], r["searcher"]
        assert main(["info", str(g_dir), "--json"]) == 0
        inf = json.loads(capsys.readouterr().out)
        assert inf["searcher"]["space"] == space and inf["fusion"]["answer"] == want
        assert inf["searcher"]["reason"].startswith(f"gallery spaces; fusion: {want}: ")
        for r, qv in zip(res, q, strict=True):
            order = np.argsort(-(gv @ qv), kind="stable")[:5]
            assert [x["id"] for x in r["results"]] == [ids[j] for j in order]
    # undo
    assert main(["fusion", "adapt", str(g_dir), "--reset"]) == 0
    capsys.readouterr()
    with Gallery.open(g_dir, readonly=True) as g:
        assert g.primary_space == fp and g.get_setting(FUSION_KEY) is None
        assert "adaptation" not in g.space_info(fp).info["query_config"]


@pytest.mark.slow  # ~60 s CPU: four index --fusion runs
def test_refit_past_the_growth_threshold_and_mismatches_refused(model_dir, coil, tmp_path,
                                                                 capsys):
    root, rows = coil
    g_dir = tmp_path / "G"
    cfg = AdaptConfig(min_items=20, pseudo_items=30, views=1, refit_growth=1.5)
    for n, want in ((16, "too few"), (24, "first fit"), (32, "is current"), (40, "grew from")):
        man = _manifest(root, rows[:n], tmp_path / f"m{n}.csv")
        assert main(["index", str(man), "--fusion", str(model_dir), "--out", str(g_dir), "-q",
                     "--json", "--threads", "2"]) == 0
        rep = json.loads(capsys.readouterr().out)["fusion"]
        if n == 16:  # the default config: 16 < 50 items, nothing fitted; then ours, recorded
            assert rep["fit"].startswith("16 items < 50") and rep["answer"] == "fused"
            rep = adapt_gallery(g_dir, config=cfg, threads=2)
            assert rep["fit"].startswith("16 items < 20")
        assert want in rep["fit"], rep["fit"]
        with Gallery.open(g_dir, readonly=True) as g:
            st = fusion_state(g)
            assert g.count(st["light_space"]) == n and st["config"] == cfg.to_dict()
    assert st["n_items"] == 40 and st["refit_at"] == 60
    # a gallery whose space names another fit is refused when a searcher opens it
    from galleria.decision.open import open_searcher

    with Gallery.open(g_dir) as g:
        qc = dict(g.space_info(st["fused_space"]).info["query_config"])
        g.update_space_info(st["fused_space"],
                            query_config={**qc, "adaptation": {**qc["adaptation"],
                                                               "digest": "0" * 16}})
        g.set_primary_space(st["fused_space"])
    with pytest.raises(CompatibilityError, match="0000000000000000"):
        open_searcher(g_dir, threads=1)
    (g_dir / qc["adaptation"]["path"] / "map.safetensors").write_bytes(b"garbage")
    with Gallery.open(g_dir) as g:
        g.update_space_info(st["fused_space"], query_config=qc)
    with pytest.raises((FormatError, Exception)):
        open_searcher(g_dir, threads=1)


WORKER = textwrap.dedent("""
    import sys, json
    from galleria.fusion.adapt import AdaptConfig
    from galleria.fusion.adapt_job import adapt_gallery
    # whitened forced: the longest commit (two maps, a new space) is compared too
    cfg = AdaptConfig(min_items=20, pseudo_items=40, views=2, in_domain=0.0, homogeneous=0.0)
    rep = adapt_gallery(sys.argv[1], config=cfg, threads=1, workers=1, commit_every=4)
    print(json.dumps({"answer": rep["answer"], "light": rep["light_embedded"]}), flush=True)
""")


def _fitted(g_dir: Path) -> tuple[dict, np.ndarray]:
    with Gallery.open(g_dir, readonly=True) as g:
        st = fusion_state(g)
        ids = g.ids(st["light_space"])
        x = g.get_vectors(g.keys_of(ids), space=st["light_space"])
    return st, x


@pytest.mark.slow  # 117 s at load 13 (2 cores): a subprocess, 3 adaptations
def test_kill_9_during_adaptation_then_rerun_gives_the_uninterrupted_fit(model_dir, coil,
                                                                         tmp_path):
    from galleria.extract.job import index_images
    from galleria.fusion.extractor import gallery_extractor
    from galleria.images.sources import list_source

    root, rows = coil
    man = _manifest(root, rows, tmp_path / "m.csv")
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    index_images(list_source(man), a_dir, extractor=gallery_extractor(model_dir, a_dir,
                                                                      threads=1),
                 explicit_ids=True)
    shutil.copytree(a_dir, b_dir)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    light_space = None
    for stage in ("light", "views"):
        p = subprocess.Popen([sys.executable, str(script), str(a_dir)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and p.poll() is None:
                if stage == "light":
                    with Gallery.open(a_dir, readonly=True) as g:
                        light_space = next((s.space for s in g.spaces()
                                            if s.space.endswith("") and "|light@" in s.space),
                                           None)
                        n = g.count(light_space) if light_space else 0
                    if 8 <= n < len(rows):
                        break
                else:
                    parts = list((a_dir / "fusion" / "adapt-work").glob("views-*/part-*.npz"))
                    if parts:
                        break
                time.sleep(0.02)
            assert p.poll() is None, p.stderr.read()[-2000:]
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == -signal.SIGKILL
        with Gallery.open(a_dir, readonly=True) as g:
            assert g.get_setting(FUSION_KEY) is None  # killed before the commit
    rerun = subprocess.run([sys.executable, str(script), str(a_dir)], env=env,
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["light"] < len(rows)  # resumed: some were done
    plain = subprocess.run([sys.executable, str(script), str(b_dir)], env=env,
                           capture_output=True, text=True, timeout=180)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads(plain.stdout)["light"] == len(rows)
    sa, xa = _fitted(a_dir)
    sb, xb = _fitted(b_dir)
    np.testing.assert_array_equal(xa, xb)
    assert sa["adaptation"] == sb["adaptation"]  # the same map, bit for bit (its digest)
    assert sa["answer"] == sb["answer"] == "whitened" and sa["scores"] == sb["scores"]
    assert sa["whitening"] == sb["whitening"] and sa["domain"] == sb["domain"]
    with Gallery.open(a_dir, readonly=True) as ga, Gallery.open(b_dir, readonly=True) as gb:
        sp = sa["whitening"]["space"]
        ids = ga.ids(sp)
        assert ids == gb.ids(sp) and len(ids) == len(rows)
        np.testing.assert_array_equal(ga.get_vectors(ga.keys_of(ids), space=sp),
                                      gb.get_vectors(gb.keys_of(ids), space=sp))

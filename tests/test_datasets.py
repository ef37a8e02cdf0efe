"""Task loaders, manifest tasks and the embedding protocol (published LOPQ baseline)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from galleria.errors import DatasetMissingError, FormatError, InputError
from galleria.eval import paths as eval_paths
from galleria.eval.datasets import (
    TASKS,
    RetrievalTask,
    load_revisitop_gnd,
    load_task,
    manifest_task,
    read_fvecs,
)
from galleria.eval.protocols import evaluate_embeddings, score_matrix
from galleria.transforms.whiten import apply_pca_whitening, learn_pca_whitening

# --------------------------------------------------------------------------- #
# Without the shared data
# --------------------------------------------------------------------------- #


def _write_images(folder, names):
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8 not really a jpeg")


def test_manifest_task_with_split(tmp_path):
    _write_images(tmp_path, ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"])
    absolute = tmp_path / "b" / "2.jpg"
    (tmp_path / "m.csv").write_text(
        f"path,label,split\na/1.jpg,a,train\nb/1.jpg,b,train\na/2.jpg,a,test\n{absolute},b,test\n"
    )
    t = manifest_task(tmp_path / "m.csv")
    assert t.name == "m" and t.protocol == "class"
    assert t.gallery_paths == ["a/1.jpg", "b/1.jpg"]
    assert t.query_paths == ["a/2.jpg", str(absolute)]
    assert t.query_files()[1] == absolute
    np.testing.assert_array_equal(t.query_gallery_index, [-1, -1])
    res = t.evaluate(np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32))
    assert res["mAP"] == pytest.approx(100.0) and res["R@1"] == pytest.approx(100.0)


def test_manifest_task_leave_one_out(tmp_path):
    _write_images(tmp_path, ["1.png", "2.png", "3.png", "4.png"])
    (tmp_path / "m.csv").write_text("path,label\n1.png,x\n2.png,x\n3.png,y\n4.png,y\n")
    t = manifest_task(tmp_path / "m.csv", name="mine")
    np.testing.assert_array_equal(t.query_gallery_index, np.arange(4))
    emb = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    res = evaluate_embeddings(t, emb, emb)
    assert res["mAP"] == pytest.approx(100.0) and res["mAP@R"] == pytest.approx(100.0)
    # the query itself is excluded: with self excluded, a swapped pair ranks last
    res = evaluate_embeddings(t, emb, emb[[2, 3, 0, 1]])
    assert res["R@1"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("", "empty"),
        ("path,label\n", "no rows"),
        ("path,name\n1.png,x\n", "lacks column"),
        ("path,label,split\n1.png,x,val\n", "unknown split"),
        ("path,label,split\n1.png,x,train\n", "both"),
        ("path,label\n1.png,\n", "empty path or label"),
        ("path,label\nmissing1.png,x\nmissing2.png,x\n1.png,x\n", "2 of 3 image files"),
    ],
)
def test_manifest_task_errors(tmp_path, text, msg):
    _write_images(tmp_path, ["1.png"])
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(InputError, match=msg):
        manifest_task(tmp_path / "m.csv")


def test_manifest_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(InputError, match="missing"):
        manifest_task(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="unknown task"):
        load_task("imagenet")


def test_missing_datasets_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_paths, "_candidates", lambda: [tmp_path / "absent"])
    with pytest.raises(DatasetMissingError, match="GALLERIA_DATASETS"):
        load_task("ukbench56")
    (tmp_path / "absent").mkdir()
    with pytest.raises(DatasetMissingError, match="ukbench56"):
        load_task("ukbench56")


def test_restricted_unpickler(tmp_path):
    good = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": np.array([0]), "bbx": [1, 2]}]}
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(good))
    assert load_revisitop_gnd(tmp_path / "g.pkl")["gnd"][0]["easy"].tolist() == [0]

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "e.pkl").write_bytes(pickle.dumps({"imlist": Evil()}))
    with pytest.raises(FormatError, match="refusing"):
        load_revisitop_gnd(tmp_path / "e.pkl")


def test_read_fvecs_roundtrip_and_errors(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows = np.hstack([np.full((3, 1), 4, np.int32), x.view(np.int32)])
    rows.tofile(tmp_path / "x.fvecs")
    np.testing.assert_array_equal(read_fvecs(tmp_path / "x.fvecs"), x)
    rows[1, 0] = 5
    rows.tofile(tmp_path / "bad.fvecs")
    with pytest.raises(FormatError):
        read_fvecs(tmp_path / "bad.fvecs")


def test_task_validation_and_shapes(tmp_path):
    t = RetrievalTask(
        name="t",
        root=tmp_path,
        gallery_paths=["a", "b"],
        query_paths=["q"],
        query_gallery_index=np.array([-1]),
        protocol="class",
        query_labels=np.array([0]),
        gallery_labels=np.array([0, 1]),
    )
    with pytest.raises(InputError, match="3 columns"):
        t.evaluate(np.zeros((1, 3), np.float32))
    with pytest.raises(InputError, match="gallery vectors"):
        evaluate_embeddings(t, np.ones((1, 2)), np.ones((3, 2)))
    with pytest.raises(InputError, match="query vectors"):
        evaluate_embeddings(t, np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(InputError, match="no precomputed"):
        t.vectors()
    with pytest.raises(InputError, match="protocol"):
        RetrievalTask(
            name="t",
            root=tmp_path,
            gallery_paths=["a"],
            query_paths=["q"],
            query_gallery_index=np.array([-1]),
            protocol="nope",
        )


# --------------------------------------------------------------------------- #
# Shared data sets
# --------------------------------------------------------------------------- #


def _oracle(task):
    return (task.query_labels[:, None] == task.gallery_labels[None, :]).astype(np.float32)


EXPECTED = {  # name: (queries, gallery, queries that are gallery items)
    "roxford5k-lopq": (70, 4993, 0),
    "rparis250": (12, 238, 0),
    "smvs": (400, 500, 400),
    "smvs-ref": (400, 100, 0),
    "ukbench56": (56, 56, 56),
    "caltech101": (2893, 5784, 0),
    "coil20": (1000, 1000, 1000),
    "orl_faces": (400, 400, 400),
    "oxford_affine": (48, 48, 48),
}


@pytest.mark.shared
@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads(require_shared, name):
    require_shared("revisitop")
    task = load_task(name)
    q, g, own = EXPECTED[name]
    assert (task.num_queries, task.num_gallery) == (q, g)
    assert int((task.query_gallery_index >= 0).sum()) == own
    if task.protocol == "revisitop":
        return
    assert all(f.is_file() for f in task.gallery_files()[:20])
    own_rows = np.flatnonzero(task.query_gallery_index >= 0)
    for i in own_rows[:20]:
        assert task.query_paths[i] == task.gallery_paths[task.query_gallery_index[i]]
    res = task.evaluate(_oracle(task))
    for key, val in res.items():
        assert val == pytest.approx(4.0 if key == "N-S" else 100.0), key
    assert set(res) == set(task.metrics)


@pytest.mark.shared
def test_caltech_and_smvs_details(require_shared):
    require_shared("caltech101")
    cal = load_task("caltech101")
    assert "BACKGROUND_Google" not in set(cal.query_labels) | set(cal.gallery_labels)
    assert len(set(cal.gallery_labels)) == 101
    ref = load_task("smvs-ref")
    assert all("/Reference/" in p for p in ref.gallery_paths)
    assert not any("/Reference/" in p for p in ref.query_paths)


@pytest.mark.shared
def test_rparis250_restricted_ground_truth(require_shared):
    require_shared("rparis250")
    t = load_task("rparis250")
    assert t.query_bbx is not None and len(t.query_bbx) == 12
    assert not set(t.query_paths) & set(t.gallery_paths)
    assert t.query_bbx[0] == (8.0, 104.0, 707.0, 913.0)  # paris_defense_000056
    for g in t.gnd:
        for key in ("easy", "hard", "junk"):
            assert ((g[key] >= 0) & (g[key] < t.num_gallery)).all()
    # an oracle: positives first, junk next -> perfect in every setting
    scores = np.zeros((12, t.num_gallery), np.float32)
    for i, g in enumerate(t.gnd):
        scores[i, g["junk"]] = 0.5
        scores[i, np.concatenate([g["easy"], g["hard"]])] = 1.0
    res = t.evaluate(scores)
    for key in ("E_mAP", "M_mAP", "H_mAP"):  # junk is removed before AP
        assert res[key] == pytest.approx(100.0), key
    assert t.evaluate(-scores)["M_mAP"] < 50.0
    assert len(t.gnd[0]["easy"]) == 36 and len(t.gnd[0]["hard"]) == 9


@pytest.mark.shared
def test_lopq_published_baseline(require_shared):
    require_shared("oxford5k_lopq128")
    task = load_task("roxford5k-lopq")
    gallery, queries = task.vectors()
    assert gallery.shape == (4993, 128) and queries.shape == (70, 128)
    assert gallery.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    res = task.evaluate(queries @ gallery.T)
    assert res["E_mAP"] == pytest.approx(28.89, abs=0.01)
    assert res["M_mAP"] == pytest.approx(21.13, abs=0.01)
    assert res["H_mAP"] == pytest.approx(4.60, abs=0.01)
    assert evaluate_embeddings(task, queries, gallery) == pytest.approx(res)


@pytest.mark.shared
def test_lopq_whitening_qe_dba_change_the_numbers(require_shared):
    require_shared("oxford5k_lopq128")
    task = load_task("roxford5k-lopq")
    gallery, queries = task.vectors()
    mean, P = learn_pca_whitening(gallery)
    gw, qw = apply_pca_whitening(gallery, mean, P), apply_pca_whitening(queries, mean, P)

    def emh(r):
        return (r["E_mAP"], r["M_mAP"], r["H_mAP"])

    base = emh(evaluate_embeddings(task, queries, gallery))
    white = emh(evaluate_embeddings(task, qw, gw))
    qe = emh(evaluate_embeddings(task, qw, gw, qe_alpha=3.0, qe_k=2))
    dba = emh(evaluate_embeddings(task, qw, gw, dba_k=5, qe_alpha=3.0, qe_k=2))
    # measured values (regression guard), E / M / H
    assert white == pytest.approx((29.24, 19.91, 3.81), abs=0.05)
    assert qe == pytest.approx((30.96, 21.00, 4.10), abs=0.05)
    assert dba == pytest.approx((32.62, 22.84, 5.55), abs=0.05)
    assert len({base, white, qe, dba}) == 4
    # DBA then QE is what score_matrix does; check the order explicitly
    s = score_matrix(task, qw, gw, dba_k=5, qe_alpha=3.0, qe_k=2)
    assert emh(task.evaluate(s)) == pytest.approx(dba)


def test_evaluate_accepts_a_search_result(tmp_path):
    from galleria.types import SearchResult

    t = RetrievalTask(
        name="t",
        root=tmp_path,
        gallery_paths=["a", "b", "c"],
        query_paths=["q"],
        query_gallery_index=np.array([-1]),
        protocol="class",
        query_labels=np.array([1]),
        gallery_labels=np.array([0, 1, 1]),
        metrics=("mAP", "R@1"),
    )
    res = SearchResult(np.array([[0.9, 0.5]], np.float32), np.array([[1, 0]]))
    out = t.evaluate(res)
    assert out["R@1"] == 100.0 and out["mAP"] == pytest.approx(50.0)

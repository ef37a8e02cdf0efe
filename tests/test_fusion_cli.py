"""``galleria fusion train`` end to end on a tiny real set (UKBench, 7 objects trained, the
other 7 evaluated), resumed by a rerun; the fused gallery indexed, queried by the light model;
a second trainer on the same work folder is refused."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from galleria.cli.main import main
from galleria.errors import GalleriaError
from galleria.eval.metrics import ukbench_ns_score
from galleria.extractors.registry import extractor_from_config
from galleria.fusion.extractor import configs
from galleria.fusion.model import FusionModel

pytestmark = pytest.mark.shared


def _manifest(path: Path, root: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "group"])
        w.writeheader()
        for r in rows:
            w.writerow({"path": str(root / r["path"]), "group": r["group"]})
    return path


@pytest.fixture(scope="module")
def ukbench(require_shared, tmp_path_factory):
    root = require_shared("ukbench56")
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    tmp = tmp_path_factory.mktemp("fusion-cli")
    return (_manifest(tmp / "train.csv", root, rows[:28]),
            _manifest(tmp / "test.csv", root, rows[28:]), tmp)


ARGS = ["--gallery-models", '{"type": "effnet-lite0", "size": 160},opennsfw-r50',
        "--dim", "64", "--layers", "1", "--heads", "4", "--views", "2", "--epochs", "8",
        "--min-steps", "0", "--lr", "1e-3", "--momentum", "0.9", "--batch", "8",
        "--val-fraction", "0.3", "-q", "--threads", "2"]


@pytest.mark.slow  # ~20 s idle, ~65 s on the loaded 2-core machine; the photos e2e in
# test_fusion_model.py covers index --fusion / search in the default suite
def test_fusion_train_index_and_query(ukbench, capsys):
    train, test, tmp = ukbench
    out = tmp / "F"
    rc = main(["fusion", "train", "--images", str(train), "--label-column", "group",
               "--out", str(out), "--json", *ARGS])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 28 and report["classes"] == 5 and report["n_val"] == 8
    model = FusionModel.load(out)
    assert model.fingerprint == report["fingerprint"]
    assert [s.name for s in model.specs] == ["effnet-lite0", "opennsfw-r50"]

    # rerun: everything is cached / finished; same model, nothing retrained
    rc = main(["fusion", "train", "--images", str(train), "--label-column", "group",
               "--out", str(out), "--json", *ARGS])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0 and again["fingerprint"] == report["fingerprint"]
    assert again["resumed_from"] == sum(h["epoch"] > 0 for h in model.training["history"])

    # `galleria index --fusion`: the other 7 objects through the members and the mixer
    from galleria.decision import open_searcher
    from galleria.images.sources import read_manifest

    g_dir = tmp / "G"
    rc = main(["index", str(test), "--fusion", str(out), "--out", str(g_dir), "-q", "--json",
               "--threads", "2"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["space"] == model.fingerprint and rep["embedded"] == 28
    items = read_manifest(test)
    searcher = open_searcher(g_dir, threads=2)
    info = searcher.gallery.space_info(model.fingerprint).info
    assert info["config"]["type"] == "fusion-gallery"
    assert info["query_config"]["type"] == "fusion-query"
    assert type(searcher.extractor).__name__ == "FusionQueryExtractor"
    g = searcher.gallery.get_vectors(searcher.gallery.keys_of([it.id for it in items]),
                                     space=model.fingerprint)
    # the fused vectors are the mixer on the members' own embeddings
    g_ext = extractor_from_config(configs(str(out))["config"], threads=2)
    from PIL import Image

    imgs = [Image.open(it.path).convert("RGB") for it in items]
    np.testing.assert_allclose(g[:4], g_ext.embed_images(imgs[:4]), atol=1e-5)
    q_ext = extractor_from_config(configs(str(out))["query_config"], threads=2,
                                  fingerprint=model.fingerprint)
    q = q_ext.embed_images(imgs)
    labels = np.array([it.meta["group"] for it in items])
    ns_asym = ukbench_ns_score(q @ g.T, labels)
    ns_sym = ukbench_ns_score(g @ g.T, labels)
    # 20 training images: a smoke test, not a benchmark (random ranking: 0.57, self only: 1)
    assert ns_sym >= 3.0 and ns_asym >= 2.0, (ns_sym, ns_asym)

    # `galleria search G q.jpg`: the light model embeds the query (one pass), same ranking
    rc = main(["search", str(g_dir), str(items[0].path), str(items[5].path), "-k", "4",
               "--json", "--threads", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(rows) == 2
    for row, qi in zip(rows, (0, 5), strict=True):
        order = np.argsort(-(q[qi] @ g.T), kind="stable")[:4]
        assert [r["id"] for r in row["results"]] == [items[j].id for j in order]
        np.testing.assert_allclose([r["score"] for r in row["results"]],
                                   (q[qi] @ g.T)[order], atol=1e-4)
    searcher.gallery.close()


def test_second_trainer_on_the_same_work_folder_is_refused(ukbench):
    from galleria.fusion.pipeline import _work_lock

    _, _, tmp = ukbench
    work = tmp / "W"
    work.mkdir()
    entered = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with _work_lock(work):
            entered.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert entered.wait(30)
        with pytest.raises(GalleriaError, match="another `galleria fusion train`"), \
                _work_lock(work):
            pass
    finally:
        release.set()
        t.join(30)
    with _work_lock(work):  # free again
        pass

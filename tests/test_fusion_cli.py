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
        "--min-steps", "0", "--momentum", "0.9", "--batch", "8", "--val-fraction", "0.3",
        "-q", "--threads", "2"]


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
    assert again["resumed_from"] == len(model.training["history"])

    # index the other 7 objects through the mixer, query them with the light model
    from galleria.extract.job import index_images

    cfgs = configs(str(out))
    g_ext = extractor_from_config(cfgs["config"], threads=2)
    rep = index_images(test, tmp / "G", extractor=g_ext)
    assert rep.space == model.fingerprint and rep.embedded == 28
    from galleria.images.sources import read_manifest
    from galleria.store.gallery import Gallery

    items = read_manifest(test)
    gal = Gallery.open(tmp / "G")
    keys = gal.keys_of([it.id for it in items])
    g = gal.get_vectors(keys, space=model.fingerprint)
    gal.close()
    q_ext = extractor_from_config(cfgs["query_config"], threads=2,
                                  fingerprint=model.fingerprint)
    from PIL import Image

    q = q_ext.embed_images([Image.open(it.path).convert("RGB") for it in items])
    labels = np.array([it.meta["group"] for it in items])
    ns_asym = ukbench_ns_score(q @ g.T, labels)
    ns_sym = ukbench_ns_score(g @ g.T, labels)
    # 20 training images: a smoke test, not a benchmark (random ranking: 0.57, self only: 1)
    assert ns_sym >= 3.0 and ns_asym >= 2.0, (ns_sym, ns_asym)


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

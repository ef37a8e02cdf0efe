"""The fusion artifact and its two extractors: save/load checks, ONNX = torch, config round
trip, pickling, refusal of other members, concurrent use."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from galleria.errors import CompatibilityError, FormatError
from galleria.extractors.registry import create_extractor, extractor_from_config
from galleria.fusion.extractor import FusionGalleryExtractor, configs
from galleria.fusion.members import input_spec
from galleria.fusion.mixer import InputSpec, build_mixer
from galleria.fusion.model import FusionModel
from galleria.fusion.query_model import build, query_weights_id


def _members():
    return [create_extractor("effnet-lite0", size=128, runtime="onnx"),
            create_extractor("effnet-lite0", size=96, pooling="mean", runtime="onnx")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    members = _members()
    specs = [input_spec(m) for m in members]
    torch.manual_seed(0)
    mixer = build_mixer("transformer", specs, d=32, layers=1, heads=4)
    trunk, tail = build("effnet-lite0", 0, 32)
    with torch.no_grad():
        tail.whiten.weight.normal_(0, 0.05)
    model = FusionModel(
        members=[{"config": m.config(), "fingerprint": m.fingerprint} for m in members],
        specs=specs, mixer=mixer,
        mixer_params={"kind": "transformer", "d": 32, "layers": 1, "heads": 4}, tail=tail,
        query_params={"model": "effnet-lite0", "train_blocks": 0, "d": 32, "size": 224,
                      "weights_id": query_weights_id("effnet-lite0"),
                      "pooling": {"kind": "gem", "p": 3.0, "eps": 1e-6}},
        recipe={"note": "test"}, training={"epochs": 0})
    out = tmp_path_factory.mktemp("fusion") / "F"
    model.save(out, trunk=trunk)
    return out


@pytest.fixture(scope="module")
def images(photos) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]


def test_save_load_round_trip_and_checks(saved, tmp_path):
    m = FusionModel.load(saved)
    assert m.fingerprint.startswith("fusion-32@")
    FusionModel.load(saved, fingerprint=m.fingerprint)
    with pytest.raises(CompatibilityError, match="fusion-32@"):
        FusionModel.load(saved, fingerprint="fusion-32@0000")
    # a weight file from elsewhere is refused
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "F"
    shutil.copytree(saved, bad)
    state = load_file(str(bad / "mixer.safetensors"))
    state["token"] = state["token"] + 1e-3
    save_file(state, str(bad / "mixer.safetensors"))
    with pytest.raises(FormatError, match="digests"):
        FusionModel.load(bad)
    (bad / "query.onnx").unlink()
    with pytest.raises(FormatError, match="missing"):
        FusionModel.load(bad)


def test_mixer_refuses_other_members_or_dims(saved):
    m = FusionModel.load(saved)
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((3, s.stored_dim)).astype(np.float32) for s in m.specs]
    assert m.mix(feats).shape == (3, 32)
    other = [m.specs[0], InputSpec("x", "effnet-lite2-gem3-260@123", "global", 1280)]
    with pytest.raises(CompatibilityError, match=r"effnet-lite0.*effnet-lite2-gem3-260@123"):
        m.mix(feats, specs=other)
    with pytest.raises(CompatibilityError, match="1280-d"):
        m.mix([feats[0], np.zeros((3, 64), np.float32)])
    with pytest.raises(CompatibilityError, match=r"trained for the member features"):
        FusionGalleryExtractor(m, [create_extractor("effnet-lite0", size=160), *_members()[1:]])


def test_query_onnx_equals_torch(saved, images):
    cfg = configs(str(saved))["query_config"]
    onnx_q = extractor_from_config(cfg, runtime="onnx", threads=1)
    torch_q = extractor_from_config(cfg, runtime="torch")
    a, b = onnx_q.embed_images(images), torch_q.embed_images(images)
    assert a.shape == (len(images), 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert np.abs(a - b).max() < 1e-4


def test_configs_round_trip_and_pickle(saved, images):
    cfgs = configs(str(saved))
    g = extractor_from_config(cfgs["config"], threads=1)
    q = extractor_from_config(cfgs["query_config"], threads=1)
    assert g.fingerprint == q.fingerprint == FusionModel.load(saved).fingerprint
    assert g.config() == cfgs["config"] and q.config() == cfgs["query_config"]
    vg = g.embed_images(images)
    assert vg.shape == (len(images), 32)
    # the gallery vector is the mixer applied to the members' own embeddings
    members = _members()
    direct = g.model.mix([m.embed_images(images) for m in members])
    np.testing.assert_allclose(vg, direct, atol=1e-5)
    # relative model path resolves against root
    rel = {"type": "fusion-gallery", "model": saved.name}
    g_rel = extractor_from_config(rel, root=saved.parent, fingerprint=g.fingerprint)
    np.testing.assert_allclose(g_rel.embed_images(images[:2]), vg[:2], atol=1e-6)
    for ext, ref in ((g, vg), (q, q.embed_images(images))):
        twin = pickle.loads(pickle.dumps(ext))
        assert twin.fingerprint == ext.fingerprint and type(twin) is type(ext)
        np.testing.assert_allclose(twin.embed_images(images), ref, atol=1e-6)
    with pytest.raises(CompatibilityError, match="fusion-32@"):
        extractor_from_config(cfgs["query_config"], fingerprint="fusion-32@ffff")


def test_extractors_from_two_threads_at_once(saved, images):
    cfgs = configs(str(saved))
    for cfg in (cfgs["config"], cfgs["query_config"]):
        ext = extractor_from_config(cfg, threads=1)
        ref = ext.embed_images(images)
        out: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def work(i: int, ext=ext, out=out, errors=errors) -> None:
            try:
                for _ in range(3):
                    out[i] = ext.embed_images(images)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and all(not t.is_alive() for t in threads)
        for v in out.values():
            np.testing.assert_allclose(v, ref, atol=1e-5)


def test_index_fusion_then_search_with_the_light_model(saved, photos, tmp_path, capsys):
    """``galleria index --fusion F`` copies F into the gallery, records the light model as the
    space's query_config; ``galleria search`` embeds queries with it; other models are refused."""
    import json
    import shutil

    from galleria.cli.main import main
    from galleria.decision import open_searcher
    from galleria.extract.queries import Queries
    from galleria.search.searcher import PlainSearcher

    g_dir = tmp_path / "G"
    rc = main(["index", str(photos), "--fusion", str(saved), "--out", str(g_dir), "-q",
               "--json", "--threads", "1"])
    rep = json.loads(capsys.readouterr().out)
    fp = FusionModel.load(saved).fingerprint
    assert rc == 0 and rep["space"] == fp and rep["embedded"] == len(list(photos.iterdir()))
    moved = tmp_path / "moved" / "G"  # the gallery carries its fusion model
    shutil.copytree(g_dir, moved)
    shutil.rmtree(g_dir)
    s = open_searcher(moved, threads=1)
    info = s.gallery.space_info(fp).info
    assert info["config"] == {"type": "fusion-gallery", "model": info["config"]["model"]}
    assert (moved / info["config"]["model"] / "query.onnx").is_file()
    assert info["query_config"] == {"type": "fusion-query", "model": info["config"]["model"]}
    assert type(s.extractor).__name__ == "FusionQueryExtractor" and s.extractor.fingerprint == fp
    files = sorted(photos.iterdir())
    q = extractor_from_config(configs(str(saved))["query_config"], threads=1).embed_images(
        [Image.open(f).convert("RGB") for f in files[:2]])
    ids = s.gallery.ids(fp)
    g = s.gallery.get_vectors(s.gallery.keys_of(ids), space=fp)
    rc = main(["search", str(moved), str(files[0]), str(files[1]), "-k", "3", "--json",
               "--threads", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    for row, qv in zip(rows, q, strict=True):
        order = np.argsort(-(g @ qv), kind="stable")[:3]
        assert [r["id"] for r in row["results"]] == [ids[j] for j in order]
    # queries from any other model are refused, naming both
    other = create_extractor("effnet-lite0", runtime="onnx")
    with pytest.raises(CompatibilityError, match=rf"{other.fingerprint}.*{fp}"):
        PlainSearcher(s.gallery, other, space=fp)
    with pytest.raises(CompatibilityError, match=fp):
        s.search(Queries({other.fingerprint: other.embed_images([Image.open(files[0])])}))
    from galleria.errors import GalleriaError

    with pytest.raises(GalleriaError, match="1280"):
        s.search(np.ones((1, 1280), np.float32) / np.sqrt(1280))
    # --fusion with --model is refused
    assert main(["index", str(photos), "--fusion", str(saved), "--model", "effnet-lite0",
                 "--out", str(tmp_path / "G2"), "-q"]) != 0
    assert "--fusion" in capsys.readouterr().err
    s.gallery.close()

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

"""Local feature sets as mixer inputs: real OpenCV RootSIFT on real photos, packed into a
store space, through the fused-gallery extractor; training with a local input (synthetic).

The project's own local extractors (``sift``, ``xfeat``) live on another branch; this test
defines a minimal local extractor with the same contract (architecture.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from galleria.extractors.base import Extractor
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.registry import create_extractor
from galleria.fusion.extractor import FusionGalleryExtractor
from galleria.fusion.members import PackedLocalExtractor, input_spec, unpack_local
from galleria.fusion.mixer import InputSpec, build_mixer
from galleria.fusion.model import FusionModel
from galleria.fusion.query_model import build, query_weights_id
from galleria.fusion.train import FusionRecipe, TrainingData, fit_fusion
from galleria.types import LocalFeatures

cv2 = pytest.importorskip("cv2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RootSift(Extractor):
    """Minimal local extractor: OpenCV SIFT at 256 px, RootSIFT descriptors."""

    kind = "local"

    def __init__(self, n: int = 64) -> None:
        super().__init__(name="rootsift-test", dim=128,
                         preprocessing=Preprocessing(size=(256, 256), resize="squash"),
                         pooling=Pooling("model"), weights_id="opencv-sift", source="OpenCV")
        self.n = n
        self.descriptor_dim = 128

    def prepare(self, img: Image.Image) -> tuple[np.ndarray, ...]:
        g = np.asarray(img.convert("L").resize((256, 256)), np.float32)
        return (g,)

    def embed_prepared(self, per_scale):  # type: ignore[override]
        out = []
        sift = cv2.SIFT_create(nfeatures=self.n)
        for g in per_scale[0]:
            kps, desc = sift.detectAndCompute(g.astype(np.uint8), None)
            if desc is None:
                out.append(LocalFeatures(np.zeros((0, 4), np.float32),
                                         np.zeros((0, 128), np.float32), (256, 256)))
                continue
            d = np.sqrt(desc / np.maximum(desc.sum(1, keepdims=True), 1e-12)).astype(np.float32)
            kp = np.array([[k.pt[0], k.pt[1], k.size, k.response] for k in kps], np.float32)
            out.append(LocalFeatures(kp, d, (256, 256)))
        return out

    def _embed_scale(self, batch, scale):  # pragma: no cover
        raise NotImplementedError


def test_packed_rootsift_through_the_fused_gallery_extractor(photos):
    imgs = [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]
    base = RootSift()
    packed = PackedLocalExtractor(base, top_n=16, desc_dim=128)
    x = packed.embed_images(imgs)
    assert x.shape == (len(imgs), 16 * 128)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    rows, valid = unpack_local(x, 16)
    assert valid.sum(1).min() >= 8  # real photos give keypoints
    # the kept rows are the top-scored RootSIFT descriptors of the image
    feats = base.embed_prepared([np.stack([base.prepare(imgs[0])[0]])])[0]
    top = feats.descriptors[np.argsort(-feats.keypoints[:, 3], kind="stable")[:16]]
    np.testing.assert_allclose(rows[0, :len(top)], top / np.linalg.norm(top, axis=1,
                                                                        keepdims=True),
                               atol=1e-5)
    glob = create_extractor("effnet-lite0", size=128, runtime="onnx", threads=1)
    specs = [input_spec(glob), input_spec(packed)]
    assert specs[1] == InputSpec(packed.name, packed.fingerprint, "local", 128, 16)
    torch.manual_seed(0)
    mixer = build_mixer("transformer", specs, d=32, layers=1, heads=4)
    _, tail = build("effnet-lite0", 0, 32)
    model = FusionModel(
        members=[{"config": glob.config(), "fingerprint": glob.fingerprint},
                 {"config": {"type": "rootsift-test"}, "fingerprint": packed.fingerprint}],
        specs=specs, mixer=mixer, mixer_params={"kind": "transformer", "d": 32, "layers": 1,
                                                "heads": 4},
        tail=tail, query_params={"model": "effnet-lite0", "train_blocks": 0, "d": 32,
                                 "size": 224, "weights_id": query_weights_id("effnet-lite0")})
    fused = FusionGalleryExtractor(model, [glob, packed])
    g = fused.embed_images(imgs)
    np.testing.assert_allclose(g, model.mix([glob.embed_images(imgs), x]), atol=1e-5)
    # the local set is a set: the fused vector does not depend on the order of its rows
    perm = x.reshape(len(imgs), 16, 128)[:, ::-1].reshape(len(imgs), -1)
    np.testing.assert_allclose(model.mix([glob.embed_images(imgs), perm]), g, atol=1e-5)


def test_training_with_a_local_input_learns():
    """Synthetic: the class is only in a local set's rows (plus a weak global feature)."""
    rng = np.random.default_rng(0)
    n_cls, per, top_n, dd = 40, 4, 6, 12
    y = np.repeat(np.arange(n_cls), per)
    code = rng.standard_normal((n_cls, top_n, dd))
    loc = code[y] + 0.5 * rng.standard_normal((len(y), top_n, dd))
    loc[:, 4:] = 0  # two padding rows
    loc[:, :4] /= np.linalg.norm(loc[:, :4], axis=2, keepdims=True)
    packed = (loc / 2.0).reshape(len(y), -1).astype(np.float32)
    glob = rng.standard_normal((len(y), 8)).astype(np.float32)
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    proj = rng.standard_normal((top_n * dd, 320 * 4))
    v = (code[y].reshape(len(y), 1, -1) + 0.5 * rng.standard_normal((len(y), 2, top_n * dd)))
    views = np.abs(v @ proj).reshape(len(y), 2, 320, 2, 2).astype(np.float16)
    specs = [InputSpec("g", "g@1", "global", 8), InputSpec("l", "l@1", "local", dd, top_n)]
    data = TrainingData(specs, [glob, packed], views, y)
    recipe = FusionRecipe(d=32, layers=1, heads=4, train_blocks=0, n_views=2, epochs=5,
                          min_steps=0, batch_size=16, patience=10, val_fraction=0.25, lr=2e-3,
                          anchor=False, distill=0.0, query_init="pca")  # training does it all
    res = fit_fusion(data, recipe)
    best = max(res.history, key=lambda h: h.score)
    # held-out classes: only the local rows carry them (the global input alone is at chance)
    from galleria.fusion.anchor import held_out_map
    from galleria.fusion.train import split_train_val

    _, val = split_train_val(y, 0.25, 0)
    chance = held_out_map(glob[val], glob[val], y[val], True)
    assert chance < 0.25 and best.val_sym > 0.5, (chance, best.val_sym)

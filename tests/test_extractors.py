"""Extractors: real pretrained weights, both runtimes, fingerprints, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from galleria.errors import InputError, MissingDependencyError
from galleria.extractors.pooling import Pooling, gem_numpy, pool_torch
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.registry import create_extractor, list_models


@pytest.fixture(scope="module")
def images(photos):
    from galleria.images.decode import load_image

    return [load_image(p) for p in sorted(photos.glob("*.jpg"))]


def test_registry_lists_builtins():
    specs = {s.name: s for s in list_models()}
    assert set(specs) >= {"effnet-lite0", "effnet-lite2", "opennsfw-r50"}
    assert specs["effnet-lite0"].dim == 1280 and specs["opennsfw-r50"].dim == 1024
    assert specs["effnet-lite2"].input_size == "260x260"


def test_unknown_model_and_bad_options():
    with pytest.raises(InputError, match="unknown model"):
        create_extractor("resnet-9000")
    with pytest.raises(InputError, match="unknown model family"):
        create_extractor("hub:foo")
    with pytest.raises(InputError, match="pooling"):
        create_extractor("effnet-lite0", pooling="max-ish")
    with pytest.raises(InputError, match="scales"):
        create_extractor("effnet-lite0", scales=(0,))


def test_preprocessing_values():
    img = Image.new("RGB", (50, 30), (255, 0, 127))
    pre = Preprocessing(size=(8, 8), mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    x = pre(img)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[:, 0, 0], [(255 - 127) / 128, -127 / 128, 0.0], atol=1e-5)
    bgr = Preprocessing(size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), scale=1.0,
                        channel_order="BGR", layout="NHWC")(img)
    assert bgr.shape == (8, 8, 3)
    np.testing.assert_allclose(bgr[0, 0], [127, 0, 255])
    crop = Preprocessing(size=(10, 10), resize="crop", crop_pct=0.5)(Image.new("RGB", (40, 20)))
    assert crop.shape == (3, 10, 10)


def test_gem_matches_closed_form():
    import torch

    x = np.random.default_rng(0).random((2, 4, 3, 5)).astype(np.float32)
    ref = (x**3).mean(axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(gem_numpy(x, p=3), ref, rtol=1e-5)
    np.testing.assert_allclose(pool_torch(torch.from_numpy(x), Pooling("gem", 3.0)).numpy(), ref,
                               rtol=1e-5)
    np.testing.assert_allclose(pool_torch(torch.from_numpy(x), Pooling("mean")).numpy(),
                               x.mean(axis=(2, 3)), rtol=1e-6)


@pytest.mark.parametrize("name", ["effnet-lite0", "effnet-lite2"])
def test_onnx_runtime_matches_torch(name, images):
    a = create_extractor(name, runtime="torch").embed_images(images)
    b = create_extractor(name, runtime="onnx").embed_images(images)
    assert a.shape == (len(images), 1280)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_effnet_weights_are_the_imagenet_ones(images):
    """The backbone + its ImageNet classifier recognise the cat and the coffee cup."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from galleria.extractors import effnet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(effnet.weights_path("effnet-lite0"), weights_only=True))
    net.eval()
    pre = Preprocessing(size=(224, 224), resize="crop", crop_pct=0.875,
                        mean=effnet.LITE_MEAN, std=effnet.LITE_STD)
    names = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "retina", "rocket"]
    by_name = dict(zip(names, images, strict=True))
    with torch.no_grad():
        cat = net(torch.from_numpy(pre(by_name["chelsea"])[None])).argmax().item()
        cup = net(torch.from_numpy(pre(by_name["coffee"])[None])).argmax().item()
    assert cat in (281, 282, 283, 284, 285)  # ImageNet cat classes
    assert cup in (967, 968, 504)  # espresso, cup, coffee mug


def test_opennsfw_pooled_graph_matches_numpy_gem(images, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from galleria.extractors import opennsfw

    ext = create_extractor("opennsfw-r50")
    emb = ext.embed_images(images[:3])
    assert emb.shape == (3, 1024)
    # reference: expose the raw feature map of the packaged graph and pool in numpy
    model = onnx.load(str(opennsfw.model_path()))
    model.graph.output.append(helper.make_empty_tensor_value_info(opennsfw.FEATURE_MAP))
    path = tmp_path / "raw.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.stack([ext.preprocessing(im) for im in images[:3]])
    fmap = sess.run([opennsfw.FEATURE_MAP], {opennsfw.INPUT: x})[0]
    ref = gem_numpy(fmap, p=3.0)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-4)


def test_fingerprints_identify_weights_and_settings():
    a = create_extractor("effnet-lite0")
    assert a.fingerprint == create_extractor("effnet-lite0", runtime="torch").fingerprint
    others = {
        create_extractor("effnet-lite0", pooling="mean").fingerprint,
        create_extractor("effnet-lite0", pooling="gem4").fingerprint,
        create_extractor("effnet-lite0", scales=(1.0, 0.707)).fingerprint,
        create_extractor("effnet-lite2").fingerprint,
    }
    assert a.fingerprint not in others and len(others) == 4
    assert a.fingerprint.startswith("effnet-lite0-gem3-224@")


def test_multiscale(images):
    ms = create_extractor("effnet-lite0", scales=(1.0, 0.75), runtime="torch")
    v = ms.embed_images(images[:2])
    single = create_extractor("effnet-lite0", runtime="torch").embed_images(images[:2])
    assert v.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert (v * single).sum(1).min() > 0.9 and not np.allclose(v, single)


def test_export_onnx_roundtrip(tmp_path, images):
    ext = create_extractor("effnet-lite0", runtime="torch")
    path = ext.export_onnx(tmp_path / "q.onnx")
    loaded = create_extractor(f"onnx:{path}")
    assert loaded.fingerprint == ext.fingerprint
    np.testing.assert_allclose(loaded.embed_images(images[:2]), ext.embed_images(images[:2]),
                               atol=1e-4)
    with pytest.raises(InputError, match="multi-scale"):
        create_extractor("effnet-lite0", scales=(1, 0.5), runtime="torch").export_onnx(
            tmp_path / "ms.onnx")
    with pytest.raises(MissingDependencyError):
        create_extractor(f"onnx:{tmp_path / 'missing.onnx'}")


def test_user_weight_families_fail_clearly_without_weights(tmp_path):
    with pytest.raises(MissingDependencyError, match="checkpoint"):
        create_extractor("timm:resnet18")
    with pytest.raises(MissingDependencyError, match="does not exist"):
        create_extractor("dinov2:vits14", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(InputError, match="unknown DINOv2"):
        create_extractor("dinov2:vit_huge", checkpoint=str(tmp_path / "nope.pth"))


def test_user_weight_families_fail_clearly_without_package(tmp_path):
    try:
        import timm  # noqa: F401

        pytest.skip("timm is importable here; this checks the message when it is not")
    except ImportError:
        pass
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"0")
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        create_extractor("timm:resnet18", checkpoint=str(ckpt))


@pytest.mark.parametrize("name,arch,size", [("effnet-lite0", "efficientnet-lite0", 224),
                                             ("effnet-lite2", "efficientnet-lite2", 260)])
def test_effnet_embedding_matches_plain_reference(name, arch, size, images):
    """Against an independent plain pipeline: the package's own from_pretrained model,
    squash-resize, (x-127)/128, GeM p=3 on extract_features, L2."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from galleria.extractors import effnet

    net = EfficientNet.from_pretrained(arch, weights_path=effnet.weights_path(name)).eval()
    batch = []
    for im in images[:3]:
        a = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), np.float32)
        batch.append(((a - 127.0) / 128.0).transpose(2, 0, 1))
    with torch.no_grad():
        f = net.extract_features(torch.from_numpy(np.stack(batch))).clamp(min=1e-6)
        ref = torch.nn.functional.normalize(f.pow(3).mean((2, 3)).pow(1 / 3), dim=1).numpy()
    got = create_extractor(name).embed_images(images[:3])
    np.testing.assert_allclose(got, ref, atol=2e-4)

"""timm / DINOv2 / CLIP adapters with checkpoints built locally (never downloaded).

These need timm and open_clip, which need torchvision; run them with
``make test-adapters`` (a second environment: torch 2.14.1 + torchvision 0.29.1).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.adapters

timm = pytest.importorskip("timm", reason="timm is not importable in this environment")
torch = pytest.importorskip("torch")

from galleria.errors import MissingDependencyError  # noqa: E402
from galleria.extractors.registry import create_extractor  # noqa: E402


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8))


def _reference(model, pre, image, fn):
    x = torch.from_numpy(pre(image)[None])
    with torch.no_grad():
        v = fn(model, x).numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_timm_cnn_from_local_checkpoint(tmp_path, image):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    ckpt = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), ckpt)
    ext = create_extractor("timm:resnet18", checkpoint=str(ckpt))
    assert ext.dim == 512 and ext.fingerprint.startswith("timm:resnet18-gem3-224@")
    ref = _reference(model, ext.preprocessing, image,
                     lambda m, x: m.forward_features(x).clamp(min=1e-6).pow(3).mean((2, 3))
                     .pow(1 / 3))
    np.testing.assert_allclose(ext.embed_images([image]), ref, atol=1e-5)
    # the same weights as safetensors give the same fingerprint-independent output
    from safetensors.torch import save_file

    st = tmp_path / "resnet18.safetensors"
    save_file(model.state_dict(), str(st))
    np.testing.assert_allclose(
        create_extractor("timm:resnet18", checkpoint=str(st)).embed_images([image]), ref, atol=1e-5
    )
    # and it exports to ONNX for the light query side
    onnx_ext = create_extractor("timm:resnet18", checkpoint=str(ckpt), runtime="onnx")
    np.testing.assert_allclose(onnx_ext.embed_images([image]), ref, atol=1e-4)


def test_timm_wrong_checkpoint_is_a_clear_error(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    ckpt = tmp_path / "r18.pth"
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(MissingDependencyError, match="does not fit timm 'resnet34'"):
        create_extractor("timm:resnet34", checkpoint=str(ckpt))


def test_dinov2_official_format_checkpoint(tmp_path, image):
    """A checkpoint in the facebookresearch layout (518 px position grid, mask_token)."""
    torch.manual_seed(0)
    official = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                 img_size=518)
    state = official.state_dict()
    state["mask_token"] = torch.zeros(1, 384)
    ckpt = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, ckpt)
    ext = create_extractor("dinov2:vits14", checkpoint=str(ckpt))
    assert ext.dim == 384 and ext.preprocessing.size == (224, 224)
    # reference: timm's own model at 224 px with the same (resampled) weights
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref_model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  img_size=224).eval()
    ref_model.load_state_dict(checkpoint_filter_fn(dict(state), ref_model))
    ref = _reference(ref_model, ext.preprocessing, image,
                     lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
    np.testing.assert_allclose(ext.embed_images([image]), ref, atol=1e-5)
    with pytest.raises(MissingDependencyError, match="not a DINOv2 vitb14"):
        create_extractor("dinov2:vitb14", checkpoint=str(ckpt))


def test_clip_from_local_checkpoint(tmp_path, image):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    ckpt = tmp_path / "vit-s-32.pt"
    torch.save(model.state_dict(), ckpt)
    ext = create_extractor("clip:ViT-S-32", checkpoint=str(ckpt))
    ref = _reference(model, ext.preprocessing, image, lambda m, x: m.encode_image(x))
    np.testing.assert_allclose(ext.embed_images([image]), ref, atol=1e-5)
    assert ext.fingerprint.startswith("clip:ViT-S-32-model-224@")

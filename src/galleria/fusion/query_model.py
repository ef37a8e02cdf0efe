"""The light query model: EfficientNet-Lite0 trunk + GeM + a whitening layer to ``d``.

The network is split in two (sized for a 2-core CPU): the *trunk* (stem and the
first MBConv blocks) is frozen and its output on every training view is computed
once and cached (:mod:`galleria.fusion.data`); the *tail* (the last
``train_blocks`` MBConv blocks, the 1x1 head convolution, GeM and the whitening
layer ``Linear(1280, d)``) is trained. ``train_blocks = -1`` freezes the head too:
the cache then holds the GeM-pooled 1280-d vector and only the whitening layer is
trained. Batch-norm layers keep their ImageNet statistics (eval mode) in training:
the batches are small and the trunk statistics are what the frozen part produces.

At query time trunk and tail run as one ONNX graph (:func:`export_onnx`): image
``(B, 3, 224, 224)`` (Lite preprocessing) -> ``(B, d)`` L2-normalised.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from galleria.errors import InputError
from galleria.extractors import effnet
from galleria.extractors.pooling import Pooling, pool_torch
from galleria.extractors.torch_model import export_module_onnx, ort_session
from galleria.fingerprint import file_sha256
from galleria.fusion.recipe import N_BLOCKS, check_train_blocks
from galleria.transforms.whiten import learn_pca

TRUNK_MODELS = ("effnet-lite0",)
HEAD_DIM = 1280


def _net(variant: str) -> Any:
    if variant not in TRUNK_MODELS:
        raise InputError(f"query model must be one of {TRUNK_MODELS}, not {variant!r}")
    return effnet._backbone(variant, effnet.weights_path(variant)).net


def query_weights_id(variant: str) -> str:
    """SHA-256 of the pretrained weights the trunk comes from."""

    return file_sha256(effnet.weights_path(variant))


class Trunk(nn.Module):
    """Frozen part: stem + MBConv blocks ``[0, split)`` (+ head + GeM when ``train_blocks=-1``)."""

    def __init__(self, net: Any, train_blocks: int, pooling: Pooling) -> None:
        super().__init__()
        tb = check_train_blocks(train_blocks)
        split = N_BLOCKS - max(tb, 0)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[:split])
        self.with_head = tb < 0
        self.pooling = pooling
        if self.with_head:
            self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Trunk:  # always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        if self.with_head:
            x = pool_torch(self.head(x), self.pooling)
        return x


class QueryTail(nn.Module):
    """Trained part: MBConv blocks ``[split, 16)``, head, GeM, whitening; output ``(B, d)``.

    ``forward`` returns the whitened vector, not normalised (ArcFace normalises;
    :class:`QueryNet` normalises for retrieval). ``normalize``: L2-normalise the pooled
    features before the whitening layer (models trained before it existed: False).
    """

    def __init__(self, net: Any, train_blocks: int, d: int, pooling: Pooling,
                 normalize: bool = False) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        tb = check_train_blocks(train_blocks)
        self.train_blocks = tb
        self.pooling = pooling
        self.blocks = nn.ModuleList(net._blocks[N_BLOCKS - tb:] if tb > 0 else [])
        self.has_head = tb >= 0
        if self.has_head:
            self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.whiten = nn.Linear(HEAD_DIM, d)

    def train(self, mode: bool = True) -> QueryTail:
        super().train(mode)
        for m in self.modules():  # keep the ImageNet batch-norm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Cached trunk output -> ``(B, 1280)`` GeM-pooled head features (L2-normalised when
        ``normalize``): the whitening layer's input."""
        if self.has_head:
            for b in self.blocks:
                x = b(x)
            x = pool_torch(self.head(x), self.pooling)
        return nn.functional.normalize(x, dim=1) if self.normalize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whiten(self.pooled(x))


class QueryNet(nn.Module):
    """Trunk + tail + L2 normalisation: what is exported to ONNX."""

    def __init__(self, trunk: Trunk, tail: QueryTail) -> None:
        super().__init__()
        self.trunk = trunk
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.tail(self.trunk(x)), dim=1)


class LightNet(nn.Module):
    """Trunk + tail up to the pooled features, L2-normalised: the light model's own
    ``(B, 1280)`` vectors (the whitening layer's input; what gallery adaptation maps)."""

    def __init__(self, trunk: Trunk, tail: QueryTail) -> None:
        super().__init__()
        self.trunk = trunk
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.tail.pooled(self.trunk(x)), dim=1)


def build(variant: str, train_blocks: int, d: int, *, pooling: Pooling | None = None,
          normalize: bool = False) -> tuple[Trunk, QueryTail]:
    """Pretrained trunk and tail (the tail's whitening layer randomly initialised;
    ``normalize``: see :class:`QueryTail`)."""
    if d < 1:
        raise InputError(f"d must be >= 1, got {d}")
    pooling = pooling or Pooling("gem", 3.0)
    net = _net(variant)
    trunk = Trunk(net, train_blocks, pooling)
    tail = QueryTail(copy.deepcopy(net), train_blocks, d, pooling, normalize)
    return trunk, tail


@torch.no_grad()
def init_whitening(tail: QueryTail, pooled: np.ndarray, *, shrink: float = 1.0) -> None:
    """Initialise ``tail.whiten`` as a (shrunk) PCA-whitening of ``(N, 1280)`` pooled features.

    Rows beyond the data's rank start as small random projections.
    """
    x = np.asarray(pooled, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[0] > 1:  # the library's PCA (covariance over N - 1, sign-fixed eigenvectors)
        mu, lam, comps = learn_pca(x)
        vec = comps.T
    else:
        mu, lam, vec = x.mean(0), np.ones(x.shape[1]), np.eye(x.shape[1])[:, ::-1]
    d = tail.whiten.out_features
    k = min(d, x.shape[1], max(1, x.shape[0] - 1))
    w = np.zeros((d, x.shape[1]))
    w[:k] = (vec[:, :k] / np.sqrt(lam[:k] + shrink * lam[:k].mean() + 1e-12)).T
    if k < d:
        w[k:] = np.random.default_rng(0).standard_normal((d - k, x.shape[1])) * 0.01
    # the tail sees unnormalised pooled features: fold the normalisation scale in
    scale = float(np.median(np.linalg.norm(np.asarray(pooled, np.float64), axis=1)))
    tail.whiten.weight.copy_(torch.from_numpy((w / max(scale, 1e-12)).astype(np.float32)))
    tail.whiten.bias.copy_(torch.from_numpy((-(w @ mu)).astype(np.float32)))


@torch.no_grad()
def init_regression(tail: QueryTail, pooled: np.ndarray, targets: np.ndarray, *,
                    ridge: float = 1e-3) -> float:
    """Initialise ``tail.whiten`` as the ridge regression of ``targets`` on ``pooled``.

    Args:
        pooled: ``(M, 1280)`` pooled head features of training views (the whitening
            layer's input, unnormalised).
        targets: ``(M, d)`` what each view should map to (the mixer's L2-normalised
            output on its image).
        ridge: ``lambda`` relative to the mean eigenvalue of the features' covariance.

    Returns:
        the mean cosine between the fitted outputs and the targets (on these rows).
    """
    x = np.asarray(pooled, np.float64)
    t = np.asarray(targets, np.float64)
    if x.ndim != 2 or t.ndim != 2 or x.shape[0] != t.shape[0]:
        raise InputError(f"pooled {x.shape} and targets {t.shape} must be (M, D) and (M, d)")
    if t.shape[1] != tail.whiten.out_features or x.shape[1] != tail.whiten.in_features:
        raise InputError(f"regression to ({tail.whiten.in_features} -> "
                         f"{tail.whiten.out_features}) given {x.shape} -> {t.shape}")
    mx, mt = x.mean(0), t.mean(0)
    xc, tc = x - mx, t - mt
    gram = xc.T @ xc
    lam = ridge * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ tc)  # (D, d)
    b = mt - mx @ w
    tail.whiten.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
    tail.whiten.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    fit = x @ w + b
    cos = (fit * t).sum(1) / np.maximum(np.linalg.norm(fit, axis=1) * np.linalg.norm(t, axis=1),
                                        1e-12)
    return float(cos.mean())


def export_onnx(trunk: Trunk, tail: QueryTail, path: str | os.PathLike[str], size: int = 224
                ) -> None:
    """Write trunk + tail as one ONNX graph ``images (B,3,S,S) -> embedding (B,d)``, atomically."""

    was = tail.training
    net = QueryNet(trunk, tail).eval()
    try:
        export_module_onnx(net, path, np.zeros((1, 3, size, size), np.float32))
    finally:
        tail.train(was)


def trunk_runner(trunk: Trunk, path: str | os.PathLike[str], *, threads: int | None = None,
                 micro_batch: int = 2, size: int = 224) -> Any:
    """``fn((B, 3, S, S) float32) -> (B, *trunk_out)``: the frozen trunk on ONNX Runtime.

    The trunk is exported to ``path`` once (reused when present). Measured on this
    2-core machine: ONNX Runtime 13 ms per image at micro-batches of 2 against
    130-500 ms for the eager torch module (dynamic 'same' padding in every conv).
    """

    p = Path(path)
    if not p.is_file():
        export_module_onnx(trunk, p, np.zeros((1, 3, size, size), np.float32))
    sess = ort_session(p, threads=threads)

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        parts = [sess.run(None, {"images": x[i:i + micro_batch]})[0]
                 for i in range(0, len(x), micro_batch)]
        return np.concatenate(parts)

    return run

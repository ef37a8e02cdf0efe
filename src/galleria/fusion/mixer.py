"""The gallery-side mixer: several frozen features of one image -> one compact vector.

AFF (docs/methods.md, AFF, paper eqs. 3-8): K global features ``g_i (D_i,)`` and
M local feature sets ``l_i (n_i, d_i)`` are each projected by their own linear
layer to ``d``, stacked into a sequence ``F (N, d)``, a learnable fusion token is
prepended and C post-LN transformer layers (multi-head self-attention, GELU MLP
of width ``2d``) process it; the output fusion token is the gallery vector.

Inputs are a list of tensors in the order of the :class:`InputSpec` list:
``(B, D_i)`` for a global input, ``(B, n_i, d_i)`` for a local set whose padding
rows are all-zero (masked out of the attention; see
:func:`galleria.fusion.data.pack_local`). There is no positional or type
embedding (as in the paper): the output does not change when the local rows of a
set are permuted, nor when the inputs are reordered together with their
projections.

:class:`MLPMixer` is the paper's simple baseline (Fig. 4a): concatenation (local
sets mean-pooled) followed by two fully-connected layers.

:class:`AnchoredMixer` (galleria's variant, ``anchor=True``) adds either mixer to
a fixed linear *anchor*, ``out = A (concat - mu) + gate * mixer(inputs)`` with
``A`` a closed-form projection of the training images' concatenated features
(:mod:`galleria.fusion.anchor`: PCA, or learned whitening with input selection on
held-out classes) and ``gate`` a learned scalar starting at 0: training starts from
that linear fusion instead of a random projection, and (with a
held-out split) early stopping keeps the start unless a trained epoch scores
better on the held-out classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from galleria.errors import CompatibilityError, InputError
from galleria.fusion.anchor import pca_projection

MIXER_KINDS = ("transformer", "mlp")


@dataclass(frozen=True)
class InputSpec:
    """One mixer input: a member model's feature.

    Attributes:
        name: the member's display name (e.g. ``effnet-lite2``).
        fingerprint: the member extractor's fingerprint (the feature-store space).
        kind: ``global`` (one ``(D,)`` vector per image) or ``local`` (a set of at most
            ``top_n`` descriptors of dimension ``dim``).
        dim: ``D`` (global) or the descriptor dimension ``d_i`` (local).
        top_n: descriptors kept per image (local); 1 for a global input.
    """

    name: str
    fingerprint: str
    kind: str
    dim: int
    top_n: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("global", "local"):
            raise InputError(f"input kind must be global or local, not {self.kind!r}")
        if self.dim < 1 or self.top_n < 1:
            raise InputError(f"input {self.name!r}: dim and top_n must be >= 1")

    @property
    def stored_dim(self) -> int:
        """Width of the stored (packed) vector: ``dim`` or ``top_n * dim``."""
        return self.dim * (self.top_n if self.kind == "local" else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(**{k: d[k] for k in ("name", "fingerprint", "kind", "dim", "top_n")})


def check_inputs(trained: Sequence[InputSpec], given: Sequence[InputSpec]) -> None:
    """Raise :class:`CompatibilityError` naming both lists unless they match exactly."""
    def show(specs: Sequence[InputSpec]) -> str:
        return ", ".join(f"{s.fingerprint} ({s.kind}, {s.stored_dim}-d)" for s in specs)

    a = [(s.fingerprint, s.kind, s.dim, s.top_n) for s in trained]
    b = [(s.fingerprint, s.kind, s.dim, s.top_n) for s in given]
    if a != b:
        raise CompatibilityError(
            f"this mixer was trained for the member features [{show(trained)}] but was given "
            f"[{show(given)}]; train a fusion model for these members (galleria fusion train)"
        )


def _split_tokens(spec: InputSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One input batch -> ``(B, n, dim)`` rows and ``(B, n)`` padding mask (True = pad)."""
    if spec.kind == "global":
        if x.ndim != 2 or x.shape[1] != spec.dim:
            raise InputError(f"input {spec.name!r}: expected (B, {spec.dim}), got {tuple(x.shape)}")
        return x[:, None, :], torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
    if x.ndim != 3 or x.shape[2] != spec.dim or x.shape[1] > spec.top_n:
        raise InputError(
            f"input {spec.name!r}: expected (B, <= {spec.top_n}, {spec.dim}), got {tuple(x.shape)}"
        )
    return x, x.abs().sum(dim=2) == 0


class TransformerMixer(nn.Module):
    """Per-input projections, a fusion token and ``layers`` post-LN transformer layers.

    Args:
        specs: the inputs, in order.
        d: output (and token) dimension.
        layers: number of transformer layers (C).
        heads: attention heads (must divide ``d``).
        dropout: dropout inside the layers (0: the training is then fully determined
            by the seed and the data order).
    """

    def __init__(self, specs: Sequence[InputSpec], *, d: int = 512, layers: int = 4,
                 heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if not specs:
            raise InputError("a mixer needs at least one input")
        if d % heads:
            raise InputError(f"heads ({heads}) must divide d ({d})")
        self.specs = list(specs)
        self.d = int(d)
        self.proj = nn.ModuleList(nn.Linear(s.dim, d) for s in specs)
        self.token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=2 * d, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inputs (see the module docstring) -> ``(B, d)`` fusion-token outputs (not normalised)."""
        if len(inputs) != len(self.specs):
            raise InputError(f"mixer takes {len(self.specs)} inputs, got {len(inputs)}")
        b = inputs[0].shape[0]
        tokens = [self.token.expand(b, -1, -1)]
        pads = [torch.zeros(b, 1, dtype=torch.bool, device=self.token.device)]
        for spec, x, proj in zip(self.specs, inputs, self.proj, strict=True):
            rows, pad = _split_tokens(spec, x)
            tokens.append(proj(rows))
            pads.append(pad)
        z = self.encoder(torch.cat(tokens, dim=1), src_key_padding_mask=torch.cat(pads, dim=1))
        return z[:, 0]


def concat_inputs(specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, sum dim_i)``: the inputs side by side, each local set mean-pooled over its rows."""
    parts = []
    for spec, x in zip(specs, inputs, strict=True):
        rows, pad = _split_tokens(spec, x)
        keep = (~pad).to(rows.dtype)[:, :, None]
        parts.append((rows * keep).sum(1) / keep.sum(1).clamp_min(1.0))
    return torch.cat(parts, dim=1)


class MLPMixer(nn.Module):
    """Baseline: concatenate the inputs (local sets mean-pooled), two linear layers (GELU)."""

    def __init__(self, specs: Sequence[InputSpec], *, d: int = 512, hidden: int | None = None
                 ) -> None:
        super().__init__()
        if not specs:
            raise InputError("a mixer needs at least one input")
        self.specs = list(specs)
        self.d = int(d)
        width = sum(s.dim for s in specs)
        self.net = nn.Sequential(nn.Linear(width, hidden or 2 * d), nn.GELU(),
                                 nn.Linear(hidden or 2 * d, d))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != len(self.specs):
            raise InputError(f"mixer takes {len(self.specs)} inputs, got {len(inputs)}")
        return self.net(concat_inputs(self.specs, inputs))


class AnchoredMixer(nn.Module):
    """``A (concat(inputs) - mu) + gate * inner(inputs)`` (see the module docstring).

    ``mu (W,)`` and ``A (d, W)`` (``W = sum dim_i``) are buffers, not trained: they
    are set once by :meth:`set_anchor` (PCA of the training features) and saved
    with the weights. ``gate`` starts at 0, so a new mixer outputs the anchor.
    """

    def __init__(self, inner: nn.Module, specs: Sequence[InputSpec], *, d: int) -> None:
        super().__init__()
        self.inner = inner
        self.specs = list(specs)
        self.d = int(d)
        width = sum(s.dim for s in self.specs)
        self.register_buffer("anchor_mean", torch.zeros(width))
        self.register_buffer("anchor_proj", torch.zeros(self.d, width))
        self.register_buffer("anchor_fitted", torch.zeros((), dtype=torch.bool))
        self.gate = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def set_anchor(self, features: Sequence[np.ndarray]) -> None:
        """Fit the anchor: top-``d`` principal components of the concatenated ``features``.

        ``features``: stored member features of the training images, one ``(N,
        stored_dim)`` array per input. Components beyond the data's rank are kept (as the
        concatenation + PCA baseline). Other anchors: :meth:`set_projection`.
        """

        x = concat_inputs(self.specs, as_mixer_inputs(self.specs, features)).double().numpy()
        self.set_projection(*pca_projection(x, self.d))

    @torch.no_grad()
    def set_projection(self, mean: np.ndarray, proj: np.ndarray) -> None:
        """Anchor ``proj (d, W) @ (concat - mean (W,))`` (:mod:`galleria.fusion.anchor`)."""
        width = self.anchor_mean.shape[0]
        if np.shape(mean) != (width,) or np.shape(proj) != (self.d, width):
            raise InputError(f"anchor of this mixer is ({self.d}, {width}); got mean "
                             f"{np.shape(mean)} and projection {np.shape(proj)}")
        self.anchor_mean.copy_(torch.from_numpy(np.asarray(mean, np.float32)))
        self.anchor_proj.copy_(torch.from_numpy(np.asarray(proj, np.float32)))
        self.anchor_fitted.fill_(True)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != len(self.specs):
            raise InputError(f"mixer takes {len(self.specs)} inputs, got {len(inputs)}")
        if not bool(self.anchor_fitted):
            raise InputError("this anchored mixer's anchor was never fitted (set_anchor)")
        base = (concat_inputs(self.specs, inputs) - self.anchor_mean) @ self.anchor_proj.T
        return base + self.gate * self.inner(inputs)


def build_mixer(kind: str, specs: Sequence[InputSpec], *, d: int, layers: int = 4,
                heads: int = 8, anchor: bool = False) -> nn.Module:
    """``kind`` is ``transformer`` (the AFF mixer) or ``mlp`` (the baseline).

    ``anchor``: wrap it in an :class:`AnchoredMixer` (its anchor still to be fitted).
    """
    if kind == "transformer":
        inner: nn.Module = TransformerMixer(specs, d=d, layers=layers, heads=heads)
    elif kind == "mlp":
        inner = MLPMixer(specs, d=d)
    else:
        raise InputError(f"mixer kind must be one of {MIXER_KINDS}, not {kind!r}")
    return AnchoredMixer(inner, specs, d=d) if anchor else inner


def as_mixer_inputs(specs: Sequence[InputSpec], stored: Sequence[np.ndarray]
                    ) -> list[torch.Tensor]:
    """Stored ``(B, stored_dim)`` arrays -> mixer input tensors (local sets unpacked)."""
    out = []
    for spec, x in zip(specs, stored, strict=True):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if t.ndim != 2 or t.shape[1] != spec.stored_dim:
            raise InputError(f"input {spec.name!r}: stored vectors must be (B, "
                             f"{spec.stored_dim}), got {tuple(t.shape)}")
        if spec.kind == "local":
            t = t.reshape(t.shape[0], spec.top_n, spec.dim)
            t = torch.nn.functional.normalize(t, dim=2)  # packing scaled the rows; zero rows stay 0
        out.append(t)
    return out


@torch.no_grad()
def mix(mixer: nn.Module, stored: Sequence[np.ndarray], *, batch: int = 256) -> np.ndarray:
    """Stored member features (one ``(N, stored_dim)`` array per input) -> ``(N, d)`` L2-normalised.

    The mixer runs in eval mode; nothing is changed on it.
    """
    specs = mixer.specs  # type: ignore[attr-defined]
    if len(stored) != len(specs):
        raise InputError(f"mixer takes {len(specs)} inputs, got {len(stored)}")
    n = int(stored[0].shape[0])
    if any(int(x.shape[0]) != n for x in stored):
        raise InputError(f"inputs have different row counts: {[x.shape[0] for x in stored]}")
    was = mixer.training
    mixer.eval()
    outs = []
    try:
        for s in range(0, n, batch):
            ins = as_mixer_inputs(specs, [x[s:s + batch] for x in stored])
            outs.append(torch.nn.functional.normalize(mixer(ins), dim=1).numpy())
    finally:
        mixer.train(was)
    return np.concatenate(outs) if outs else np.zeros((0, mixer.d), np.float32)  # type: ignore[attr-defined]

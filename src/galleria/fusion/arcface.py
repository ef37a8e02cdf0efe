"""ArcFace (additive angular margin) loss and the momentum classifier update (pure functions).

ArcFace (Deng et al., CVPR 2019), as used by asymmetric feature fusion (AFF,
docs/methods.md, AFF, eqs. 9-11): for an embedding ``x`` with label ``y`` and a
classifier ``W`` (one prototype per class),

``cos_j = <x / |x|, W_j / |W_j|>``,
``logit_y = s * cos(theta_y + m)``, ``logit_j = s * cos_j`` for ``j != y``,
``loss = cross_entropy(logits, y)``.

When ``theta_y + m`` would pass pi the target logit is ``s * (cos_y - m sin m)``
instead (the usual monotonic continuation, insightface ``easy_margin=False``),
so the loss keeps decreasing in ``theta_y`` everywhere.

The query classifier is not trained by gradient: ``W_q <- a W_q + (1 - a) W_mix``
after every step (:func:`momentum_update_`).
"""

from __future__ import annotations

import math

import torch

from galleria.errors import InputError


def arcface_logits(
    cos: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.3, scale: float = 32.0
) -> torch.Tensor:
    """``(B, N)`` cosines and ``(B,)`` int64 labels -> ``(B, N)`` ArcFace logits."""
    if cos.ndim != 2 or labels.shape != (cos.shape[0],):
        raise InputError(f"arcface needs (B, N) cosines and (B,) labels; got {tuple(cos.shape)} "
                         f"and {tuple(labels.shape)}")
    c = cos.clamp(-1.0, 1.0)
    tgt = c.gather(1, labels[:, None])
    sin = torch.sqrt((1.0 - tgt * tgt).clamp_min(1e-12))
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    phi = tgt * cos_m - sin * sin_m  # cos(theta + m)
    th = math.cos(math.pi - margin)
    phi = torch.where(tgt > th, phi, tgt - math.sin(math.pi - margin) * margin)
    out = c.scatter(1, labels[:, None], phi)
    return scale * out


def cosine_matrix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B, d)`` embeddings and ``(N, d)`` prototypes -> ``(B, N)`` cosines."""
    return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T


def arcface_loss(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.3,
    scale: float = 32.0,
) -> torch.Tensor:
    """Mean ArcFace loss of ``(B, d)`` embeddings against ``(N, d)`` class prototypes."""
    logits = arcface_logits(cosine_matrix(x, weight), labels, margin=margin, scale=scale)
    return torch.nn.functional.cross_entropy(logits, labels)


@torch.no_grad()
def momentum_update_(w_q: torch.Tensor, w_mix: torch.Tensor, momentum: float) -> None:
    """In place ``w_q <- a * w_q + (1 - a) * w_mix`` (``a = momentum`` in ``[0, 1)``)."""
    if not 0.0 <= momentum < 1.0:
        raise InputError(f"momentum must be in [0, 1), got {momentum}")
    if w_q.shape != w_mix.shape:
        raise InputError(f"classifier shapes differ: {tuple(w_q.shape)} vs {tuple(w_mix.shape)}")
    w_q.mul_(momentum).add_(w_mix.detach(), alpha=1.0 - momentum)


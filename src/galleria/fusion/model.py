"""The fusion artifact: member configs, the mixer and the light query model, one fingerprint.

Layout of a fusion model folder ``F``::

    header.json         {type: fusion-model, format_version, params, fingerprint, members,
                         weights digests, training summary}
    mixer.safetensors   the mixer's weights
    query.safetensors   the trained query tail (blocks, head, whitening)
    query.onnx          trunk + tail as one graph (what answers queries)

The fingerprint is ``fusion-<d>@<digest>`` over every member's fingerprint, the
mixer and query parameters and a digest of both weight sets: the gallery-side
and the query-side extractor built from ``F`` share it, so a gallery indexed
through the mixer accepts exactly the queries of this light model. Loading
recomputes the weight digests and the ONNX graph's SHA-256 and refuses a
mismatch (an edited or half-copied folder).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from galleria.errors import CompatibilityError, FormatError
from galleria.extractors.pooling import Pooling
from galleria.fingerprint import digest, file_sha256, make_fingerprint
from galleria.fusion.mixer import InputSpec, build_mixer, check_inputs, mix
from galleria.fusion.query_model import QueryTail, Trunk, build, export_onnx, query_weights_id
from galleria.io.artifact import load_header, make_header, save_header
from galleria.io.atomic import write_bytes

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "fusion-model"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
MIXER_FILE = "mixer.safetensors"
QUERY_FILE = "query.safetensors"
ONNX_FILE = "query.onnx"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, shapes and exact values."""
    parts = []
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        parts.append([k, list(v.shape), str(v.dtype)])
        parts.append(v.numpy().tobytes())
    return digest(*parts)


class FusionModel:
    """A trained fusion model (see the module docstring).

    Args:
        members: per member ``{"config": ext.config(), "fingerprint": fp}``, in input order.
        specs: the mixer inputs (one per member).
        mixer: the trained mixer module.
        mixer_params: ``{"kind", "d", "layers", "heads"[, "anchor"]}`` (rebuilds the module).
        tail: the trained query tail.
        query_params: ``{"model", "train_blocks", "d", "size", "weights_id", "pooling",
            "normalize"}`` (:meth:`galleria.fusion.train.FusionRecipe.query_params`).
        recipe: the training recipe (recorded).
        training: a JSON summary of the training run (recorded, not fingerprinted).
    """

    def __init__(self, *, members: Sequence[dict[str, Any]], specs: Sequence[InputSpec],
                 mixer: torch.nn.Module, mixer_params: dict[str, Any], tail: QueryTail,
                 query_params: dict[str, Any], recipe: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None) -> None:
        if len(members) != len(specs):
            raise FormatError(f"{len(members)} members but {len(specs)} mixer inputs")
        for m, s in zip(members, specs, strict=True):
            if m["fingerprint"] != s.fingerprint:
                raise FormatError(f"member {m['fingerprint']!r} does not match its mixer input "
                                  f"{s.fingerprint!r}")
        self.members = [dict(m) for m in members]
        self.specs = list(specs)
        self.mixer = mixer.eval()
        self.mixer_params = dict(mixer_params)
        self.tail = tail.eval()
        self.query_params = dict(query_params)
        self.recipe = dict(recipe or {})
        self.training = dict(training or {})
        self.path: Path | None = None
        self._digests = (state_digest(self.mixer.state_dict()),
                         state_digest(self.tail.state_dict()))

    @property
    def dim(self) -> int:
        return int(self.mixer_params["d"])

    @property
    def fingerprint(self) -> str:
        return make_fingerprint(
            f"fusion-{self.dim}", [m["fingerprint"] for m in self.members],
            [s.to_dict() for s in self.specs], self.mixer_params, self.query_params,
            *self._digests,
        )

    # ------------------------------------------------------------------ using
    def check_members(self, specs: Sequence[InputSpec]) -> None:
        """Refuse (naming both) features of other members or dimensions."""
        check_inputs(self.specs, specs)

    def mix(self, features: Sequence[np.ndarray], *, specs: Sequence[InputSpec] | None = None,
            batch: int = 256) -> np.ndarray:
        """Member features (one ``(N, stored_dim)`` array per member) -> ``(N, d)`` fused."""
        if specs is not None:
            self.check_members(specs)
        elif len(features) != len(self.specs):
            raise CompatibilityError(
                f"this mixer takes {len(self.specs)} member features "
                f"({', '.join(s.fingerprint for s in self.specs)}), got {len(features)}")
        for s, f in zip(self.specs, features, strict=True):
            if f.ndim != 2 or f.shape[1] != s.stored_dim:
                raise CompatibilityError(
                    f"member {s.fingerprint!r} gives {s.stored_dim}-d features to this mixer; "
                    f"got {tuple(f.shape)}")
        return mix(self.mixer, features, batch=batch)

    def trunk(self) -> Trunk:
        """The frozen query trunk, rebuilt from the pretrained weights (weights id checked)."""

        wid = query_weights_id(self.query_params["model"])
        if wid != self.query_params["weights_id"]:
            raise CompatibilityError(
                f"the installed {self.query_params['model']} weights ({wid[:16]}) are not the "
                f"ones this query model was trained on ({self.query_params['weights_id'][:16]})")
        return build(self.query_params["model"], int(self.query_params["train_blocks"]),
                     self.dim)[0]

    # ------------------------------------------------------------------ disk
    def header(self) -> dict[str, Any]:
        return make_header(
            type=ARTIFACT_TYPE, format_version=FORMAT_VERSION,
            params={"mixer": self.mixer_params, "query": self.query_params,
                    "recipe": self.recipe},
            fingerprint=self.fingerprint,
            members=[{**m, "input": s.to_dict()} for m, s in zip(self.members, self.specs,
                                                                  strict=True)],
            weights={"mixer": self._digests[0], "query": self._digests[1]},
            training=self.training,
        )

    def save(self, folder: str | os.PathLike[str], *, trunk: Trunk | None = None) -> Path:
        """Write the folder (weights, ONNX graph, then the header last)."""
        from safetensors.torch import save  # lazy: safetensors

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(out / MIXER_FILE, save({k: v.contiguous() for k, v in
                                             self.mixer.state_dict().items()}))
        write_bytes(out / QUERY_FILE, save({k: v.contiguous() for k, v in
                                             self.tail.state_dict().items()}))
        export_onnx(trunk or self.trunk(), self.tail, out / ONNX_FILE,
                    size=int(self.query_params.get("size", 224)))
        header = self.header()
        header["weights"]["onnx_sha256"] = file_sha256(out / ONNX_FILE)
        save_header(out / HEADER_FILE, header)
        self.path = out
        log.info("saved fusion model %s to %s", self.fingerprint, out)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, fingerprint: str | None = None
             ) -> FusionModel:
        """Read and check a fusion model folder (``fingerprint``: the one it must have)."""
        from safetensors.torch import load_file  # lazy: safetensors

        p = Path(folder)
        h = load_header(p / HEADER_FILE, type=ARTIFACT_TYPE, format_version=FORMAT_VERSION)
        try:
            specs = [InputSpec.from_dict(m["input"]) for m in h["members"]]
            members = [{"config": m["config"], "fingerprint": m["fingerprint"]}
                       for m in h["members"]]
            mp, qp = h["params"]["mixer"], h["params"]["query"]
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{p / HEADER_FILE} lacks {exc}") from exc
        for f in (MIXER_FILE, QUERY_FILE, ONNX_FILE):
            if not (p / f).is_file():
                raise FormatError(f"{p / f} is missing: an incomplete fusion model folder")
        mixer = build_mixer(mp["kind"], specs, d=int(mp["d"]), layers=int(mp.get("layers", 4)),
                            heads=int(mp.get("heads", 8)), anchor=bool(mp.get("anchor", False)))
        mixer.load_state_dict(load_file(str(p / MIXER_FILE)))
        tail = _empty_tail(qp)
        tail.load_state_dict(load_file(str(p / QUERY_FILE)))
        model = cls(members=members, specs=specs, mixer=mixer, mixer_params=mp, tail=tail,
                    query_params=qp, recipe=h["params"].get("recipe"),
                    training=h.get("training"))
        w = h.get("weights", {})
        if (w.get("mixer"), w.get("query")) != model._digests:
            raise FormatError(f"{p}: the weight files do not match the digests in its header "
                              "(edited or mixed with another model's files)")
        if w.get("onnx_sha256") != file_sha256(p / ONNX_FILE):
            raise FormatError(f"{p / ONNX_FILE} is not the graph this model was saved with")
        if model.fingerprint != h["fingerprint"]:
            raise FormatError(f"{p}: recorded fingerprint {h['fingerprint']!r} != recomputed "
                              f"{model.fingerprint!r} (another galleria version?)")
        if fingerprint is not None and fingerprint != model.fingerprint:
            raise CompatibilityError(f"{p} is the fusion model {model.fingerprint!r}, but "
                                     f"{fingerprint!r} was expected")
        model.path = p
        return model

    @property
    def onnx_path(self) -> Path:
        if self.path is None:
            raise FormatError("this fusion model has not been saved yet")
        return self.path / ONNX_FILE


def _empty_tail(qp: dict[str, Any]) -> QueryTail:
    """A tail of the recorded shape without loading pretrained weights (they are overwritten)."""
    from efficientnet_lite_pytorch import EfficientNet  # lazy: efficientnet_lite_pytorch

    arch = {"effnet-lite0": "efficientnet-lite0"}.get(qp["model"])
    if arch is None:
        raise FormatError(f"unknown query model {qp['model']!r}")
    net = EfficientNet.from_name(arch, image_size=None)
    return QueryTail(net, int(qp["train_blocks"]), int(qp["d"]),
                     Pooling(**qp.get("pooling", {"kind": "gem", "p": 3.0})),
                     normalize=bool(qp.get("normalize", False)))

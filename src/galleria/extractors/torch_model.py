"""Torch extractors and their ONNX Runtime twin.

A :class:`TorchExtractor` wraps an ``nn.Module`` that maps the normalised image
batch ``(B, 3, H, W)`` to a feature map ``(B, C, h, w)`` (pooled here) or, with
``Pooling(kind="model")``, directly to ``(B, D)``. With ``runtime="onnx"`` the
same module (pooling and L2-normalisation included) is exported once per scale
to the cache and run by ONNX Runtime.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.errors import FormatError, InputError, MissingDependencyError
from galleria.extractors.base import Extractor
from galleria.extractors.pooling import Pooling, pool_torch
from galleria.extractors.preprocessing import Preprocessing
from galleria.fingerprint import slug
from galleria.io.atomic import atomic_open, read_json, write_json

log = logging.getLogger(__name__)


def _torch() -> Any:
    import torch  # lazy: torch

    return torch


def embedding_module(backbone: Any, pooling: Pooling) -> Any:
    """``backbone`` + pooling + L2-normalisation as one ``nn.Module`` (exportable)."""
    torch = _torch()

    class EmbeddingModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: Any) -> Any:
            f = self.backbone(x)
            if pooling.kind != "model":
                f = pool_torch(f, pooling)
            return torch.nn.functional.normalize(f, dim=1)

    return EmbeddingModule().eval()


def export_module_onnx(
    module: Any, path: str | os.PathLike[str], example: np.ndarray, *, opset: int = 17
) -> None:
    """Export ``module`` to ONNX at the example's spatial size, dynamic batch, atomically."""
    torch = _torch()

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(example),),
            buf,
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())


def ort_session(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session. Its worker threads do not spin between runs: a
    spinning pool starves numpy/BLAS work in the same process (the search and the
    transforms after each batch), measured at 20-30x slower matmuls."""
    import onnxruntime as ort  # lazy: onnxruntime

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"]
    )


class TorchExtractor(Extractor):
    """Extractor around a torch backbone; ``runtime`` is ``"torch"`` or ``"onnx"``.

    Args:
        backbone_factory: zero-argument callable building the backbone ``nn.Module``
            with its weights loaded (called lazily, once).
        runtime: ``"onnx"`` exports the module (per scale, cached under
            ``$GALLERIA_CACHE/onnx``) and runs it with ONNX Runtime; ``"torch"``
            runs it eagerly.
        threads: intra-op threads for ONNX Runtime (torch threads are set by the
            entry point with ``torch.set_num_threads``).
    """

    def __init__(
        self,
        *,
        backbone_factory: Any,
        runtime: str = "onnx",
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if runtime not in ("torch", "onnx"):
            raise ValueError(f"runtime must be 'torch' or 'onnx', got {runtime!r}")
        self.runtime = runtime
        self.threads = threads
        self._backbone_factory = backbone_factory
        self._module: Any = None
        self._sessions: dict[float, Any] = {}
        self._lock = threading.Lock()
        self._module_lock = threading.Lock()

    @property
    def module(self) -> Any:
        """The torch embedding module (backbone + pooling + L2), built on first use."""
        with self._module_lock:
            if self._module is None:
                self._module = embedding_module(self._backbone_factory(), self.pooling)
            return self._module

    def onnx_path(self, scale: float = 1.0) -> Path:
        """The cached ONNX export for ``scale`` (exported on first call)."""
        h, w = self.preprocessing.scaled_size(scale)
        path = cache_dir("onnx") / f"{slug(self.fingerprint)}-{h}x{w}.onnx"
        if not path.exists():
            self._export_graph(path, scale)
        return path

    def _export_graph(self, path: str | os.PathLike[str], scale: float) -> None:
        h, w = self.preprocessing.scaled_size(scale)
        example = np.zeros((1, 3, h, w), dtype=np.float32)
        log.info("exporting %s at %dx%d to %s", self.fingerprint, h, w, path)
        export_module_onnx(self.module, path, example)

    def export_onnx(self, path: str | os.PathLike[str]) -> Path:
        """Export the embedding network to ``path`` with a JSON sidecar ``<path>.json``.

        The sidecar records the fingerprint, preprocessing and pooling so that
        ``onnx:<path>`` loads the graph as an extractor with the same
        fingerprint (the light query side of a deployment). Single-scale
        extractors only: a multi-scale embedding needs one graph per scale.
        """
        if self.scales != (1.0,):
            raise InputError(
                f"{self.fingerprint} is multi-scale {self.scales}; export a single-scale "
                "extractor (the query side of a deployment runs one scale)"
            )
        self._export_graph(path, 1.0)
        write_json(Path(f"{path}.json"), self.sidecar())
        return Path(path)

    def sidecar(self) -> dict[str, Any]:
        return {
            "type": "onnx-extractor",
            "format_version": 1,
            "name": self.name,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "weights_id": self.weights_id,
            "source": self.source,
            "preprocessing": self.preprocessing.to_dict(),
            "pooling": self.pooling.to_dict(),
            "scales": list(self.scales),
        }

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        if self.runtime == "onnx":
            sess = self._sessions.get(scale)
            if sess is None:
                with self._lock:  # two first calls from two threads build one session
                    sess = self._sessions.get(scale)
                    if sess is None:
                        path = self.onnx_path(scale)
                        sess = ort_session(path, threads=self.threads)
                        self._sessions[scale] = sess
            return sess.run(None, {"images": batch})[0]
        torch = _torch()
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).numpy()


class OnnxExtractor(Extractor):
    """An extractor that runs an ONNX graph whose output is the pooled embedding.

    Used for models shipped as ONNX (``opennsfw-r50``) and for graphs exported
    by :meth:`TorchExtractor.export_onnx` (``onnx:<path>``). One graph per scale.
    """

    runtime = "onnx"

    def __init__(
        self,
        *,
        graphs: dict[float, Path],
        input_name: str = "images",
        output_name: str | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        missing = [s for s in self.scales if s not in graphs]
        if missing:
            raise ValueError(f"no ONNX graph for scales {missing}")
        self.graphs = graphs
        self.input_name = input_name
        self.output_name = output_name
        self.threads = threads
        self._sessions: dict[float, Any] = {}
        self._lock = threading.Lock()

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        sess = self._sessions.get(scale)
        if sess is None:
            with self._lock:  # two first calls from two threads build one session
                sess = self._sessions.get(scale)
                if sess is None:
                    sess = ort_session(self.graphs[scale], threads=self.threads)
                    self._sessions[scale] = sess
        outs = [self.output_name] if self.output_name else None
        return sess.run(outs, {self.input_name: batch})[0]


def load_exported(path: str | os.PathLike[str], *, threads: int | None = None) -> OnnxExtractor:
    """Load a graph written by :meth:`TorchExtractor.export_onnx` (needs its ``.json`` sidecar)."""

    p = Path(path)
    side = Path(f"{p}.json")
    if not p.is_file():
        raise MissingDependencyError(f"ONNX model {p} does not exist")
    if not side.is_file():
        raise FormatError(f"{side} is missing: export the model with `galleria export-onnx`")
    meta = read_json(side)
    if meta.get("type") != "onnx-extractor" or meta.get("format_version") != 1:
        raise FormatError(f"{side} is not a galleria ONNX extractor sidecar (version 1)")
    ext = OnnxExtractor(
        graphs={1.0: p},
        threads=threads,
        name=meta["name"],
        dim=int(meta["dim"]),
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        pooling=Pooling(**meta["pooling"]),
        scales=(1.0,),
        weights_id=meta["weights_id"],
        source=f"{meta['source']} (ONNX export {p.name})",
    )
    if ext.fingerprint != meta["fingerprint"]:
        raise FormatError(
            f"{side}: recorded fingerprint {meta['fingerprint']!r} does not match the "
            f"recomputed {ext.fingerprint!r} (sidecar edited or from another galleria version)"
        )
    return ext

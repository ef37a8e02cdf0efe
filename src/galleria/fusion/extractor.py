"""The two extractors of a fusion model, built from their configs (a config type).

``{"type": "fusion-gallery", "model": F}``
    runs every member extractor and the mixer on an image batch -> ``(B, d)``.
    ``prepare(img)`` returns the members' prepared inputs one after the other
    (one slot per member scale) and ``embed_prepared`` splits them again, so it
    satisfies the global extractor contract (``embed_stream``, ``index_images``).
``{"type": "fusion-query", "model": F}``
    the light query model: one ONNX Runtime pass (``runtime="torch"`` runs the
    same network in torch) -> ``(B, d)``.
``{"type": "fusion-query", "model": F, "adaptation": {"path": A, "digest": h}}``
    the light query model adapted to one gallery (:mod:`galleria.fusion.adapt_job`):
    the light model's own vector (one pass) times the gallery's fitted map
    (:class:`galleria.fusion.adaptation.QueryAdaptation`, digest checked) -> ``(B, d)``.
``{"type": "fusion-query", "model": F, "output": "light"}``
    the light model's own vectors (trunk, head, GeM, L2-normalised; ``(B, 1280)``),
    fingerprint ``<F's>|light@...``: the space a gallery answers from when the
    light model beats the fused space on it.

The gallery and query extractors carry the fusion model's fingerprint (the space's).
Paths in a config resolve against ``root`` (the gallery folder) when relative. Members are rebuilt
from their recorded configs and must have their recorded fingerprints: other
installed weights are refused, naming both.

``galleria index SRC --fusion F --out G`` copies ``F`` into ``G/fusion/<slug>``
(:func:`attach_to_gallery`; the gallery stays searchable when ``F`` moves) and
indexes through :func:`gallery_extractor`. The gallery extractor exposes its
light model as ``query_extractor``; the space records that model's config as
``query_config`` (:func:`galleria.extract.spaces.space_info`), so searchers
embed queries with the light model in one pass.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from galleria.cache import cache_dir
from galleria.errors import CompatibilityError, FormatError
from galleria.extractors import effnet
from galleria.extractors.base import Extractor, ModelInfo
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.registry import extractor_from_config, resolve_path
from galleria.extractors.torch_model import export_module_onnx, ort_session
from galleria.fingerprint import chain, slug
from galleria.fusion.adaptation import QueryAdaptation
from galleria.fusion.members import input_spec
from galleria.fusion.model import HEADER_FILE, MIXER_FILE, ONNX_FILE, QUERY_FILE, FusionModel
from galleria.fusion.query_model import HEAD_DIM, LightNet, QueryNet
from galleria.validate import l2_normalize


def _model(config: dict[str, Any], root: str | None) -> tuple[FusionModel, str]:
    if "model" not in config:
        raise FormatError(f"a {config.get('type')} config needs 'model' (the fusion folder): "
                          f"{config!r}")
    path = resolve_path(str(config["model"]), root)
    return FusionModel.load(path), str(config["model"])


def _lite_preprocessing() -> Any:
    return Preprocessing(size=(224, 224), resize="squash", crop_pct=0.875,
                         mean=effnet.LITE_MEAN, std=effnet.LITE_STD)


class FusionGalleryExtractor(Extractor):
    """Every member + the mixer; ``(B, d)`` L2-normalised fused gallery vectors."""

    def __init__(self, model: FusionModel, members: Sequence[Extractor], *,
                 whitening: QueryAdaptation | None = None) -> None:
        model.check_members([input_spec(m) for m in members])
        self.model = model
        #: a gallery's whitening of the fused vectors (its whitened space; see adapt_job)
        self.whitening = whitening
        self.members = list(members)
        self._slots = [len(m.scales) for m in self.members]
        super().__init__(
            name="fusion-gallery", dim=model.dim if whitening is None else whitening.w.shape[1],
            preprocessing=members[0].preprocessing,
            pooling=Pooling("model"), scales=(1.0,) * sum(self._slots),
            weights_id=model.fingerprint,
            source="fused: " + " + ".join(m.name for m in self.members),
        )
        self.runtime = "mixed"
        self._lock = threading.Lock()
        self._query: FusionQueryExtractor | None = None

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        if self.whitening is not None:
            return whitened_fingerprint(self.model.fingerprint, self.whitening.digest)
        return self.model.fingerprint

    @property
    def query_extractor(self) -> FusionQueryExtractor | None:
        """The light query model of the same fusion model (``None`` when built without a
        config: it could not be recorded). A space indexed by this extractor records its
        config as ``query_config``."""
        if self._config is None or self.whitening is not None:  # its space records its own
            return None
        if self._query is None:
            ex = self._exec_options or {}
            cfg = {"type": "fusion-query", "model": self._config["model"]}
            q = FusionQueryExtractor(self.model, runtime=_exec(ex.get("runtime", "auto")),
                                     threads=ex.get("threads"))
            q.set_config(cfg, root=self._config_root, runtime=ex.get("runtime", "auto"),
                         threads=ex.get("threads"))
            self._query = q
        return self._query

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, dim=self.dim, input_size=self.preprocessing.size,
                         source=self.source, pooling="fusion", scales=(1.0,),
                         runtime=self.runtime, fingerprint=self.fingerprint)

    def prepare(self, img: Image.Image) -> tuple[np.ndarray, ...]:
        out: list[np.ndarray] = []
        for m in self.members:
            out.extend(m.prepare(img))
        return tuple(out)

    def member_features(self, per_slot: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batched prepared inputs -> one ``(B, stored_dim)`` array per member."""
        if len(per_slot) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} input slots, got {len(per_slot)}")
        feats, at = [], 0
        for m, k in zip(self.members, self._slots, strict=True):
            feats.append(m.embed_prepared(per_slot[at:at + k]))
            at += k
        return feats

    def embed_prepared(self, per_scale: Sequence[np.ndarray]) -> np.ndarray:
        feats = self.member_features(per_scale)
        with self._lock:  # the mixer module is shared; torch modules are not re-entrant-safe
            out = self.model.mix(feats)
        if self.whitening is not None:
            out = l2_normalize(self.whitening.apply(out))
        return out

    def derive(self, fused: np.ndarray) -> np.ndarray:
        """The gallery-whitened vectors ``(N, d')`` of stored fused vectors ``(N, d)`` (one
        matrix product; the space records ``derived_from``, :mod:`galleria.extract.derived`)."""
        if self.whitening is None:
            raise FormatError("only a gallery-whitened fused space is derived from the fused one")
        return l2_normalize(self.whitening.apply(np.asarray(fused, np.float32)))

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError("FusionGalleryExtractor embeds through embed_prepared")


class FusionQueryExtractor(Extractor):
    """The light query model of a fusion model (ONNX Runtime, or torch); with
    ``adaptation``, the light model's own vector mapped by a gallery's fitted map."""

    def __init__(self, model: FusionModel, *, runtime: str = "onnx",
                 threads: int | None = None, adaptation: QueryAdaptation | None = None,
                 target: str | None = None) -> None:
        if runtime not in ("onnx", "torch"):
            raise ValueError(f"runtime must be onnx or torch, got {runtime!r}")
        self.model = model
        qp = model.query_params
        self.adaptation = adaptation
        #: the space the queries land in (a gallery-whitened fused space needs ``adaptation``)
        self.target = target or model.fingerprint
        if self.target != model.fingerprint and adaptation is None:
            raise CompatibilityError(f"a query into {self.target} needs its fitted map")
        self._light: FusionLightExtractor | None = None
        if adaptation is not None:
            self._light = FusionLightExtractor(model, runtime=runtime, threads=threads)
            if adaptation.model_fingerprint != self.target or \
                    adaptation.light_fingerprint != self._light.fingerprint:
                raise CompatibilityError(
                    f"query adaptation {adaptation.digest} maps {adaptation.light_fingerprint} "
                    f"into {adaptation.model_fingerprint}; this model is {model.fingerprint} "
                    f"(light {self._light.fingerprint})")
            want = model.dim if self.target == model.fingerprint else adaptation.w.shape[1]
            if adaptation.w.shape != (self._light.dim, want):
                raise CompatibilityError(f"query adaptation {adaptation.digest} is "
                                         f"{adaptation.w.shape}, not ({self._light.dim}, "
                                         f"{want})")
        how = ("" if adaptation is None else
               f", adapted to its gallery (map {adaptation.digest})")
        super().__init__(
            name="fusion-query", dim=model.dim if adaptation is None else adaptation.w.shape[1],
            preprocessing=_lite_preprocessing(),
            pooling=Pooling("model"), scales=(1.0,), weights_id=model.fingerprint,
            source=f"{qp['model']} query model (blocks trained: {qp['train_blocks']}) of "
                   f"{model.fingerprint}{how}",
        )
        self.runtime = runtime
        self.threads = threads
        self._session: Any = None
        self._net: Any = None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        return self.target

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, dim=self.dim, input_size=self.preprocessing.size,
                         source=self.source,
                         pooling="gem3+whitening" if self.adaptation is None
                         else "gem3+gallery map", scales=(1.0,),
                         runtime=self.runtime, fingerprint=self.fingerprint)

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        if self.adaptation is not None:
            assert self._light is not None
            return self.adaptation.apply(self._light._embed_scale(batch, scale))
        if self.runtime == "onnx":
            with self._lock:
                if self._session is None:
                    self._session = ort_session(self.model.onnx_path, threads=self.threads)
            return self._session.run(None, {"images": batch})[0]
        import torch  # lazy: torch

        with self._lock:
            if self._net is None:
                self._net = QueryNet(self.model.trunk(), self.model.tail).eval()
            with torch.inference_mode():
                return l2_normalize(self._net(torch.from_numpy(batch)).numpy())


class FusionLightExtractor(Extractor):
    """The light model's own vectors: trunk, head, GeM, L2-normalised (the input of the
    query's whitening layer), ``(B, 1280)``. ONNX: the graph is exported once to the user
    cache (``$GALLERIA_CACHE/onnx``), named by the fusion model's fingerprint."""

    def __init__(self, model: FusionModel, *, runtime: str = "onnx",
                 threads: int | None = None) -> None:
        if runtime not in ("onnx", "torch"):
            raise ValueError(f"runtime must be onnx or torch, got {runtime!r}")
        self.model = model
        qp = model.query_params
        super().__init__(
            name="fusion-light", dim=HEAD_DIM, preprocessing=_lite_preprocessing(),
            pooling=Pooling("model"), scales=(1.0,), weights_id=model.fingerprint,
            source=f"{qp['model']} (GeM) of {model.fingerprint}: the light model's own vectors",
        )
        self.runtime = runtime
        self.threads = threads
        self._session: Any = None
        self._net: Any = None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        return light_fingerprint(self.model.fingerprint)

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, dim=self.dim, input_size=self.preprocessing.size,
                         source=self.source, pooling="gem3", scales=(1.0,),
                         runtime=self.runtime, fingerprint=self.fingerprint)

    def _torch_net(self) -> Any:
        if self._net is None:
            self._net = LightNet(self.model.trunk(), self.model.tail).eval()
        return self._net

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        import torch  # lazy: torch

        if self.runtime == "onnx":
            with self._lock:
                if self._session is None:
                    self._session = self._onnx_session()
            return self._session.run(None, {"images": batch})[0]
        with self._lock, torch.inference_mode():
            return l2_normalize(self._torch_net()(torch.from_numpy(batch)).numpy())

    def _onnx_session(self) -> Any:
        path = cache_dir("onnx") / f"{slug(self.fingerprint)}.onnx"
        if not path.is_file():  # exported atomically; two exporters write the same graph
            size = int(self.model.query_params.get("size", 224))
            export_module_onnx(self._torch_net(), path, np.zeros((1, 3, size, size), np.float32))
        return ort_session(path, threads=self.threads)


def light_fingerprint(model_fingerprint: str) -> str:
    """The fingerprint of a fusion model's light vectors (its light space)."""

    return chain(model_fingerprint, "light")


def whitened_fingerprint(model_fingerprint: str, transform_digest: str) -> str:
    """The fingerprint of a fused space whitened on one gallery (the transform's digest)."""

    return chain(model_fingerprint, "whitened", transform_digest)


def _exec(runtime: str) -> str:
    return "onnx" if runtime == "auto" else runtime


def gallery_from_config(config: dict[str, Any], *, root: str | None, runtime: str,
                        threads: int | None) -> FusionGalleryExtractor:
    """Rebuild ``{"type": "fusion-gallery", "model": F}`` (members from their configs)."""

    model, _ = _model(config, root)
    members = []
    for m in model.members:
        try:
            members.append(extractor_from_config(m["config"], root=root, runtime=runtime,
                                                 threads=threads, fingerprint=m["fingerprint"]))
        except CompatibilityError as exc:
            raise CompatibilityError(
                f"fusion model {model.fingerprint}: member {m['config'].get('type')!r} cannot be "
                f"rebuilt as trained: {exc}") from exc
    wh = config.get("whitening")
    whitening = None if wh is None else QueryAdaptation.load(
        resolve_path(str(wh["path"]), root), digest=str(wh["digest"]),
        model_fingerprint=model.fingerprint)
    ext = FusionGalleryExtractor(model, members, whitening=whitening)
    ext.set_config(config, root=root, runtime=runtime, threads=threads)
    return ext


def query_from_config(config: dict[str, Any], *, root: str | None, runtime: str,
                      threads: int | None) -> Extractor:
    """Rebuild ``{"type": "fusion-query", "model": F[, "adaptation": {"path", "digest"}]
    [, "output": "light"]}`` (see the module docstring)."""

    model, _ = _model(config, root)
    output = config.get("output", "query")
    ext: Extractor
    if output == "light":
        ext = FusionLightExtractor(model, runtime=_exec(runtime), threads=threads)
    elif output not in ("query", "whitened"):
        raise FormatError(f"fusion-query output must be query, light or whitened, not "
                          f"{output!r}")
    else:
        adaptation = None
        a = config.get("adaptation")
        if a is not None and (not isinstance(a, dict) or "path" not in a
                              or "digest" not in a):
            raise FormatError(f"a fusion-query adaptation needs path and digest: {a!r}")
        target = str(config["space"]) if output == "whitened" else model.fingerprint
        if output == "whitened" and (a is None or not target.startswith(model.fingerprint)):
            raise FormatError(f"a whitened fusion query needs its space and map: {config!r}")
        if a is not None:
            adaptation = QueryAdaptation.load(resolve_path(str(a["path"]), root),
                                              digest=str(a["digest"]),
                                              model_fingerprint=target)
        ext = FusionQueryExtractor(model, runtime=_exec(runtime), threads=threads,
                                   adaptation=adaptation, target=target)
    ext.set_config(config, root=root, runtime=runtime, threads=threads)
    return ext


def attach_to_gallery(model_dir: str | os.PathLike[str], gallery_dir: str | os.PathLike[str]
                      ) -> str:
    """Copy the fusion model folder into ``<gallery>/fusion/<slug>``; its relative path.

    The model is loaded (and so checked) first; a copy already there is reused.
    The gallery folder is created if needed (the gallery itself is not).
    """

    model = FusionModel.load(model_dir)
    rel = Path("fusion") / slug(model.fingerprint)
    dest = Path(gallery_dir) / rel
    if dest.is_dir():
        FusionModel.load(dest, fingerprint=model.fingerprint)
        return rel.as_posix()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for f in (MIXER_FILE, QUERY_FILE, ONNX_FILE, HEADER_FILE):
            shutil.copy2(Path(model_dir) / f, tmp / f)
        FusionModel.load(tmp, fingerprint=model.fingerprint)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rel.as_posix()


def gallery_extractor(model_dir: str | os.PathLike[str], gallery_dir: str | os.PathLike[str],
                      *, runtime: str = "auto", threads: int | None = None
                      ) -> FusionGalleryExtractor:
    """The fused-gallery extractor for indexing into ``gallery_dir`` (model copied in)."""

    rel = attach_to_gallery(model_dir, gallery_dir)
    # an absolute root: Ray workers rebuild the extractor from its config in another cwd
    return extractor_from_config(  # type: ignore[return-value]
        {"type": "fusion-gallery", "model": rel}, root=str(Path(gallery_dir).resolve()),
        runtime=runtime, threads=threads)


def configs(model_path: str) -> dict[str, dict[str, Any]]:
    """The two configs of a fusion model folder, as a space records them:
    ``{"config": fusion-gallery config, "query_config": fusion-query config}``."""
    return {"config": {"type": "fusion-gallery", "model": str(model_path)},
            "query_config": {"type": "fusion-query", "model": str(model_path)}}

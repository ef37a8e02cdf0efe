"""Helpers shared by CLI commands: threads, progress bars, JSON output, errors."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from galleria.distributed.cluster import connect
from galleria.threads import set_threads as _set


def set_threads(threads: int | None) -> int:
    """Choose the thread count for torch, FAISS and BLAS at the entry point only."""

    return _set(threads)


def progress_bar(total: int | None, desc: str, *, enabled: bool = True,
                 unit: str = "img") -> Any:
    """A tqdm bar on stderr (drawn only when :func:`show_progress`)."""

    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(enabled),
                dynamic_ncols=True)


def show_progress(enabled: bool = True) -> bool:
    """Whether to draw progress bars: on a terminal, or when ``GALLERIA_PROGRESS=1``."""
    return enabled and (os.environ.get("GALLERIA_PROGRESS") == "1" or sys.stderr.isatty())


def progress_factory(*, enabled: bool = True) -> Any:
    """A tqdm-like factory (``factory(total=, desc=, ...)``) for training loops, or
    ``None`` when no bar is shown."""
    if not show_progress(enabled):
        return None


    return functools.partial(tqdm, dynamic_ncols=True)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=json_default)
    sys.stdout.write("\n")


def json_default(obj: Any) -> Any:
    """JSON for numpy values (and anything else as its text)."""

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def add_model_args(p: argparse.ArgumentParser, *, default: str | None = "effnet-lite0",
                   model_help: str | None = None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=default,
                   help=model_help or "extractor (see `galleria models`; default effnet-lite0)")
    g.add_argument("--pooling", default=None, help=COMMON_HELP["pooling"])
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], help=COMMON_HELP["scales"])
    g.add_argument("--checkpoint", default=None, help=COMMON_HELP["checkpoint"])
    g.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"],
                   help=COMMON_HELP["runtime"])
    g.add_argument("--size", type=int, default=None, help=COMMON_HELP["size"])
    g.add_argument("--resize", default=None, help=COMMON_HELP["resize"])


def model_spec(args: argparse.Namespace, name: str | None = None) -> Any:
    """The :class:`~galleria.extractors.spec.ModelSpec` the model options of
    :func:`add_model_args` describe (``None`` without a model name)."""
    from galleria.extractors.spec import ModelSpec  # CLI start-up: registry loads torch lazily

    name = name if name is not None else args.model
    if name is None:
        return None
    return ModelSpec.of(name, pooling=args.pooling, scales=args.scales,
                        checkpoint=args.checkpoint, size=args.size, resize=args.resize)


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--threads", type=int, default=None, help=COMMON_HELP["threads"])
    g.add_argument("--workers", type=int, default=2,
                   help="image decoding threads (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help=COMMON_HELP["batch_size"])
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster (pip install 'galleria[ray]')")
    g.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="decode and embed on the Ray cluster at ADDRESS (host:port of the head "
                        "node, or auto); this process commits. Image paths must be readable "
                        "on every node")
    g.add_argument("--ray-actors", type=int, default=None,
                   help="embedding actors (default: one per CPU of the cluster)")
    g.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per embedding actor")
    g.add_argument("--ray-import", action="append", default=[], metavar="MODULE",
                   help="module each worker imports first (registers your own extractors)")


def ray_embedding(args: argparse.Namespace) -> Any:
    """``(session, RayEmbedder)`` for ``--ray``, or ``None`` without it."""
    if not getattr(args, "ray", None):
        return None
    from galleria.distributed.ray_embed import RayEmbedder  # lazy: PIL

    sess = connect(args.ray)
    return sess, RayEmbedder(actors=args.ray_actors, cpus_per_actor=args.ray_cpus,
                             imports=args.ray_import)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    quiet_decoder_warnings()


def quiet_decoder_warnings() -> None:
    """Hide PIL's ``DecompressionBombWarning`` (at the CLI entry point only: warning
    filters are process-wide). galleria refuses every image over the pixel limit with
    its own reason (``too many pixels ...``, in the job's report), so PIL's raw warning
    about the same image only adds a confusing line."""

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def key_value(text: str) -> tuple[str, Any]:
    """argparse type for ``KEY=VALUE`` options; the value is parsed as JSON when it can be."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


WHERE_HELP = ("keep only items whose metadata satisfies EXPR: label=cat, label=cat,dog (any "
              "of), label!=cat, year>=2010, year=2000..2010, taken<2021-05-01, "
              "'label=cat OR year<2000', or a JSON filter '{\"must\": [...]}'; repeat "
              "--where for conditions that must all hold (docs/filters.md)")


def add_where_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--where", action="append", default=[], metavar="EXPR", help=WHERE_HELP)


#: Help of options that many commands share, by argparse ``dest`` (filled in by
#: :func:`fill_common_help` where a command gives none of its own).
COMMON_HELP = {
    "gallery": "the gallery folder (made by galleria index)",
    "json": "print the result as JSON instead of text",
    "runtime": "where torch models run: auto (ONNX Runtime when the model exports, else "
               "torch; default), onnx or torch",
    "batch_size": "images per forward pass of the model (default %(default)s)",
    "verbose": "debug logging",
    "quiet": "no progress bar",
    "threads": "compute threads of the models and BLAS (default: all cores)",
    "seed": "random seed (results are reproducible with the same seed)",
    "images": "query image files",
    "k": "results per query (default %(default)s)",
    "qe_alpha": "exponent of alpha query expansion: neighbour weights are "
                "similarity^ALPHA (default %(default)s)",
    "pooling": "pooling of the feature map: gem (default, p = 3), gem<p> e.g. gem4, or mean",
    "scales": "multi-scale factors of the input, e.g. 1 0.707 1.414 (default 1)",
    "checkpoint": "local weights file for timm:/dinov2:/clip: models",
    "size": "input side in pixels (default: the model's)",
    "resize": "how images are fitted to the input: squash, crop (EfficientNet default) or "
              "squash-crop (opennsfw default)",
}


def fill_common_help(p: argparse.ArgumentParser) -> None:
    """Give the shared options of every (sub)command their :data:`COMMON_HELP` text."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                fill_common_help(sub)
        elif not a.help and a.dest in COMMON_HELP:
            a.help = COMMON_HELP[a.dest]

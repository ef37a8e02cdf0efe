"""``galleria serve GALLERY``: the search service and web UI (service/app.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from galleria.cli.common import set_threads, setup_logging
from galleria.errors import InputError, MissingDependencyError
from galleria.images.sources import is_gallery_folder


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve", help="serve a gallery (or a folder of galleries) over HTTP: API + web UI",
        description="Serve GALLERY: POST /v1/search, /v1/items, /v1/upgrade ..., the web UI at "
                    "/ and the API docs at /docs. A folder holding several galleries (one "
                    "sub-folder each) serves each at /v1/galleries/NAME/... Binds 127.0.0.1 "
                    "unless --host says otherwise.")
    s.add_argument("gallery", help="the gallery folder to serve, or a folder whose "
                                   "sub-folders are galleries (each served under its name)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default %(default)s)")
    s.add_argument("--token-file", default=None,
                   help="file holding the bearer token that writes need; serving several "
                        "galleries, either one token for all or lines NAME TOKEN (each "
                        "gallery its own)")
    s.add_argument("--token-reads", action="store_true",
                   help="searches and reads need the token too")
    s.add_argument("--request-threads", type=int, default=2,
                   help="threads answering requests: decoding, embedding and searching "
                        "(default 2; one per core is right)")
    s.add_argument("--queue", type=int, default=32,
                   help="requests waiting for a worker before the server answers 503 (default 32)")
    s.add_argument("--threads", type=int, default=None,
                   help="compute threads of the models and BLAS (default: all cores)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (MiB)")
    s.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest image accepted, in pixels (decompression bombs are refused)")
    s.add_argument("--max-k", type=int, default=1000,
                   help="largest k a search may ask for (400 beyond; default %(default)s)")
    s.add_argument("--rule", default="auto",
                   help="merge rule during an upgrade (default: the job's, see galleria upgrade)")
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"],
                   help="where the models run: auto (default), onnx or torch")
    s.add_argument("--refresh-interval", type=float, default=0.25,
                   help="seconds between background view refreshes (new commits)")
    s.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="answer global searches on a Ray cluster: the index split into "
                        "--shards shard actors (needs galleria[ray]; see docs/distributed.md)")
    s.add_argument("--shards", type=int, default=2,
                   help="number of search shards with --ray (default 2)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log level (default %(default)s)")
    s.add_argument("--verbose", "-v", action="store_true",
                   help="debug logging, and one log line per request")
    s.set_defaults(func=cmd_serve)
    return s


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    try:
        import uvicorn  # lazy: uvicorn

        from galleria.service.app import create_app, create_multi_app  # lazy: PIL
    except ImportError as exc:
        raise MissingDependencyError(
            f"galleria serve needs the service extra: pip install 'galleria[service]' ({exc})"
        ) from exc
    from galleria.service.auth import read_token_file, read_token_map  # lazy: fastapi
    from galleria.service.engine import ServiceConfig  # lazy: PIL

    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535; got {args.port}")
    for name in ("request_threads", "max_k"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.queue < 0 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        raise InputError("--queue must be >= 0, --max-upload-mb and --max-pixels positive")
    if args.shards < 1:
        raise InputError(f"--shards must be >= 1; got {args.shards}")
    root = Path(args.gallery)
    names = _galleries(root)
    multi = names is not None
    if multi:
        assert names is not None
        tokens = read_token_map(args.token_file, names) if args.token_file else {}
    else:
        names = [root.name]
        tokens = {root.name: read_token_file(args.token_file)} if args.token_file else {}
    if args.token_reads and not tokens:
        raise InputError("--token-reads needs --token-file")
    threads = set_threads(args.threads)  # the entry point chooses threads, once
    configs = {n: ServiceConfig(
        gallery=root / n if multi else root, token=tokens.get(n),
        token_reads=args.token_reads and n in tokens,
        workers=args.request_threads, queue=args.queue,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
        max_k=args.max_k, runtime=args.runtime, threads=threads, rule=args.rule,
        refresh_interval_s=args.refresh_interval, ray=args.ray, shards=args.shards)
        for n in names}
    open_writes = [n for n in names if n not in tokens]
    if tokens and open_writes:
        print(f"galleria serve: no token for {open_writes}: their writes are open",
              file=sys.stderr)
    token = next(iter(tokens.values()), None)
    app = create_multi_app(configs) if multi else create_app(configs[names[0]])
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"galleria serve: listening on {args.host}: reachable from other machines"
              f"{'' if token else ' and writes need no token (use --token-file)'}",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.verbose, timeout_graceful_shutdown=10)
    return 0


def _galleries(root: Path) -> list[str] | None:
    """The galleries in ``root`` (sub-folders with a gallery), or ``None`` when ``root`` is
    a gallery itself."""

    if is_gallery_folder(root) or (root / "gallery.json").exists():
        return None
    if not root.is_dir():
        raise InputError(f"{root} is neither a gallery nor a folder of galleries")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and is_gallery_folder(p))
    if not names:
        raise InputError(f"{root} is not a gallery and holds none (no sub-folder with a "
                         "gallery.json): index one with `galleria index SRC --out "
                         f"{root}/NAME`")
    return names

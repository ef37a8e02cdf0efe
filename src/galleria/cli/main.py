"""galleria -- index, search and evaluate image galleries.

Commands (galleria COMMAND --help for the options of each):

    galleria models                       list extractors (dim, input size, source)
    galleria index SRC --model M --out G  embed a folder/manifest into gallery G
                                          (--ray ADDRESS: embed on a Ray cluster)
    galleria index SRC --fusion F --out G a fused gallery (queries: F's light model)
    galleria search G IMAGE... -k K       search (--json, --html OUT)
    galleria eval --dataset NAME          official protocols on ../shared/datasets
    galleria eval --manifest CSV          your own labelled images
    galleria info G                       spaces, counts, failures, index, tuned default
    galleria tune G [--n 100 --seed 0]    calibrate the default pipeline on pseudo-queries
    galleria remove G ID...               delete items
    galleria check G                      verify every file against its checksum
    galleria repair G                     restore the database, re-embed lost data, rebuild
    galleria fit-transform G --kind aesvc --dim 128 --out T [--apply]
    galleria export-onnx --model M --out F.onnx
    galleria fusion train --gallery-models M1,M2 --images CSV --out F   fused gallery + light query
    galleria dedup G [--html OUT]         near-duplicate groups (copies, crops, re-encodes)
    galleria items G --where EXPR         list / count items whose metadata matches
    galleria serve G [--port 8080]        search API + web UI (docs at /docs)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from galleria import __version__
from galleria.cli import commands
from galleria.cli.common import (
    add_model_args,
    add_ray_args,
    add_run_args,
    add_where_arg,
    fill_common_help,
    key_value,
    quiet_decoder_warnings,
)
from galleria.cli.dedup import add_dedup_parser
from galleria.cli.fusion import add_fusion_parser
from galleria.cli.serve import add_serve_parser
from galleria.cli.transform import add_transform_parser
from galleria.cli.tune import add_index_tune_args, add_tune_parser
from galleria.cli.upgrade import add_upgrade_parser
from galleria.errors import GalleriaError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="galleria", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    p.add_argument("--version", action="version", version=f"galleria {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list extractors")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.cmd_models)

    s = sub.add_parser("index", help="embed a folder or manifest into a gallery (resumable)")
    s.add_argument("src", help="image folder or CSV manifest (column 'path', optional 'id')")
    s.add_argument("--out", "-o", required=True, help="gallery folder (created or resumed)")
    add_model_args(s, default=None, model_help=(
        "global model (see `galleria models`). A new gallery: default effnet-lite0. An "
        "existing gallery embeds with its own models; another one needs --add-space"))
    s.add_argument("--local", default=None,
                   help="also (or only, without --model) store local features: sift, xfeat")
    s.add_argument("--fusion", default=None, metavar="F",
                   help="a fusion model folder (galleria fusion train): embed through every "
                        "member and the mixer; queries then use its light model")
    s.add_argument("--id-prefix", default=None,
                   help="prefix every id (index two folders whose file names collide)")
    s.add_argument("--update", action="store_true",
                   help="replace stored images whose id now names a different file")
    s.add_argument("--add-space", action="store_true",
                   help="on an existing gallery, add the space of --model / --local / "
                        "--transform / --fusion even though the gallery does not have it "
                        "(without it, an existing gallery embeds with its own models and "
                        "another model is refused)")
    s.add_argument("--index", default=None,
                   help="exact (default), exact-bf16 / exact-int8 (compressed scan, exact "
                        "results), prefix, or a FAISS factory string: HNSW32, IVF1024,PQ32 ...")
    s.add_argument("--nprobe", type=int, default=None,
                   help="IVF indexes: inverted lists searched per query (more: slower, "
                        "higher recall)")
    s.add_argument("--ef-search", type=int, default=None,
                   help="HNSW indexes: candidate list size during search (more: slower, "
                        "higher recall)")
    s.add_argument("--rescore", type=int, default=None,
                   help="re-score k*RESCORE ANN candidates exactly")
    s.add_argument("--transform", default=None,
                   help="a fitted transform folder (galleria fit-transform) applied to every "
                        "vector and, automatically, to queries")
    s.add_argument("--limit", type=int, default=None, help="embed at most this many new images")
    s.add_argument("--commit-every", type=int, default=512,
                   help="vectors per commit (the most work a crash can lose)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    add_run_args(s)
    add_ray_args(s)

    add_index_tune_args(s)
    s.set_defaults(func=commands.cmd_index)

    s = sub.add_parser("search", help="search a gallery with query images")
    s.add_argument("gallery", help="the gallery folder")
    s.add_argument("images", nargs="+", help="query image files (one result list each)")
    s.add_argument("-k", type=int, default=10, help="results per query (default %(default)s)")
    s.add_argument("--pipeline", default=None,
                   help="global | global+sv | local | local+mds | hybrid (default: the gallery's "
                        "tuned record, else hybrid with a global model and local features, "
                        "else the one kind it holds)")
    s.add_argument("--json", action="store_true",
                   help="print JSON Lines: one object {\"query\": path, \"results\": [{\"id\", "
                        "\"score\", \"probability\"}, ...]} per query image, one per line "
                        "(probability: calibrated match probability, null if not tuned)")
    s.add_argument("--html", default=None, help="write a page with thumbnails to this file")
    s.add_argument("--qe", type=int, default=0, help="alpha query expansion over the top QE")
    s.add_argument("--qe-alpha", type=float, default=3.0)
    s.add_argument("--space", default=None, help="model space to search (default: primary)")
    s.add_argument("--dim", type=int, default=None,
                   help="search the first DIM coordinates (nested embeddings, prefix index)")
    s.add_argument("--funnel", default=None, metavar="DIM:N",
                   help="shortlist N candidates with a DIM prefix, re-score them in full")
    add_where_arg(s)
    s.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="leave out results scoring below S (the pipeline's raw score: "
                        "cosine similarity -1..1 for global)")
    s.add_argument("--min-probability", type=float, default=None, metavar="P",
                   help="leave out results whose calibrated match probability is below P "
                        "(0..1; needs a tuned gallery: `galleria tune G`)")
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"],
                   help="where the query model runs: auto (default), onnx or torch")
    add_run_args(s)
    s.set_defaults(func=commands.cmd_search)

    s = sub.add_parser("eval", help="evaluate a model on a data set or your own manifest")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", "-d", help="data set name (see --list)")
    src.add_argument("--manifest", help="CSV with path,label[,split]")
    src.add_argument("--list", action="store_true", help="list data sets")
    add_model_args(s)
    s.add_argument("--qe", type=int, default=0, help="alpha-QE neighbours (0: off)")
    s.add_argument("--qe-alpha", type=float, default=3.0)
    s.add_argument("--dba", type=int, default=0, help="database-side augmentation k (0: off)")
    s.add_argument("--transform", default=None,
                   help="fit this transform on the gallery side first (pca, pca-whiten, aesvc..)")
    s.add_argument("--dim", type=int, default=None, help="output dimension of the transform")
    s.add_argument("--param", type=key_value, action="append", default=[],
                   help="transform parameter KEY=VALUE (JSON value), repeatable; e.g. n_layers=1")
    s.add_argument("--no-cache", action="store_true", help="re-embed instead of using the cache")
    s.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    g = s.add_argument_group("local features (--model is then the global model)")
    g.add_argument("--local", default=None, help="local extractor: sift | xfeat")
    g.add_argument("--pipeline", default=None,
                   help="global | global+sv | local | local+mds | hybrid (default with --local: "
                        "local)")
    g.add_argument("--local-index", default="asmk", help="asmk (default) | cann")
    g.add_argument("--index-param", type=key_value, action="append", default=[],
                   help="local index parameter KEY=VALUE, e.g. codebook_size=4096, p0=0.5")
    g.add_argument("--pipeline-param", type=key_value, action="append", default=[],
                   help="pipeline parameter KEY=VALUE, e.g. shortlist=100, k=70, blend=0.19")
    add_run_args(s)
    s.set_defaults(func=commands.cmd_eval)

    s = sub.add_parser("info", help="describe a gallery")
    s.add_argument("gallery")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.cmd_info)

    s = sub.add_parser("items", help="list, scroll or count items, with a payload filter",
                       description="List the items of a gallery in insertion order, a page at "
                                   "a time (--cursor continues where the last page ended), or "
                                   "count them (--count); --where keeps only those whose "
                                   "metadata satisfies a filter.")
    s.add_argument("gallery", help="the gallery folder")
    add_where_arg(s)
    s.add_argument("--limit", type=int, default=20, help="items per page (1..10000, default 20)")
    s.add_argument("--cursor", default=None,
                   help="continue after the page that printed this cursor")
    s.add_argument("--count", action="store_true", help="print how many items match, only")
    s.add_argument("--space", default=None,
                   help="only items holding data in this space (a fingerprint; see info)")
    s.add_argument("--json", action="store_true",
                   help="print JSON Lines: one item per line, then {\"next_cursor\": ...}")
    s.set_defaults(func=commands.cmd_items)

    s = sub.add_parser("remove", help="remove items by id")
    s.add_argument("gallery", help="the gallery folder")
    s.add_argument("ids", nargs="+", help="ids of the items to remove (as listed by "
                                          "`galleria items`)")
    s.set_defaults(func=commands.cmd_remove)

    s = sub.add_parser("check", help="verify a gallery's files against their checksums")
    s.add_argument("gallery")
    s.add_argument("--quick", action="store_true", help="sizes only (no hashing)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.cmd_check)

    s = sub.add_parser("repair", help="restore the database, re-embed lost data, rebuild indexes")
    s.add_argument("gallery")
    s.add_argument("--no-reembed", action="store_true",
                   help="do not re-embed items from their images (mark them lost)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    add_run_args(s)
    s.set_defaults(func=commands.cmd_repair)

    add_transform_parser(sub)

    add_upgrade_parser(sub)

    add_fusion_parser(sub)

    add_dedup_parser(sub)

    add_serve_parser(sub)
    add_tune_parser(sub)

    s = sub.add_parser("export-onnx", help="export an extractor to ONNX (+ .json sidecar)")
    add_model_args(s)
    s.add_argument("--out", "-o", required=True,
                   help="the .onnx file to write (a .json sidecar records the preprocessing)")
    s.set_defaults(func=commands.cmd_export_onnx)
    fill_common_help(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_decoder_warnings()
    try:
        return int(args.func(args) or 0)
    except GalleriaError as exc:
        print(f"galleria {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"galleria {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``galleria dedup``: near-duplicate groups of a gallery (JSON and an HTML page)."""

from __future__ import annotations

import argparse
from typing import Any

from galleria.cli.common import print_json, progress_bar, set_threads, setup_logging
from galleria.dedup import DedupConfig, find_duplicates
from galleria.dedup.report import group_paths, write_groups_html
from galleria.io.atomic import write_json
from galleria.store.gallery import Gallery


def add_dedup_parser(sub: Any) -> argparse.ArgumentParser:
    d = DedupConfig()
    s = sub.add_parser(
        "dedup", help="find near-duplicate images (copies: crops, re-encodes, resizes)",
        description="Group the near-duplicates of a gallery: each item's nearest neighbours "
                    "in the global index are candidates; with local features (index --local "
                    "sift) a candidate is confirmed by a geometric check (MAGSAC++ "
                    "homography inliers), without them by a cosine threshold. Prints the "
                    "groups; --out writes the JSON report, --html a page of thumbnails. The "
                    "thresholds suit the EfficientNet-Lite models (docs/dedup.md).")
    s.add_argument("gallery", help="the gallery folder")
    s.add_argument("-k", type=int, default=d.k,
                   help=f"neighbours examined per image (default {d.k})")
    s.add_argument("--candidate", type=float, default=d.candidate, metavar="COS",
                   help=f"cosine from which a pair is checked with local features "
                        f"(default {d.candidate})")
    s.add_argument("--threshold", type=float, default=d.threshold, metavar="COS",
                   help=f"cosine from which a pair is a near-duplicate when the gallery has "
                        f"no local features (default {d.threshold})")
    s.add_argument("--sure", type=float, default=d.sure, metavar="COS",
                   help=f"cosine from which a pair is a near-duplicate without a geometric "
                        f"check (default {d.sure})")
    s.add_argument("--min-inliers", type=int, default=d.min_inliers, metavar="N",
                   help=f"homography inliers that confirm a candidate (default {d.min_inliers})")
    s.add_argument("--verify", default=d.verify, choices=["auto", "always", "never"],
                   help="check candidates with local features: when the gallery has them "
                        "(auto, default), always (error without them) or never")
    s.add_argument("--linkage", default=d.linkage, choices=["complete", "single"],
                   help="groups: every pair in a group confirmed (complete, default) or "
                        "connected components of the confirmed pairs (single: chains)")
    s.add_argument("--min-probability", type=float, default=None, metavar="P",
                   help="take the threshold from the gallery's calibrated match probability "
                        "(run `galleria tune G` first): pairs whose global match probability "
                        "is at least P")
    s.add_argument("--out", "-o", default=None, metavar="FILE.json",
                   help="write the JSON report (groups, confirmed pairs, rule, timings)")
    s.add_argument("--html", default=None, metavar="FILE.html",
                   help="write a page with the thumbnails of every group")
    s.add_argument("--json", action="store_true", help="print the JSON report")
    s.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: all cores)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    s.set_defaults(func=cmd_dedup)
    return s


def cmd_dedup(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    set_threads(args.threads)
    cfg = DedupConfig(k=args.k, candidate=args.candidate, threshold=args.threshold,
                      sure=args.sure, min_inliers=args.min_inliers, verify=args.verify,
                      linkage=args.linkage, min_probability=args.min_probability)
    with Gallery.open(args.gallery, readonly=True) as g:
        rep = find_duplicates(g, cfg, progress=lambda desc, total: progress_bar(
            total, desc, enabled=not args.quiet))
        out = rep.to_dict()
        paths = group_paths(g, rep.groups) if args.html else {}
    if args.out:
        write_json(args.out, out)
    if args.html:
        write_groups_html(args.html, out, paths)
    if args.json:
        print_json(out)
        return 0
    how = ("local features" if rep.local_space else f"cosine >= {rep.config.threshold}")
    print(f"{rep.gallery}: {rep.items} images, {len(rep.groups)} groups of near-duplicates "
          f"({rep.duplicates} images beyond the first of each group); checked by {how}; "
          f"{rep.seconds['total']:.1f} s")
    for n, grp in enumerate(rep.groups[:20], start=1):
        print(f"  {n:>3}. {', '.join(grp)}")
    if len(rep.groups) > 20:
        print(f"  ... {len(rep.groups) - 20} more (--out FILE.json for all)")
    for what, path in (("report", args.out), ("page", args.html)):
        if path:
            print(f"wrote {what} {path}")
    return 0

"""The near-duplicate report as a self-contained HTML page (thumbnails as data URIs)."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

from galleria.io.atomic import write_bytes
from galleria.search.html import thumbnail_uri

THUMB = 160
MAX_GROUPS = 500


def render_groups(report: Mapping[str, Any], paths: Mapping[str, str | None], *,
                  title: str = "galleria: near-duplicates", max_groups: int = MAX_GROUPS) -> str:
    """HTML of ``report`` (``DedupReport.to_dict()``); ``paths[id]`` is each image's file."""
    esc = html.escape
    best: dict[frozenset[str], dict[str, Any]] = {
        frozenset((p["a"], p["b"])): p for p in report.get("pairs", [])}
    blocks = []
    for n, members in enumerate(report.get("groups", [])[:max_groups], start=1):
        cells = []
        for m in members:
            uri = thumbnail_uri(paths[m], THUMB) if paths.get(m) else None
            links = [best[frozenset((m, o))] for o in members if frozenset((m, o)) in best]
            how = "; ".join(
                f"{p['score']:.3f}" + (f", {p['inliers']} inliers" if p.get("inliers", -1)
                                       not in (None, -1) else "") for p in links[:3])
            img = (f"<img src='{uri}' alt=''>" if uri else "<div class='missing'>no image</div>")
            cells.append(f"<figure>{img}<figcaption>{esc(m)}<br><small>{esc(how)}"
                         f"</small></figcaption></figure>")
        blocks.append(f"<section><h2>group {n} ({len(members)} images)</h2>"
                      f"<div class='row'>{''.join(cells)}</div></section>")
    rule = report.get("rule", {})
    local = report.get("local_space")
    how = (f"candidates: cosine &ge; {rule.get('candidate')}; confirmed by &ge; "
           f"{rule.get('min_inliers')} homography inliers (local features, MAGSAC++) or "
           f"cosine &ge; {rule.get('sure')}" if local else
           f"cosine &ge; {rule.get('threshold')} (no local features to verify with)")
    more = len(report.get("groups", [])) - max_groups
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; background: #fafafa; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; width: {THUMB}px; font-size: 12px; word-break: break-all; }}
img {{ max-width: {THUMB}px; max-height: {THUMB}px; display: block; background: #ddd; }}
.missing {{ width: {THUMB}px; height: 100px; background: #eee; color: #999; }}
section {{ border-bottom: 1px solid #ddd; padding-bottom: 8px; }}
h2 {{ font-size: 15px; }}
</style></head><body><h1>{esc(title)}</h1>
<p>{esc(str(report.get('gallery')))}: {report.get('items')} items,
{len(report.get('groups', []))} groups, {report.get('duplicates')} near-duplicates
(images beyond the first of each group). Rule: {how}
(thresholds: {esc(str(report.get('thresholds_from')))}).
Under each image: its cosine similarity to other members (and inliers when verified).</p>
{''.join(blocks)}
{f'<p>{more} more groups in the JSON report.</p>' if more > 0 else ''}
</body></html>
"""


def write_groups_html(path: str | os.PathLike[str], report: Mapping[str, Any],
                      paths: Mapping[str, str | None], **kw: Any) -> None:
    write_bytes(path, render_groups(report, paths, **kw).encode())


def group_paths(gallery: Any, groups: Sequence[Sequence[str]]) -> dict[str, str | None]:
    """``id -> image path`` (from the items' metadata) of every group member."""
    ids = [i for g in groups for i in g]
    return {i: (m or {}).get("path") for i, m in zip(ids, gallery.meta(ids), strict=True)}

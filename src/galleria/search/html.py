"""A self-contained HTML page of search results with thumbnails (data URIs)."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from galleria.images.decode import ImageDecodeError, load_image
from galleria.io.atomic import write_bytes
from galleria.types import SearchResult

THUMB = 192


@lru_cache(maxsize=4096)
def thumbnail_uri(path: str | os.PathLike[str], size: int = THUMB) -> str | None:
    """A small JPEG of the image as a ``data:`` URI, or None if it cannot be read."""
    try:
        img = load_image(path, min_side=1)
    except ImageDecodeError:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render_results(
    queries: Sequence[str],
    result: SearchResult,
    paths: Sequence[Sequence[str | None]],
    *,
    title: str = "galleria search",
    probabilities: np.ndarray | None = None,
) -> str:
    """HTML for queries (file paths) and their results; ``paths[q][j]`` is result j's file.
    ``probabilities``: ``(Q, K)`` calibrated match probabilities beside the scores (with a
    legend), aligned with ``result``'s columns."""
    esc = html.escape
    rows = []
    for q, qpath in enumerate(queries):
        cells = [_cell(qpath, esc(Path(qpath).name), "query")]
        for j, (rid, score) in enumerate(result.row(q)):
            p = paths[q][j]
            pr = "" if probabilities is None else \
                f" &middot; <b>p {float(probabilities[q, j]):.2f}</b>"
            cells.append(_cell(p, f"{j + 1}. {esc(str(rid))}<br>{score:.4f}{pr}", "result"))
        rows.append(f"<div class='row'>{''.join(cells)}</div>")
    if queries:
        rows.insert(0, f"<p class='legend'>{esc(legend(probabilities is not None))}</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; background: #fafafa; }}
.row {{ display: flex; gap: 8px; margin-bottom: 18px; align-items: flex-start; }}
figure {{ margin: 0; width: {THUMB}px; font-size: 12px; word-break: break-all; }}
figure.query img {{ outline: 3px solid #26a; }}
figure.correct img {{ outline: 4px solid #2a6; }}
figure.wrong img {{ outline: 4px solid #c33; }}
.label {{ width: 110px; font-size: 13px; font-weight: 600; }}
img {{ max-width: {THUMB}px; max-height: {THUMB}px; display: block; background: #ddd; }}
.legend {{ font-size: 13px; color: #444; max-width: 60em; }}
.missing {{ width: {THUMB}px; height: 120px; background: #eee; color: #999;
           display: flex; align-items: center; justify-content: center; }}
</style></head><body><h1>{esc(title)}</h1>
{''.join(rows)}
</body></html>
"""


def render_pipelines(
    queries: Sequence[str],
    runs: Sequence[tuple[str, SearchResult, Sequence[Sequence[str | None]]]],
    *,
    truth: Sequence[str | None] | None = None,
    title: str = "galleria: pipelines side by side",
) -> str:
    """HTML comparing pipelines query by query: one row per ``(label, result, paths)``
    run. With ``truth`` (the right id per query, or None) the right result is framed
    green and a wrong first result red."""
    esc = html.escape
    blocks = []
    for q, qpath in enumerate(queries):
        want = truth[q] if truth is not None else None
        rows = []
        for n, (label, result, paths) in enumerate(runs):
            first = _cell(qpath, esc(Path(qpath).name), "query") if n == 0 else \
                f"<div style='width:{THUMB}px'></div>"
            cells = [first, f"<div class='label'>{esc(label)}</div>"]
            for j, (rid, score) in enumerate(result.row(q)):
                kind = "result"
                if want is not None:
                    kind = "correct" if rid == want else ("wrong" if j == 0 else "result")
                mark = " &#10003; correct" if kind == "correct" else ""
                cells.append(_cell(paths[q][j], f"{j + 1}. {esc(str(rid))}{mark}<br>"
                                   f"{score:.4f}", kind))
            rows.append(f"<div class='row'>{''.join(cells)}</div>")
        blocks.append(f"<div class='query'>{''.join(rows)}</div><hr>")
    return _page(title, "".join(blocks))


def _page(title: str, body: str) -> str:
    return render_results([], SearchResult.empty(0, 1), [], title=title).replace(
        "</h1>\n\n</body>", f"</h1>\n{body}\n</body>")


def legend(calibrated: bool) -> str:
    """The score legend of the results page."""
    base = ("score: the pipeline's raw score, on its own scale (cosine similarity for "
            "global search; larger is better).")
    if not calibrated:
        return base + (" No match probability: the gallery was not tuned for this pipeline "
                       "(run `galleria tune G`).")
    return base + (" p: the calibrated probability (0 to 1) that the result shows the same "
                   "object or scene as the query, fitted on the gallery's own pseudo-queries; "
                   "comparable across pipelines (e.g. keep p >= 0.5).")


def _cell(path: str | None, caption: str, kind: str) -> str:
    uri = thumbnail_uri(path) if path else None
    img = f"<img src='{uri}' alt=''>" if uri else "<div class='missing'>no preview</div>"
    return f"<figure class='{kind}'>{img}<figcaption>{caption}</figcaption></figure>"


def write_results_html(path: str | os.PathLike[str], *args: object, **kw: object) -> None:
    write_bytes(path, render_results(*args, **kw).encode())  # type: ignore[arg-type]


def write_pipelines_html(path: str | os.PathLike[str], *args: object, **kw: object) -> None:
    write_bytes(path, render_pipelines(*args, **kw).encode())  # type: ignore[arg-type]

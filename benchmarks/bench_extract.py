"""Extraction throughput, side by side in one run (images/s, end to end: decode +
preprocess + network + pooling):

- naive: a plain per-image torch loop (PIL decode, resize, one forward per image);
- galleria batched torch: threaded decoding, batches of 32, torch eager;
- galleria ONNX Runtime: the same pipeline with the exported graph;
each at 1 and 2 compute threads, on real photos (SMVS DVD covers, 640 px).

Run:  .venv/bin/python benchmarks/bench_extract.py [--models effnet-lite0 ...] [--n 300]
Writes benchmarks/results/extract.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import interleaved_best, machine_info, markdown_table, peak_rss_mb, write_results
from galleria.eval.paths import dataset_dir
from galleria.threads import set_threads


def image_paths(n: int) -> list[Path]:
    root = dataset_dir("smvs_dvd_covers") / "jpg"
    paths = sorted(root.rglob("*.jpg"))
    return paths[:n]


def naive_torch(model: str, paths: list[Path]) -> Callable[[], None]:
    """The loop a user writes first: one image at a time, torch eager."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    from galleria.extractors import effnet

    spec = effnet.VARIANTS[model]
    net = EfficientNet.from_pretrained(spec["arch"], weights_path=effnet.weights_path(model))
    net.eval()
    size = spec["size"]

    def run() -> None:
        with torch.no_grad():
            for p in paths:
                img = Image.open(p).convert("RGB").resize((size, size),
                                                          Image.Resampling.BILINEAR)
                x = (np.asarray(img, np.float32) - 127.0) / 128.0
                f = net.extract_features(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
                g = f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
                torch.nn.functional.normalize(g, dim=1)

    return run


def galleria_unit(model: str, paths: list[Path], runtime: str, threads: int,
                  batch_size: int = 32) -> Callable[[], None]:
    """galleria's pipeline: threaded decoding, batched inference."""
    from galleria.extract.embed import embed_items
    from galleria.extractors.registry import create_extractor
    from galleria.images.sources import SourceItem

    ext = create_extractor(model, runtime=runtime, threads=threads)
    items = [SourceItem(id=str(p), path=p) for p in paths]

    def run() -> None:
        _, ok, _ = embed_items(items, ext, batch_size=batch_size, workers=2)
        assert ok.all()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["effnet-lite0", "effnet-lite2"])
    ap.add_argument("--n", type=int, default=300, help="images per measurement")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    args = ap.parse_args()
    paths = image_paths(args.n)
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for th in args.threads:
        set_threads(th)
        for model in args.models:
            units = {
                "naive_torch": naive_torch(model, paths),
                "galleria_torch_batched": galleria_unit(model, paths, "torch", th),
                "galleria_onnx_batched": galleria_unit(model, paths, "onnx", th),
            }
            best = interleaved_best(units, rounds=args.rounds, min_unit_s=0.0)
            r: dict[str, Any] = {"model": model, "threads": th}
            for name, t in best.items():
                r[name] = len(paths) / t["wall"]
            r["onnx_vs_naive"] = r["galleria_onnx_batched"] / r["naive_torch"]
            rows.append(r)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()},
                  flush=True)
        unit = {"onnx": galleria_unit("opennsfw-r50", paths, "onnx", th)}
        t = interleaved_best(unit, rounds=args.rounds, min_unit_s=0.0)["onnx"]["wall"]
        rows.append({"model": "opennsfw-r50", "threads": th, "naive_torch": None,
                     "galleria_torch_batched": None, "galleria_onnx_batched": len(paths) / t,
                     "onnx_vs_naive": None})
    table = markdown_table(
        ["model", "threads", "naive per-image torch", "galleria batched torch",
         "galleria batched ONNX Runtime", "ONNX / naive"],
        [[r["model"], r["threads"],
          *[("" if r[k] is None else f"{r[k]:.1f}") for k in
            ("naive_torch", "galleria_torch_batched", "galleria_onnx_batched")],
          "" if r["onnx_vs_naive"] is None else f"{r['onnx_vs_naive']:.2f}x"] for r in rows],
    )
    md = "\n".join([
        "# Extraction throughput (images/s, end to end)", "",
        f"{len(paths)} real SMVS photos (640 px JPEG) per measurement; decode + resize + "
        "network + GeM + L2. galleria runs use 2 decoding threads, I/O batches of 32 and "
        "network micro-batches of `Extractor.infer_batch` (2): on CPU the per-image cost "
        "rises with larger batches (activations leave the cache).", "",
        table, "", f"Best of {args.rounds} interleaved rounds (each round runs every variant "
        "once, so background load hits them alike). Load average at start/end: "
        f"{load_start[0]:.1f} / {os.getloadavg()[0]:.1f}. "
        f"Peak RSS of the benchmark process: {peak_rss_mb():.0f} MB.", "",
    ])
    write_results("extract", {"machine": machine_info(), "n_images": len(paths), "rows": rows},
                  md)


if __name__ == "__main__":
    main()

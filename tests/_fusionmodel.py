"""A small real fusion model for tests: two cheap members (effnet-lite0 at 128 px GeM, at
96 px mean), an untrained transformer mixer (d 32), the Lite0 query with a random whitening
on L2-normalised pooled features."""

from __future__ import annotations

import csv
from pathlib import Path


def small_fusion_model(out: Path) -> Path:
    import torch

    from galleria.extractors.registry import create_extractor
    from galleria.fusion.members import input_spec
    from galleria.fusion.mixer import build_mixer
    from galleria.fusion.model import FusionModel
    from galleria.fusion.query_model import build, query_weights_id

    members = [create_extractor("effnet-lite0", size=128, runtime="onnx"),
               create_extractor("effnet-lite0", size=96, pooling="mean", runtime="onnx")]
    specs = [input_spec(m) for m in members]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mixer = build_mixer("transformer", specs, d=32, layers=1, heads=4)
        trunk, tail = build("effnet-lite0", 0, 32, normalize=True)
        with torch.no_grad():
            tail.whiten.weight.normal_(0, 0.05)
    FusionModel(
        members=[{"config": m.config(), "fingerprint": m.fingerprint} for m in members],
        specs=specs, mixer=mixer,
        mixer_params={"kind": "transformer", "d": 32, "layers": 1, "heads": 4}, tail=tail,
        query_params={"model": "effnet-lite0", "train_blocks": 0, "d": 32, "size": 224,
                      "weights_id": query_weights_id("effnet-lite0"),
                      "pooling": {"kind": "gem", "p": 3.0, "eps": 1e-6}, "normalize": True},
        recipe={"note": "test"}, training={"epochs": 0}).save(out, trunk=trunk)
    return out


def write_manifest(root: Path, rows: list[dict[str, str]], path: Path) -> Path:
    """A manifest (``id,path``) of COIL-style ``rows`` under ``root``."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "path"])
        w.writeheader()
        for r in rows:
            w.writerow({"id": r["path"], "path": str(root / r["path"])})
    return path

"""Shipped / saved codebooks: fingerprints recorded in ASMK indexes and checked on load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.local.asmk import AsmkIndex
from galleria.local.codebook import (
    Codebook,
    check_recorded,
    descriptor_of,
    load_codebook,
    save_codebook,
    shipped_codebook,
    train_codebook,
)
from galleria.types import LocalFeatures


def _feats(rng, n, m=60, d=128):
    out = []
    for _ in range(n):
        desc = np.abs(rng.standard_normal((m, d))).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        kp = np.c_[rng.uniform(0, 300, (m, 2)), np.ones((m, 2))].astype(np.float32)
        out.append(LocalFeatures(kp, desc, (300, 300)))
    return out


def test_codebook_round_trip_and_tamper_check(tmp_path, rng):
    c = train_codebook(rng.standard_normal((400, 8)).astype(np.float32), 16, seed=0, iters=5)
    cb = Codebook.from_float("toy-v1", "toy", c, {"note": "test"})
    save_codebook(tmp_path / "cb", cb)
    back = load_codebook(tmp_path / "cb")
    assert back.fingerprint == cb.fingerprint and back.fingerprint.startswith("toy-v1@")
    np.testing.assert_array_equal(back.centroids16, cb.centroids16)
    # edited centroids no longer hash to the header's fingerprint
    arr = np.load(tmp_path / "cb" / "centroids.npy")
    arr[0, 0] += np.float16(1)
    np.save(tmp_path / "cb" / "centroids.npy", arr)
    with pytest.raises(FormatError):
        load_codebook(tmp_path / "cb")
    with pytest.raises(CompatibilityError):
        check_recorded(cb.fingerprint, arr.astype(np.float32), what="index")
    with pytest.raises(InputError):
        train_codebook(np.zeros((5, 8), np.float32), 16)
    assert descriptor_of("sift-1000-1024@abc") == "sift" and descriptor_of(None) is None


def test_asmk_uses_the_shipped_codebook_and_refuses_a_mismatch(tmp_path, rng):
    cb = shipped_codebook("sift")
    assert cb is not None and cb.words == 16384 and cb.dim == 128
    idx = AsmkIndex(128, fingerprint="sift-1000-1024@test", quantizer="flat")  # fast build
    idx.add(np.arange(6), _feats(rng, 6))
    assert idx.params()["codebook"] == cb.fingerprint and idx.codebook_size == 16384
    res = idx.search(_feats(rng, 1), 3)
    assert res.ids.shape == (1, 3)
    idx.save(tmp_path / "ix")
    back = AsmkIndex.load(tmp_path / "ix", fingerprint="sift-1000-1024@test", dim=128)
    np.testing.assert_array_equal(back.search(_feats(np.random.default_rng(1), 1), 3).ids,
                                  idx.search(_feats(np.random.default_rng(1), 1), 3).ids)
    # an index recording another build of the same codebook name is refused
    head = json.loads((tmp_path / "ix" / "header.json").read_text())
    head["params"]["codebook"] = "sift-v1@0000000000000000"
    (tmp_path / "ix" / "header.json").write_text(json.dumps(head))
    with pytest.raises((CompatibilityError, FormatError)):
        AsmkIndex.load(tmp_path / "ix", fingerprint="sift-1000-1024@test", dim=128)
    # explicit choices: train on the gallery, or an unknown name
    own = AsmkIndex(128, fingerprint="sift-1000-1024@test", codebook="gallery")
    own.add(np.arange(6), _feats(rng, 6))
    assert own.params()["codebook"] == "gallery" and own.codebook_size < 16384
    with pytest.raises(InputError):
        AsmkIndex(128, codebook="nope-v9")

"""Saved estimators (transforms, cross-model maps) share one save/load machinery
(galleria.io.estimator): old folders load unchanged, re-saves are atomic, damaged or
foreign folders are FormatErrors, and an artifact that records no fingerprint is
refused when one is expected (check_fingerprint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError
from galleria.io import estimator
from galleria.io.artifact import check_fingerprint, load_header
from galleria.transforms.registry import create_transform, load_transform
from galleria.upgrade.psi import ReverseTransform, load_cross_map

LEGACY = Path(__file__).parent / "data" / "legacy"
FP = "toy-model@0123456789abcdef"
OLD_FP = "toy-old@fedcba9876543210"


def _toy(n=64, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_folders_saved_by_the_old_code_load_and_give_the_same_outputs(tmp_path):
    q = np.load(LEGACY / "inputs.npy")
    for name in ("pca-whiten-v1", "psi-v1"):
        assert (LEGACY / name / "state.safetensors").is_file()
    t = load_transform(LEGACY / "pca-whiten-v1", fingerprint=FP)
    np.testing.assert_allclose(t.transform(q, fingerprint=FP),
                               np.load(LEGACY / "pca-whiten-v1.out.npy"), atol=1e-6)
    m = load_cross_map(LEGACY / "psi-v1", old_fingerprint=OLD_FP, new_fingerprint=FP)
    np.testing.assert_allclose(m.transform(q, fingerprint=FP),
                               np.load(LEGACY / "psi-v1.out.npy"), atol=1e-6)
    # re-saving an old folder moves it to the new layout, same outputs
    shutil.copytree(LEGACY / "pca-whiten-v1", tmp_path / "t")
    t.save(tmp_path / "t")
    assert not (tmp_path / "t" / "state.safetensors").exists()
    np.testing.assert_allclose(load_transform(tmp_path / "t").transform(q), t.transform(q))


def test_resave_replaces_the_state_atomically(tmp_path, monkeypatch):
    x = _toy()
    a = create_transform("pca", dim=4).fit(x, fingerprint=FP)
    b = create_transform("pca", dim=6).fit(x, fingerprint=FP)
    a.save(tmp_path / "t")
    b.save(tmp_path / "t")
    states = sorted(p.name for p in (tmp_path / "t").glob("state*.safetensors"))
    header = json.loads((tmp_path / "t" / "header.json").read_text())
    assert states == [header["state_file"]]  # the previous state file is gone
    assert load_transform(tmp_path / "t").output_dim_ == 6

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed while writing the header")

    monkeypatch.setattr(estimator, "save_header", crash)
    with pytest.raises(KeyboardInterrupt):
        a.save(tmp_path / "t")
    monkeypatch.undo()
    # the previous complete save is intact, and the new state file was removed
    assert load_transform(tmp_path / "t").output_dim_ == 6
    assert sorted(p.name for p in (tmp_path / "t").glob("state*.safetensors")) == states


def test_damaged_or_foreign_folders_are_format_errors(tmp_path):
    x = _toy()
    psi = ReverseTransform(hidden=0, epochs=1, batch_size=16).fit(
        x, _toy(d=8, seed=1), new_fingerprint=FP, old_fingerprint=OLD_FP)
    psi.save(tmp_path / "m")
    create_transform("center").fit(x, fingerprint=FP).save(tmp_path / "c")
    with pytest.raises(FormatError, match="'cross-model-map'"):
        load_transform(tmp_path / "m")
    with pytest.raises(FormatError, match="holds a 'transform'"):
        load_cross_map(tmp_path / "c")
    header = json.loads((tmp_path / "m" / "header.json").read_text())
    for field, value, word in (("state_file", "../c/x.safetensors", "not a file name"),
                               ("state_file", "missing.safetensors", "cannot read"),
                               ("params", {"bogus": 1}, "do not fit"),
                               ("kind", "nope", "unknown map kind")):
        bad = tmp_path / f"bad-{field}-{word[:4]}"
        shutil.copytree(tmp_path / "m", bad)
        (bad / "header.json").write_text(json.dumps({**header, field: value}))
        with pytest.raises(FormatError, match=word):
            load_cross_map(bad)
    state = tmp_path / "m" / header["state_file"]
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(FormatError, match="cannot read"):
        load_cross_map(tmp_path / "m")
    (tmp_path / "c" / "header.json").write_text("[1, 2]")  # JSON, but not an object
    with pytest.raises(FormatError, match="holds a 'list' artifact"):
        load_header(tmp_path / "c" / "header.json", type="transform", format_version=1)


def test_check_fingerprint_needs_both_when_one_is_expected():
    check_fingerprint(None, None, what="x")
    check_fingerprint(None, FP, what="x")  # the caller does not know: nothing to check
    check_fingerprint(FP, FP, what="x")
    with pytest.raises(CompatibilityError) as ei:
        check_fingerprint(FP, None, what="index at /g")
    assert FP in str(ei.value) and "None" in str(ei.value) and "index at /g" in str(ei.value)
    with pytest.raises(CompatibilityError) as ei:
        check_fingerprint(FP, OLD_FP, what="x")
    assert FP in str(ei.value) and OLD_FP in str(ei.value)


def test_artifacts_without_a_fingerprint_are_refused_when_one_is_expected(tmp_path):
    from galleria.extractors.transformed import TransformedExtractor

    x = _toy()
    t = create_transform("pca", dim=4).fit(x)  # no fingerprint
    t.save(tmp_path / "t")
    load_transform(tmp_path / "t")  # nothing expected: fine
    with pytest.raises(CompatibilityError, match="records no model fingerprint"):
        load_transform(tmp_path / "t", fingerprint=FP)
    m = ReverseTransform(hidden=0, epochs=1, batch_size=16).fit(x, _toy(d=8, seed=1))
    m.save(tmp_path / "m")
    with pytest.raises(CompatibilityError, match="unknown model"):
        load_cross_map(tmp_path / "m", new_fingerprint=FP)

    class Base:
        fingerprint = FP

    with pytest.raises(CompatibilityError, match="unknown model"):
        TransformedExtractor(Base(), t)  # type: ignore[arg-type]


def test_concurrent_saves_and_loads_of_one_folder(tmp_path):
    """Two writers re-save different transforms into one folder while two readers load
    it: no reader fails, each load is one complete save, the final folder is valid."""
    import threading
    import time

    x = _toy()
    fits = [create_transform("pca", dim=d).fit(x, fingerprint=FP) for d in (4, 6)]
    want = {t.output_fingerprint for t in fits}
    folder = tmp_path / "t"
    fits[0].save(folder)
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def writer(t, n=40):
        try:
            for _ in range(n):
                t.save(folder)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            while not stop.is_set():
                seen.add(load_transform(folder, fingerprint=FP).output_fingerprint)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(t,)) for t in fits]
    for th in readers + writers:
        th.start()
    deadline = time.monotonic() + 60
    for th in writers:
        th.join(timeout=max(0.1, deadline - time.monotonic()))
    stop.set()
    for th in readers:
        th.join(timeout=10)
    assert not any(th.is_alive() for th in readers + writers)
    assert not errors, errors[:3]
    assert seen <= want and seen
    assert load_transform(folder).output_fingerprint in want
    header = json.loads((folder / "header.json").read_text())
    assert (folder / header["state_file"]).is_file()

"""Local extractors (sift, xfeat) on real photos: contract, size policy, failures, threads."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest
from PIL import Image

from galleria.cli.main import main as cli
from galleria.errors import CompatibilityError, InputError
from galleria.extract.embed import embed_stream, extract_local_items
from galleria.extractors.local import _resized
from galleria.extractors.registry import create_extractor, extractor_from_config, list_models
from galleria.images.sources import SourceItem
from galleria.local.features import float_descriptors
from galleria.types import LocalFeatures

LOCAL = ["sift", "xfeat"]


@pytest.fixture(scope="module")
def extractors():
    return {name: create_extractor(name, max_keypoints=300) for name in LOCAL}


@pytest.fixture(scope="module")
def astronaut(photos):
    return Image.open(photos / "astronaut.jpg").convert("RGB")  # 512 x 512


def test_registry_lists_local_models_with_their_kind(capsys):
    kinds = {s.name: s.kind for s in list_models()}
    assert kinds["sift"] == kinds["xfeat"] == "local" and kinds["effnet-lite0"] == "global"
    assert cli(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {m["name"]: m["kind"] for m in out["models"]}["xfeat"] == "local"


@pytest.mark.parametrize("name", LOCAL)
def test_features_on_a_real_photo(extractors, astronaut, name):
    ext = extractors[name]
    (f,) = ext.embed_images([astronaut])
    assert isinstance(f, LocalFeatures) and 100 < len(f) <= 300
    assert f.dim == ext.dim == (128 if name == "sift" else 64)
    assert f.image_size == astronaut.size
    x, y = f.keypoints[:, 0], f.keypoints[:, 1]
    assert (x >= 0).all() and (x < 512).all() and (y >= 0).all() and (y < 512).all()
    assert (np.diff(f.keypoints[:, 3]) <= 0).all()  # strongest first
    d = float_descriptors(f.descriptors)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    if name == "sift":
        assert f.descriptors.dtype == np.uint8


@pytest.mark.parametrize("name", LOCAL)
def test_keypoints_are_in_original_pixels_when_the_image_is_downscaled(astronaut, name):
    small = create_extractor(name, max_keypoints=200, max_side=256)
    big = astronaut  # 512: downscaled by 0.5 inside the extractor
    (fb,) = small.embed_images([big])
    (fs,) = small.embed_images([_resized(big, 0.5)])  # the same pixels, given directly
    assert len(fb) == len(fs) > 50
    assert np.allclose(fb.keypoints[:, :2], 2 * fs.keypoints[:, :2], atol=1e-3)
    assert np.array_equal(fb.descriptors, fs.descriptors)


def test_rootsift_uint8_matches_float_rootsift(astronaut):
    import cv2

    from galleria.extractors.local import rootsift_uint8

    grey = np.asarray(astronaut.convert("L"))
    _, desc = cv2.SIFT_create(nfeatures=200).detectAndCompute(grey, None)
    ref = np.sqrt(desc / desc.sum(axis=1, keepdims=True))
    got = float_descriptors(rootsift_uint8(desc))
    assert np.einsum("ij,ij->i", ref, got).min() > 0.999


@pytest.mark.parametrize("name", LOCAL)
def test_blank_and_tiny_images_give_zero_or_few_keypoints(extractors, name):
    ext = extractors[name]
    blank, tiny = Image.new("RGB", (320, 240), (90, 90, 90)), Image.new("RGB", (23, 28), "white")
    fb, ft = ext.embed_images([blank, tiny])
    assert len(fb) == 0 and fb.descriptors.shape == (0, ext.dim)
    assert len(ft) == 0


@pytest.mark.parametrize("name", LOCAL)
def test_config_fingerprint_and_pickle_round_trip(extractors, name):
    ext = extractors[name]
    assert ext.kind == "local" and ext.config() == {"type": name, "max_keypoints": 300}
    again = extractor_from_config(ext.config(), fingerprint=ext.fingerprint)
    assert again.fingerprint == ext.fingerprint
    assert pickle.loads(pickle.dumps(ext)).fingerprint == ext.fingerprint
    other = create_extractor(name, max_keypoints=300, max_side=512)
    assert other.fingerprint != ext.fingerprint and other.info().input_size == (512, 512)
    with pytest.raises(CompatibilityError):
        extractor_from_config(other.config(), fingerprint=ext.fingerprint)
    with pytest.raises(InputError):
        create_extractor(name, pooling="gem")
    with pytest.raises(InputError):
        create_extractor(name, no_such_option=1)


def test_stream_reports_corrupt_and_empty_files_and_keeps_order(extractors, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), "black").save(blank)
    paths = [photos / "chelsea.jpg", bad, blank, empty, photos / "coffee.jpg"]
    items = [SourceItem(id=str(i), path=p) for i, p in enumerate(paths)]
    for name in LOCAL:
        feats, failures = extract_local_items(items, extractors[name], batch_size=2)
        assert [it.id for it, _ in failures] == ["1", "3"]
        assert feats[1] is None and feats[3] is None
        assert len(feats[0]) > 50 and len(feats[2]) == 0 and len(feats[4]) > 50
        batches = list(embed_stream(items, extractors[name], batch_size=2))
        assert all(b.features is not None and len(b.features) == len(b.items) for b in batches)
        assert all(b.vectors.shape == (0, extractors[name].dim) for b in batches)


def test_global_stream_still_yields_vectors(photos):
    ext = create_extractor("effnet-lite0", size=96)
    items = [SourceItem(id="a", path=photos / "rocket.jpg")]
    (b,) = list(embed_stream(items, ext))
    assert b.features is None and b.vectors.shape == (1, ext.dim)


def test_sift_prepare_is_thread_safe(extractors, photos):
    ext = extractors["sift"]
    imgs = [Image.open(photos / f"{n}.jpg").convert("RGB") for n in ("chelsea", "coffee")]
    ref = [ext.prepare(im)[0] for im in imgs]
    results: list[tuple[int, LocalFeatures]] = []
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for r in range(3):
                i = (seed + r) % 2
                results.append((i, ext.prepare(imgs[i])[0]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads) and len(results) == 12
    for i, f in results:
        assert np.array_equal(f.descriptors, ref[i].descriptors)
        assert np.array_equal(f.keypoints, ref[i].keypoints)

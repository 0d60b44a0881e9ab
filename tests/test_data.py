"""Tests for guided.data: layouts, labels, preprocessing, robustness, sharding, digits."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from guided.data import (DigitsDataset, ImageFolderDataset, LabelMap, build_dataset, center_crop_arr,
                         detect_layout, imagenet_classes, infinite_batches, load_rgb, random_crop_arr,
                         shard_indices)
from guided.errors import GuidedError

TENCH, GOLDEN, TISSUE = "n01440764", "n02099601", "n15075141"


def _img(path, size=(40, 30), seed=0, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def imagenet_dir(tmp_path):
    for k, wnid in enumerate([GOLDEN, TENCH, TISSUE]):
        for j in range(3):
            _img(tmp_path / wnid / f"{wnid}_{j}.JPEG", seed=10 * k + j)
    _img(tmp_path / TENCH / "x.png", seed=99)  # any common extension, case-insensitive
    return tmp_path


@pytest.fixture
def flat_dir(tmp_path):
    for j, name in enumerate(["dog_1.png", "cat_1.png", "cat_2.jpg", "bird_x_y.PNG"]):
        _img(tmp_path / name, seed=j)
    return tmp_path


def _one_line_error(fn, *words):
    with pytest.raises(GuidedError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg
    return msg


# ---- layouts and labels ---------------------------------------------------------

def test_imagenet_layout_labels(imagenet_dir):
    assert detect_layout(str(imagenet_dir)) == "imagenet"
    ds = build_dataset({"kind": "auto", "root": str(imagenet_dir), "image_size": 8})
    assert ds.layout == "imagenet" and len(ds) == 10
    assert ds.label_map.keys == (TENCH, GOLDEN, TISSUE)
    assert ds.label_map.names == ("tench", "golden retriever", "toilet tissue")
    for f, y in zip(ds.files, ds.labels):
        assert ds.label_map.key(y) in f
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_flat_layout_labels(flat_dir):
    assert detect_layout(str(flat_dir)) == "flat"
    ds = build_dataset({"kind": "folder", "root": str(flat_dir), "image_size": 8})
    assert ds.label_map.keys == ("bird", "cat", "dog")
    got = {f.rsplit("/", 1)[-1]: y for f, y in zip(ds.files, ds.labels)}
    assert got == {"bird_x_y.PNG": 0, "cat_1.png": 1, "cat_2.jpg": 1, "dog_1.png": 2}


def test_class_subsets(imagenet_dir):
    root = str(imagenet_dir)
    ds = build_dataset({"kind": "imagenet", "root": root, "classes": [TISSUE, TENCH], "image_size": 8})
    assert ds.label_map.keys == (TENCH, TISSUE) and sorted(set(ds.labels)) == [0, 1] and len(ds) == 7
    ds = build_dataset({"kind": "imagenet", "root": root, "classes": 2, "image_size": 8})
    assert ds.label_map.keys == (TENCH, GOLDEN)
    ds = build_dataset({"kind": "imagenet", "root": root, "classes": ["golden retriever"], "image_size": 8})
    assert ds.label_map.keys == (GOLDEN,) and set(ds.labels) == {0}


def test_label_map_json_and_lookup(tmp_path):
    lm = LabelMap.from_keys(c.wnid for c in imagenet_classes())
    lm.save(tmp_path / "labels.json")
    back = LabelMap.load(tmp_path / "labels.json")
    assert back == lm
    assert back.index("golden retriever") == 207 == back.index(GOLDEN) == back.index("207") == back.index(207)
    assert back.index("Toilet Paper") == 999  # a synonym, case-insensitive
    assert back.index("crane") == 517 and back.index("crane bird") == 134
    _one_line_error(lambda: back.index("grass snake"), "ambiguous")
    _one_line_error(lambda: back.index("unicorn"), "unicorn")
    _one_line_error(lambda: back.index(1000), "1000")


def test_imagenet_classes_tsv():
    rows = imagenet_classes()
    wnids = [r.wnid for r in rows]
    assert len(rows) == 1000 and [r.index for r in rows] == list(range(1000))
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert (rows[0].wnid, rows[0].name) == (TENCH, "tench")
    assert (rows[207].wnid, rows[207].name) == (GOLDEN, "golden retriever")
    assert (rows[999].wnid, rows[999].name) == (TISSUE, "toilet tissue")
    assert len({r.name for r in rows}) == 1000


# ---- preprocessing --------------------------------------------------------------

def test_center_crop_matches_reference_steps():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    # 100x60 -> 32: min side 60 < 64, no BOX step; bicubic to (round(100*32/60), 32) = (53, 32);
    # centre crop x from (53 - 32) // 2 = 10.
    want = np.array(img.resize((53, 32), resample=Image.BICUBIC))[:, 10:42]
    assert np.array_equal(center_crop_arr(img, 32), want)
    # 200x130 -> 32: BOX halvings 200x130 -> 100x65 -> 50x32, bicubic at scale 1, crop x from 9.
    big = Image.fromarray(np.random.default_rng(2).integers(0, 256, (130, 200, 3), dtype=np.uint8))
    halved = big.resize((100, 65), resample=Image.BOX).resize((50, 32), resample=Image.BOX)
    want = np.array(halved.resize((50, 32), resample=Image.BICUBIC))[:, 9:41]
    out = center_crop_arr(big, 32)
    assert out.shape == (32, 32, 3) and np.array_equal(out, want)


def test_random_crop_matches_reference_steps():
    import random
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    rng = random.Random(5)
    out = random_crop_arr(img, 32, random.Random(5))
    side = rng.randrange(32, 40 + 1)  # ceil(32 / 1.0) .. ceil(32 / 0.8)
    arr = np.array(img.resize((round(100 * side / 60), side), resample=Image.BICUBIC))
    y, x = rng.randrange(arr.shape[0] - 32 + 1), rng.randrange(arr.shape[1] - 32 + 1)
    assert out.shape == (32, 32, 3) and np.array_equal(out, arr[y:y + 32, x:x + 32])


def test_random_crop_in_memory_equals_from_disk(tmp_path):
    _img(tmp_path / "a_1.png", size=(200, 130))
    kw = dict(layout="flat", random_crop=True, random_flip=True)
    disk = ImageFolderDataset(tmp_path, 24, in_memory=False, **kw)
    mem = ImageFolderDataset(tmp_path, 24, in_memory=True, **kw)
    for seed in range(6):
        assert torch.equal(disk[(0, seed)][0], mem[(0, seed)][0])


def test_flips_about_half_the_time(tmp_path):
    _img(tmp_path / "a_1.png", size=(16, 16))
    ds = ImageFolderDataset(tmp_path, 16, layout="flat", random_flip=True)
    plain = ImageFolderDataset(tmp_path, 16, layout="flat", random_flip=False)[0][0]
    flips = sum(torch.equal(ds[(0, s)][0], plain.flip(-1)) for s in range(400))
    assert 160 < flips < 240
    assert sum(not torch.equal(ds[0][0], plain) for _ in range(200)) in range(60, 140)


# ---- robustness -----------------------------------------------------------------

def _bad_folder(tmp_path):
    for j in range(4):
        _img(tmp_path / f"a_{j}.png", seed=j)
    good = _img(tmp_path / "b_0.jpg", size=(64, 64), fmt="JPEG").read_bytes()
    (tmp_path / "b_1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "b_2.png").write_bytes(b"")  # zero bytes
    (tmp_path / "b_3.png").write_bytes(b"not an image at all")


def test_bad_files_skipped_lazily(tmp_path):
    _bad_folder(tmp_path)
    with pytest.warns(UserWarning, match="b_2.png"):
        ds = ImageFolderDataset(tmp_path, 8, layout="flat", in_memory=False)
    assert len(ds) == 7 and ds.skipped == 1
    assert ds.files[-2:] == [str(tmp_path / "b_1.jpg"), str(tmp_path / "b_3.png")]
    with pytest.warns(UserWarning) as rec:
        x, y = ds[(5, 1)]  # b_1 and b_3 are bad: replaced by the next good index, wrapping to 0
    assert [str(tmp_path / n) in str(w.message) for w in rec for n in ("b_1.jpg", "b_3.png")].count(True) == 2
    assert x.shape == (3, 8, 8) and torch.equal(x, ds[(0, 1)][0]) and y == ds.labels[0] == 0
    assert ds.skipped == 3
    assert sorted(f.rsplit("/", 1)[-1] for f in ds.skipped_files) == ["b_1.jpg", "b_2.png", "b_3.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are passed over quietly
        [ds[i] for i in range(len(ds))]
    assert ds.skipped == 3


def test_bad_files_skipped_in_memory_and_in_workers(tmp_path):
    _bad_folder(tmp_path)
    with pytest.warns(UserWarning) as rec:
        mem = ImageFolderDataset(tmp_path, 8, layout="flat", in_memory=True)
    assert len(mem) == 5 and mem.skipped == 3
    assert all(any(n in str(w.message) for w in rec) for n in ("b_1.jpg", "b_2.png", "b_3.png"))
    with pytest.warns(UserWarning):
        lazy = ImageFolderDataset(tmp_path, 8, layout="flat", in_memory=False)
    stream = iter(infinite_batches(lazy, 7, seed=0, num_workers=2))
    x, y = next(stream)
    assert x.shape == (7, 3, 8, 8) and lazy.skipped == 3  # counted across worker processes


def test_modes_converted_to_rgb(tmp_path):
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    arr16[:, :4] = 0
    Image.fromarray(arr16).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    _img(tmp_path / "cmyk.jpg", mode="CMYK")
    _img(tmp_path / "grey.png", mode="L")
    _img(tmp_path / "pal.png", mode="P")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255
    rgba[:, 4:, 3] = 255  # left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for name in ["i16.png", "cmyk.jpg", "grey.png", "pal.png", "rgba.png"]:
        img = load_rgb(str(tmp_path / name))
        assert img.mode == "RGB", name
    a16 = np.array(load_rgb(str(tmp_path / "i16.png")))
    assert (a16[:, :4] == 0).all() and (a16[:, 4:] == 255).all()
    a = np.array(load_rgb(str(tmp_path / "rgba.png")))
    assert (a[:, :4] == 255).all() and (a[:, 4:] == [255, 0, 0]).all()  # composited on white


# ---- sharding and the resumable stream ------------------------------------------

def test_shards_disjoint_and_cover():
    for n in (10, 11):
        a, b = shard_indices(n, 0, 2, seed=3, epoch=1), shard_indices(n, 1, 2, seed=3, epoch=1)
        assert not set(a) & set(b) and len(a) == len(b) == n // 2
        assert len(set(a) | set(b)) == n - n % 2
    assert set(shard_indices(10, 0, 2, 3, 0) + shard_indices(10, 1, 2, 3, 0)) == set(range(10))
    assert shard_indices(10, 0, 2, 3, 0) != shard_indices(10, 0, 2, 3, 1)  # reshuffled each epoch
    _one_line_error(lambda: shard_indices(10, 2, 2), "rank")


def test_stream_resumes_to_same_batches(tmp_path):
    for j in range(10):
        _img(tmp_path / f"c{j % 3}_{j}.png", size=(20, 14), seed=j)
    ds = ImageFolderDataset(tmp_path, 8, layout="flat", random_flip=True, random_crop=True)
    whole = infinite_batches(ds, 2, rank=1, world_size=2, seed=7)
    ref = [b for b in itertools.islice(whole, 7)]  # crosses epochs: 2 batches per epoch
    first = infinite_batches(ds, 2, rank=1, world_size=2, seed=7)
    head = [b for b in itertools.islice(first, 3)]
    assert first.state() == {"epoch": 1, "step": 1}
    resumed = infinite_batches(ds, 2, rank=1, world_size=2, seed=7, state=first.state())
    tail = [b for b in itertools.islice(resumed, 4)]
    for (x1, y1), (x2, y2) in zip(ref, head + tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = infinite_batches(ds, 2, rank=0, world_size=2, seed=7)
    assert not torch.equal(next(iter(other))[0], ref[0][0])


# ---- digits ---------------------------------------------------------------------

def test_digits():
    tr, ho = DigitsDataset(), build_dataset({"kind": "digits", "split": "heldout"})
    assert len(tr) == 1500 and len(ho) == 297
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.equal(x[0], x[2])
    assert tr.images.min() == -1 and tr.images.max() <= 1 and tr.images.max() > 0.9
    assert np.bincount(ho.labels).min() >= 29 and np.bincount(ho.labels).max() <= 30  # stratified
    assert tr.label_map.names == tuple("0123456789")
    again = DigitsDataset()
    assert torch.equal(tr.images, again.images) and tr.labels == again.labels
    one = build_dataset({"kind": "digits", "channels": 1, "image_size": 32, "classes": 3})
    assert one[0][0].shape == (1, 32, 32) and set(one.labels) == {0, 1, 2}
    assert tr.random_flip is False


# ---- errors ---------------------------------------------------------------------

def test_errors_are_one_line(tmp_path, imagenet_dir):
    root = str(imagenet_dir)
    _one_line_error(lambda: build_dataset({"kind": "imagenet", "root": str(tmp_path / "nope")}), "nope")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: build_dataset({"kind": "auto", "root": str(tmp_path / "empty")}), "no images")
    _one_line_error(lambda: build_dataset({"kind": "imagenet", "root": root, "classes": ["n99999999"]}),
                    "n99999999")
    _one_line_error(lambda: build_dataset({"kind": "imagenet", "root": root, "classes": 5}), "only 3")
    _one_line_error(lambda: build_dataset({"kind": "imagenet"}), "data.root")
    _one_line_error(lambda: build_dataset({"kind": "lsun"}), "data.kind")
    _one_line_error(lambda: build_dataset({"channels": 2}), "channels")
    _one_line_error(lambda: LabelMap.load(tmp_path / "missing.json"), "missing.json")

"""python -m guided.cli.reference_batch: class-balanced reference batches in the paper's layout."""
import numpy as np
import pytest
from PIL import Image

from guided.data import center_crop_arr
from guided.errors import GuidedError
from guided.evaluation.evaluate import evaluate, read_npz, stats_cache_path
from guided.evaluation.judge import digits_data, load_judge, split_indices
from guided.cli.reference_batch import main
from guided.evaluation.reference_batch import balanced_plan, build_reference


def _png(path, array):
    Image.fromarray(array).save(path)
    return array


@pytest.fixture()
def flat(tmp_path):
    """A flat folder: classes a (5 images), b (4), c (3), 8x8 RGB, each image distinct."""
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    root.mkdir()
    made = {}
    for cls, n in (("a", 5), ("b", 4), ("c", 3)):
        made[cls] = [_png(root / f"{cls}_{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(n)]
    return root, made


def test_flat_folder_round_trip_is_exact_and_balanced(flat, tmp_path, capsys):
    root, made = flat
    out = tmp_path / "ref.npz"
    assert main([str(root), "--image-size", "8", "--num-samples", "6", "--out", str(out), "--features", "none"]) == 0
    assert "6 images 8x8x3, 3 classes, 2-2 per class" in capsys.readouterr().out
    images, labels = read_npz(out)
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3)
    assert np.bincount(labels).tolist() == [2, 2, 2]  # labels 0, 1, 2 = sorted keys a, b, c
    for img, y in zip(images, labels):  # each is one of its class's files, pixel for pixel
        assert any(np.array_equal(img, m) for m in made["abc"[y]])
    assert len({img.tobytes() for img in images}) == 6  # drawn without replacement


def test_imagenet_layout_gets_the_references_centre_crop(tmp_path):
    rng = np.random.default_rng(1)
    files = {}
    for wnid in ("n01", "n02"):
        (tmp_path / "in" / wnid).mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "in" / wnid / f"{i}.png")
            files.setdefault(wnid, []).append(center_crop_arr(Image.fromarray(arr), 16))
    images, labels = build_reference(str(tmp_path / "in"), 16, 4, progress=False)
    assert images.shape == (4, 16, 16, 3)
    for img, y in zip(images, labels):
        assert any(np.array_equal(img, c) for c in files[("n01", "n02")[y]])


def test_grey_batches_and_unbalanced_requests(flat):
    root, _ = flat
    grey, _ = build_reference(str(root), 8, 3, channels=1, progress=False)
    assert grey.shape == (3, 8, 8, 1)
    with pytest.raises(GuidedError, match=r"class 2 has only 3 images.*at most 9 \(--num-samples\)"):
        build_reference(str(root), 8, 12, progress=False)  # 4 per class, but c has 3


def test_unreadable_images_are_replaced_by_others_of_their_class(tmp_path, monkeypatch):
    """A large folder is decoded lazily: a bad file shows up only when drawn, and is replaced."""
    import warnings

    import guided.data.folder as folder
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_IMAGES", 0)
    rng = np.random.default_rng(2)
    made = {c: [_png(tmp_path / f"{c}_{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(2)]
            for c in "ab"}
    (tmp_path / "a_bad.png").write_bytes(b"not a png")
    hit = 0
    for seed in range(6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images, labels = build_reference(str(tmp_path), 8, 4, seed=seed, progress=False)
        hit += any("a_bad.png" in str(w.message) for w in caught)
        assert np.bincount(labels).tolist() == [2, 2]
        for img, y in zip(images, labels):
            assert any(np.array_equal(img, m) for m in made["ab"[y]])
    assert hit > 0  # some seed drew the bad file first
    (tmp_path / "a_1.png").write_bytes(b"")  # now class a has one readable image
    with pytest.raises(GuidedError, match="class a has only 1 readable images, too few for 2 per class"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_reference(str(tmp_path), 8, 4, progress=False)


def test_plan_spreads_the_remainder_over_random_classes():
    labels = np.repeat(np.arange(4), 10)
    plan = balanced_plan(labels, 10, seed=0)
    quotas = [q for _, _, q in plan]
    assert sum(quotas) == 10 and sorted(quotas) == [2, 2, 3, 3]
    assert all(set(labels[order]) == {c} for c, order, _ in plan)


def test_digits_reference_is_training_digits_with_cached_statistics(tmp_path):
    out = tmp_path / "digits.npz"
    assert main(["digits", "--image-size", "16", "--num-samples", "200", "--out", str(out)]) == 0
    images, labels = read_npz(out)
    assert images.shape == (200, 16, 16, 3) and np.bincount(labels).tolist() == [20] * 10
    all_images, all_labels = digits_data(16)
    train = all_images[split_indices()[0]].astype(int)  # the same upsampling as the judge's
    for img, y in zip(images[:20], labels[:20]):
        diff = np.abs(train - img[..., :1].astype(int)).max(axis=(1, 2, 3))
        assert diff.min() <= 1  # one training digit, up to a rounding tie
    assert (images[..., 0] == images[..., 2]).all()  # grey in three equal channels
    cache = stats_cache_path(out, load_judge(16))
    assert cache.is_file()
    res = evaluate(out, out, "digits", progress=False)
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0


def test_an_existing_file_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "ref.npz"
    out.write_bytes(b"precious")
    assert main(["digits", "--image-size", "8", "--num-samples", "20", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["digits", "--image-size", "8", "--num-samples", "20", "--out", str(out), "--overwrite",
                 "--features", "none"]) == 0
    assert read_npz(out)[0].shape == (20, 8, 8, 3)

"""tf.data pipelines: shapes, augmentation statistics, determinism, host shards,
resume, skip-and-count of unreadable files, evaluation layout, start-up errors."""
import functools
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dino_jax.config_defaults import base_config
from dino_jax.data import augment, pipeline
from dino_jax.data.sources import IMAGENET_MEAN, IMAGENET_STD, DataError, make_source
from dino_jax.data.tfutil import tf

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST),
                                  reason="needs Debian's dataset-fashion-mnist (installed by .ci/run)")
LO = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
HI = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def data_cfg(**kw):
    c = dict(source="fashion_mnist", path=FMNIST, tfds_name="", tfds_data_dir=None, train_split="train",
             eval_split="test", global_crop_size=16, local_crop_size=8, global_crops_scale=(0.4, 1.0),
             local_crops_scale=(0.05, 0.4), num_local_crops=3, num_parallel_calls=-1, prefetch=2,
             eval_image_size=28, eval_resize_ratio=1.0, device_augment=False)
    c.update(kw)
    cfg = base_config().data  # every field the pipeline reads; these tests' values below
    cfg.update(c)
    return cfg


@needs_fmnist
def test_train_batches_shapes_ranges_and_determinism():
    it = pipeline.create_train_iterator(data_cfg(), 16, seed=0, process_index=0, process_count=1)
    assert it.num_examples == 60000 and it.steps_per_epoch == 60000 // 16
    b = next(it)
    assert b["global_crops"].shape == (16, 2, 16, 16, 3) and b["local_crops"].shape == (16, 3, 8, 8, 3)
    for x in b.values():
        assert x.dtype == np.float32
        assert np.all(x >= LO.min() - 1e-5) and np.all(x <= HI.max() + 1e-5)
        # every channel reaches both ends of its own normalised range somewhere
        assert np.allclose(x.min(axis=(0, 1, 2, 3)), LO, atol=0.05)
    same = next(iter(pipeline.create_train_iterator(data_cfg(), 16, 0, process_index=0, process_count=1)))
    other = next(iter(pipeline.create_train_iterator(data_cfg(), 16, 1, process_index=0, process_count=1)))
    np.testing.assert_array_equal(same["global_crops"], b["global_crops"])
    np.testing.assert_array_equal(same["local_crops"], b["local_crops"])
    assert not np.allclose(other["global_crops"], b["global_crops"])


@needs_fmnist
def test_two_hosts_are_disjoint_and_make_up_the_global_batch():
    one = pipeline.create_train_iterator(data_cfg(), 16, 5, process_index=0, process_count=1)
    hosts = [pipeline.create_train_iterator(data_cfg(), 16, 5, process_index=h, process_count=2)
             for h in range(2)]
    assert [h.batch_size for h in hosts] == [8, 8]
    seen = [set(), set()]
    for _ in range(3):
        g = next(one)
        parts = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([p["global_crops"] for p in parts]), g["global_crops"])
        np.testing.assert_array_equal(np.concatenate([p["local_crops"] for p in parts]), g["local_crops"])
    for h in range(2):  # positions of the whole first epoch: disjoint, covering every used example
        pos = hosts[h]._pos
        seen[h] = {hosts[h]._example_of(pos.position(c)) for c in range(pos.steps_per_epoch * pos.b)}
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == (60000 // 16) * 16
    with pytest.raises(DataError, match="not divisible by the 3 hosts"):
        pipeline.create_train_iterator(data_cfg(), 16, 0, process_index=0, process_count=3)


@needs_fmnist
def test_resume_continues_with_the_same_data():
    it = pipeline.create_train_iterator(data_cfg(), 8, 3, process_index=0, process_count=1)
    for _ in range(4):
        next(it)
    state = it.get_state()
    want = next(it)
    resumed = pipeline.create_train_iterator(data_cfg(), 8, 3, process_index=0, process_count=1, state=state)
    got = next(resumed)
    np.testing.assert_array_equal(got["global_crops"], want["global_crops"])
    by_step = pipeline.create_train_iterator(data_cfg(), 8, 3, start_step=4, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(by_step)["local_crops"], want["local_crops"])


def test_random_resized_crop_respects_scale_and_ratio():
    scale, ratio = (0.05, 0.4), (3 / 4, 4 / 3)
    h, w = 300, 400
    areas, ratios = [], []
    for i in range(300):
        box = augment.random_resized_crop_box(tf.constant([7, i], tf.int64), h, w, scale, ratio).numpy()
        top, left, ch, cw = box
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        areas.append(ch * cw / (h * w))
        ratios.append(cw / ch)
    areas, ratios = np.array(areas), np.array(ratios)
    # Sides are rounded: allow a pixel of slack on the bounds.
    assert areas.min() >= scale[0] * 0.97 and areas.max() <= scale[1] * 1.03
    assert ratios.min() >= ratio[0] * 0.97 and ratios.max() <= ratio[1] * 1.03
    assert areas.std() > 0.05  # really spread over the range
    # Impossible request (taller-than-allowed strip): the official centre-crop fallback.
    box = augment.random_resized_crop_box(tf.constant([0, 0], tf.int64), 400, 10, (0.9, 1.0), ratio).numpy()
    assert tuple(box) == (193, 0, 13, 10)  # w=10, h=round(10 / (3/4)), top=(400-13)//2


def _rates(n=400):
    """Flip/grayscale rates of global crop 1 and solarize rate of global crop 2, with the other ops off."""
    cfg = augment.MultiCropConfig(global_size=16, local_size=8, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                  num_local=0, jitter_p=0.0, blur_p=(0.0, 0.0, 0.0), normalize=False)
    yy, xx = np.mgrid[0:16, 0:16]
    img = np.stack([xx * 8 + 100, yy * 5 + 140, 150 + 0 * xx], -1).astype(np.uint8)  # all > 128, asymmetric
    ref = img.astype(np.float32) / 255
    gray_ref = np.repeat((ref @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=-1)  # PIL "L"
    flips = grays = sols1 = sols2 = 0
    for i in range(n):
        out = augment.multi_crop(tf.constant(img), tf.constant([11, i], tf.int64), cfg)["global_crops"].numpy()
        g1, g2 = out
        is_gray = np.allclose(g1, np.repeat(g1[..., :1], 3, axis=-1), atol=1e-6)
        grays += is_gray
        base = gray_ref if is_gray else ref
        flipped = np.allclose(g1, base[:, ::-1], atol=1e-5)
        assert flipped or np.allclose(g1, base, atol=1e-5)  # nothing else touched the crop
        flips += flipped
        sols1 += bool((g1 < 0.5).all())
        sols2 += bool((g2 < 0.5).all())
    return flips / n, grays / n, sols1 / n, sols2 / n


def test_flip_grayscale_solarize_rates_match_probabilities():
    flip, gray, sol1, sol2 = _rates()
    # n = 400: 4 standard deviations of a Bernoulli mean is <= 0.1.
    assert abs(flip - 0.5) < 0.1, flip
    assert abs(gray - 0.2) < 0.08, gray
    assert sol1 == 0.0
    assert abs(sol2 - 0.2) < 0.08, sol2


def test_blur_removes_noise_and_keeps_the_mean():
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    b = augment.gaussian_blur_planar(tf.constant(x), tf.constant([2.0, 0.1]), 6).numpy()
    assert b[0].std() < x[0].std() * 0.6  # a sigma-2 blur removes most of the noise
    np.testing.assert_allclose(b[0].mean(axis=(1, 2)), x[0].mean(axis=(1, 2)), atol=0.02)
    np.testing.assert_allclose(b[1], x[1], atol=1e-4)  # sigma 0.1: the kernel is a delta


def _write_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(root / c)
        for i in range(6):
            arr = rng.integers(0, 256, (20 + i, 30, 3)).astype(np.uint8)
            ext = ("jpg", "png", "bmp")[i % 3]
            Image.fromarray(arr).save(root / c / f"{i}.{ext}")
    if corrupt:
        (root / "cat" / "bad.jpg").write_bytes(b"this is not a jpeg at all")
        good = (root / "dog" / "0.jpg").read_bytes()
        (root / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 3])


def test_image_folder_skips_and_counts_unreadable_files(tmp_path, caplog):
    _write_folder(tmp_path / "train")
    cfg = data_cfg(source="image_folder", path=str(tmp_path), num_local_crops=2)
    it = pipeline.create_train_iterator(cfg, 2, 0, process_index=0, process_count=1)
    assert it.num_examples == 14 and it.steps_per_epoch == 7
    with caplog.at_level(logging.WARNING, logger="dino_jax.data"):
        for _ in range(7):  # a full epoch of positions (14) with 2 bad files: one step into epoch 2
            b = next(it)
            assert b["global_crops"].shape == (2, 2, 16, 16, 3) and np.isfinite(b["global_crops"]).all()
    assert it.skipped == 2
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "bad.jpg" in msgs and "truncated.jpg" in msgs
    assert it.get_state() == {"position": 16, "skipped": 2}


def test_eval_iterator_order_padding_and_center_crop(tmp_path):
    root = tmp_path / "val" / "only"
    os.makedirs(root)
    for i in range(5):  # a bright 4x4 square in the centre of a 40x60 image
        arr = np.zeros((40, 60, 3), np.uint8)
        arr[18:22, 28:32] = 255
        arr[0, 0] = i  # identifies the file
        Image.fromarray(arr).save(root / f"{i}.png")
    cfg = data_cfg(source="image_folder", path=str(tmp_path), eval_image_size=16, eval_resize_ratio=256 / 224)
    ev = pipeline.create_eval_iterator(cfg, "val", 2, process_index=0, process_count=1)
    batches = list(ev)
    assert len(ev) == len(batches) == 3
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [True] * 5 + [False]
    img = batches[0]["image"][0]
    assert img.shape == (16, 16, 3)
    bright = img.mean(-1) > 0
    ys, xs = np.nonzero(bright)
    assert abs(ys.mean() - 7.5) < 1.0 and abs(xs.mean() - 7.5) < 1.0  # centre stays centred
    # Two hosts: contiguous shards, same number of batches, no example twice.
    shards = [pipeline.create_eval_iterator(cfg, "val", 2, process_index=h, process_count=2) for h in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    assert sum(int(np.sum(b["mask"])) for s in shards for b in s) == 5


def test_startup_errors_are_one_clear_line(tmp_path):
    cases = [
        (data_cfg(path=str(tmp_path / "nope")), "does not exist"),
        (data_cfg(source="image_folder", path=str(tmp_path / "missing")), "does not exist"),
        (data_cfg(source="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path)),
         "unknown TFDS dataset 'no_such_dataset_xyz'"),
        (data_cfg(source="nothing"), "unknown data.source"),
    ]
    os.makedirs(tmp_path / "empty" / "train" / "cls")
    cases.append((data_cfg(source="image_folder", path=str(tmp_path / "empty")), "has no images"))
    for cfg, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            pipeline.create_train_iterator(cfg, 4, 0, process_index=0, process_count=1)
        assert "\n" not in str(e.value)
    _write_folder(tmp_path / "small" / "train", corrupt=False)
    with pytest.raises(DataError, match="batch size 64 is larger than the dataset"):
        pipeline.create_train_iterator(data_cfg(source="image_folder", path=str(tmp_path / "small")), 64, 0,
                                       process_index=0, process_count=1)
    with pytest.raises(DataError, match="no split 'val'"):
        pipeline.create_eval_iterator(data_cfg(source="image_folder", path=str(tmp_path / "small")), "val", 4,
                                      process_index=0, process_count=1)
    with pytest.raises(DataError, match="unknown Fashion-MNIST split 'validation'"):
        pipeline.create_eval_iterator(data_cfg(), "validation", 4, process_index=0, process_count=1)


@functools.lru_cache(maxsize=None)
def _tiny_tfds_builder():
    """The builder class of a 40-image TFDS dataset (TFDS registers a class name once)."""
    import tensorflow_datasets as tfds

    class DinoJaxTinyTest(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=4)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40, 0), "test": self._generate_examples(10, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (20, 24, 3)).astype(np.uint8), "label": i % 4}

    return DinoJaxTinyTest


def _tiny_tfds(data_dir, file_format="tfrecord"):
    """The 40-image TFDS dataset prepared offline (no download) in ``data_dir``, in
    ``file_format`` (tfrecord: read sequentially; array_record: read by index)."""
    b = _tiny_tfds_builder()(data_dir=str(data_dir), file_format=file_format)
    b.download_and_prepare()
    return b.name


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_source_offline_train_resume_and_eval(tmp_path, file_format):
    name = _tiny_tfds(tmp_path, file_format)
    cfg = data_cfg(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path), shuffle_buffer=64)
    assert make_source(cfg, "train").sequential == (file_format == "tfrecord")
    it = pipeline.create_train_iterator(cfg, 8, 0, process_index=0, process_count=1)
    assert it.num_examples == 40 and it.steps_per_epoch == 5
    first = [next(it) for _ in range(3)]
    assert first[0]["global_crops"].shape == (8, 2, 16, 16, 3)
    state = it.get_state()
    want = next(it)
    resumed = pipeline.create_train_iterator(cfg, 8, 0, process_index=0, process_count=1, state=state)
    np.testing.assert_array_equal(next(resumed)["global_crops"], want["global_crops"])
    again = pipeline.create_train_iterator(cfg, 8, 0, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(again)["local_crops"], first[0]["local_crops"])
    ev = pipeline.create_eval_iterator(cfg, "test", 4, process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == 3 and int(sum(b["mask"].sum() for b in batches)) == 10
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels.tolist()) == sorted([i % 4 for i in range(10)])
    assert pipeline.num_classes(cfg, "train") == 4
    with pytest.raises(DataError, match="has no split 'validation'"):
        pipeline.create_eval_iterator(cfg, "validation", 4, process_index=0, process_count=1)


@needs_fmnist
def test_split_slices_select_examples(tmp_path):
    from dino_jax.data.sources import make_source, read_fashion_mnist

    x, y = read_fashion_mnist(FMNIST, "test")
    src = make_source(data_cfg(), "test[100:350]")
    assert src.num_examples == 250
    it = pipeline.create_eval_iterator(data_cfg(), "test[100:350]", 100)
    labels = np.concatenate([b["label"][b["mask"]] for b in it])
    np.testing.assert_array_equal(labels, y[100:350])
    assert make_source(data_cfg(), "train[-10:]").num_examples == 10
    _write_folder(tmp_path / "train")
    folder = make_source(data_cfg(source="image_folder", path=str(tmp_path)), "train[:5]")
    assert folder.num_examples == 5 and folder.files == make_source(
        data_cfg(source="image_folder", path=str(tmp_path)), "train").files[:5]
    for bad in ("test[7:7]", "test[:10%]", "test[:"):
        with pytest.raises(DataError):
            make_source(data_cfg(), bad)


def test_unlabeled_folders_and_image_lists(tmp_path):
    """Pre-training data without labels: a folder holding images itself (found at any
    depth), with or without a split sub-folder, and a .txt list of paths; k-NN
    evaluation refuses them with one line."""
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    names = ["a.png", "b.jpg", "trip/c.png", "trip/day2/d.bmp", "trip/notes.txt"]
    for n in names:
        os.makedirs((photos / n).parent, exist_ok=True)
        if n.endswith(".txt"):
            (photos / n).write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(photos / n)
    images = sorted(str(photos / n) for n in names if not n.endswith(".txt"))
    for path in (photos, tmp_path):  # the root itself; root/<split> (split 'photos')
        cfg = data_cfg(source="image_folder", path=str(path), train_split="photos", num_local_crops=2)
        src = make_source(cfg, "photos")
        assert sorted(src.files) == images and src.num_classes == 0
        assert np.asarray(src.labels).tolist() == [-1] * 4
        it = pipeline.create_train_iterator(cfg, 2, 0, process_index=0, process_count=1)
        b = next(it)
        assert b["global_crops"].shape == (2, 2, 16, 16, 3) and np.isfinite(b["global_crops"]).all()
        with pytest.raises(DataError, match="k-NN evaluation .* needs labels") as e:
            pipeline.check_knn_labels(data_cfg(source="image_folder", path=str(path), train_split="photos"),
                                      src, ("photos", "photos"))
        assert "\n" not in str(e.value)

    lst = tmp_path / "list.txt"
    lst.write_text("# my images\nphotos/a.png\n\n" + str(photos / "trip" / "day2" / "d.bmp") + "\n")
    cfg = data_cfg(source="image_folder", path=str(lst))
    src = make_source(cfg, "train[1:]")  # slices select lines
    assert src.files == [str(photos / "trip" / "day2" / "d.bmp")] and src.num_classes == 0
    assert make_source(cfg, "train").files == [str(photos / "a.png"), str(photos / "trip" / "day2" / "d.bmp")]
    it = pipeline.create_train_iterator(cfg, 2, 0, process_index=0, process_count=1)
    assert next(it)["global_crops"].shape == (2, 2, 16, 16, 3)
    lst.write_text("photos/a.png\nphotos/missing.png\n")
    with pytest.raises(DataError, match="missing.png, which does not exist"):
        make_source(cfg, "train")
    # Class folders keep their labels, and the k-NN check passes.
    _write_folder(tmp_path / "labeled" / "train", corrupt=False)
    cfg = data_cfg(source="image_folder", path=str(tmp_path / "labeled"))
    src = make_source(cfg, "train")
    assert src.num_classes == 2 and sorted(set(np.asarray(src.labels).tolist())) == [0, 1]
    pipeline.check_knn_labels(cfg, src, ("train", "train"))

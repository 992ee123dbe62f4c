"""data.device_augment: the host ships uint8 crops + decisions, dino_jax.data.device_augment
finishes them in JAX. Parity with the tf.data photometric stages on the same crops and
decisions (max abs error 1e-5 in normalised units), the decisions' rates and ranges
against the official probabilities, resume, and the train-step hook."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import train
from dino_jax.data import device_augment
from dino_jax.config_defaults import base_config
from dino_jax.data import augment, pipeline
from dino_jax.data.tfutil import tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST),
                                  reason="needs Debian's dataset-fashion-mnist (installed by .ci/run)")
PARITY_ATOL = 1e-5   # float32 rounding of the same formulas in two frameworks


def data_cfg(**kw):
    c = base_config().data   # every field has its default there
    c.update(dict(source="fashion_mnist", path=FMNIST, train_split="train", eval_split="test",
                  global_crop_size=16, local_crop_size=8, num_local_crops=3, eval_image_size=28,
                  eval_resize_ratio=1.0, device_augment=True, blur_sigma=(0.1, 2.0)))
    c.update(kw)
    return c


def _tf_photometric(crops_uint8, aug, size, max_sigma=2.0):
    """The tf.data path's colour + finish stages on the same uint8 crops and decisions."""
    x = tf.transpose(tf.constant(crops_uint8, tf.float32) / 255.0, [0, 2, 1, 3])  # (N, W, H, 3) as resized
    x = augment._jitter_stage_impl(x, aug["flip"], aug["jitter"], aug["factors"], aug["order"], aug["gray"],
                                  use_jitter=True)
    return augment._finish_stage_impl(x, aug["blur"], aug["sigma"], aug["solarize"],
                                     radius=augment.blur_radius(size, max_sigma), normalize=True,
                                     use_blur=True).numpy()


def test_matches_tfdata_stages_on_same_decisions():
    # A textured image (smooth gradients + noise) and decisions with every branch both ways:
    # probabilities of 0.5 for jitter, grayscale, blur and solarize over 48 crops.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    img = np.stack([xx * 2, yy * 2.5, (xx + yy)], -1) + rng.normal(0, 30, (90, 120, 3))
    img = tf.constant(np.clip(img, 0, 255).astype(np.uint8))
    cfg = augment.MultiCropConfig(jitter_p=0.5, gray_p=0.5)
    for size in (24, 13):
        n = 48
        params = augment.sample_crop_params(tf.constant([5, size], tf.int64), n, 90, 120, (0.1, 1.0), cfg,
                                            blur_p=(0.5,) * n, solarize_p=(0.5,) * n)
        crops = tf.stack([augment.crop_resize(img, params["box"][i], size) for i in range(n)])
        crops = np.clip(np.round(np.transpose(crops.numpy(), (0, 2, 1, 3))), 0, 255).astype(np.uint8)
        aug = {k: v.numpy() for k, v in params.items() if k != "box"}
        for k in ("flip", "jitter", "gray", "blur", "solarize"):
            assert 0 < aug[k].sum() < n, (k, aug[k])
        assert len({tuple(o) for o in aug["order"]}) > 10
        want = _tf_photometric(crops, aug, size)
        got = np.asarray(jax.jit(device_augment.augment_crops)(crops, aug))
        assert got.shape == want.shape == (n, size, size, 3)
        np.testing.assert_allclose(got, want, rtol=0, atol=PARITY_ATOL)
        # Not trivially equal: the augmentation changed the pixels.
        plain = (crops / 255.0 - np.array(device_augment.IMAGENET_MEAN)) / np.array(device_augment.IMAGENET_STD)
        assert np.abs(got - plain).mean() > 0.1


def _take(it, n):
    return [next(it) for _ in range(n)]


@needs_fmnist
def test_iterator_ships_uint8_crops_and_official_rates():
    b = 64
    it = pipeline.TrainIterator(data_cfg(), b, seed=3, process_index=0, process_count=1)
    batches = _take(it, 4)
    first = batches[0]
    assert first["global_crops"].dtype == np.uint8 and first["global_crops"].shape == (b, 2, 16, 16, 3)
    assert first["local_crops"].dtype == np.uint8 and first["local_crops"].shape == (b, 3, 8, 8, 3)
    assert set(first["global_aug"]) == set(device_augment.AUG_KEYS)
    g = {k: np.concatenate([x["global_aug"][k] for x in batches]) for k in device_augment.AUG_KEYS}
    lo = {k: np.concatenate([x["local_aug"][k] for x in batches]) for k in device_augment.AUG_KEYS}
    n = len(g["flip"])

    def rate_ok(flags, p):  # within 4.5 binomial standard deviations of the official p
        flags = np.asarray(flags, np.float64)
        sd = np.sqrt(max(p * (1 - p), 1e-12) / flags.size)
        assert abs(flags.mean() - p) <= 4.5 * sd + 1e-12, (flags.mean(), p)

    # Official DataAugmentationDINO: flip 0.5, jitter 0.8, grayscale 0.2 for all crops;
    # blur 1.0 / 0.1 / 0.5 (global 1, global 2, locals); solarize 0.2 on global 2 only.
    for d in (g, lo):
        rate_ok(d["flip"], 0.5)
        rate_ok(d["jitter"], 0.8)
        rate_ok(d["gray"], 0.2)
    rate_ok(g["blur"][:, 0], 1.0)
    rate_ok(g["blur"][:, 1], 0.1)
    rate_ok(lo["blur"], 0.5)
    rate_ok(g["solarize"][:, 0], 0.0)
    rate_ok(g["solarize"][:, 1], 0.2)
    rate_ok(lo["solarize"], 0.0)
    # Ranges: ColorJitter(0.4, 0.4, 0.2, 0.1), sigma ~ U(0.1, 2), the order a permutation.
    f = np.concatenate([g["factors"].reshape(-1, 4), lo["factors"].reshape(-1, 4)])
    for j, (a, c) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert a <= f[:, j].min() < a + 0.02 and c - 0.02 < f[:, j].max() <= c
    s = np.concatenate([g["sigma"].ravel(), lo["sigma"].ravel()])
    assert 0.1 <= s.min() < 0.12 and 1.98 < s.max() <= 2.0
    orders = np.concatenate([g["order"].reshape(-1, 4), lo["order"].reshape(-1, 4)])
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in orders}) == 24  # all 4! orders occur
    assert n == 4 * b

    # Same decisions and crops as the all-host path: its crops are these up to the uint8
    # rounding of the resized pixels (<= 0.5/255 before the colour ops).
    host = _take(pipeline.TrainIterator(data_cfg(device_augment=False), b, seed=3, process_index=0,
                                        process_count=1), 1)[0]
    cfg = base_config()
    cfg.data = data_cfg()
    dev = jax.jit(lambda x: device_augment.apply(cfg, x))(first)
    for k in ("global_crops", "local_crops"):
        diff = np.abs(np.asarray(dev[k]) - host[k])
        assert dev[k].dtype == jnp.float32 and dev[k].shape == host[k].shape
        assert np.median(diff) < 0.01 and np.quantile(diff, 0.99) < 0.05, (k, np.median(diff))

    # Resume: a fresh iterator at position 2b reads batch 2 exactly.
    resumed = next(pipeline.TrainIterator(data_cfg(), b, seed=3, process_index=0, process_count=1,
                                          start_position=2 * b))
    for k in ("global_crops", "local_crops"):
        np.testing.assert_array_equal(resumed[k], batches[2][k])
        for a in device_augment.AUG_KEYS:
            np.testing.assert_array_equal(resumed[k.replace("crops", "aug")][a], batches[2][k.replace("crops", "aug")][a])


def test_train_step_hook_applies_device_augment():
    """A device-augment batch through the step equals the step on the batch augmented outside."""
    config = base_config()  # every field the step reads; this test's values below
    config.update(dict(
        model=dict(arch="custom", patch_size=4, embed_dim=16, depth=1, num_heads=2, img_size=16,
                   drop_path_rate=0.0, out_dim=32, norm_last_layer=True, head_nlayers=2,
                   head_hidden_dim=24, head_bottleneck_dim=8, dtype="float32"),
        data=dict(blur_sigma=(0.1, 2.0)), batch_size=4, epochs=1, total_steps=0, lr=1e-3, min_lr=1e-3,
        warmup_epochs=0, weight_decay=0.04, weight_decay_end=0.04, momentum_teacher=0.996, clip_grad=3.0,
        freeze_last_layer=0, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        student_temp=0.1, center_momentum=0.9, seed=0))
    rng = np.random.default_rng(1)

    def aug(n):
        u = rng.uniform(size=(4, n))
        return {"flip": u < 0.5, "jitter": u < 0.8, "gray": u > 0.7, "blur": u < 0.6, "solarize": u > 0.5,
                "factors": rng.uniform(0.7, 1.3, (4, n, 4)).astype(np.float32) * [1, 1, 1, 0.1],
                "order": np.argsort(rng.uniform(size=(4, n, 4)), axis=-1).astype(np.int32),
                "sigma": rng.uniform(0.1, 2.0, (4, n)).astype(np.float32)}

    batch = {"global_crops": rng.integers(0, 256, (4, 2, 16, 16, 3), dtype=np.uint8),
             "local_crops": rng.integers(0, 256, (4, 2, 8, 8, 3), dtype=np.uint8),
             "global_aug": aug(2), "local_aug": aug(2)}
    done = jax.jit(lambda x: device_augment.apply(config, x))(batch)
    assert set(done) == {"global_crops", "local_crops"}
    from dino_jax import schedules  # noqa: PLC0415

    sched = schedules.build_schedules(config, 1)
    step = train.TrainStep(config, sched, donate=False)
    state = train.create_train_state(config)
    _, m_dev, _ = step(state, batch, step.new_accumulator())
    _, m_host, _ = step(state, done, step.new_accumulator())
    np.testing.assert_allclose(float(m_dev["loss"]), float(m_host["loss"]), rtol=1e-6)


def test_device_module_does_not_import_tensorflow():
    code = "import sys, dino_jax.data.device_augment; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

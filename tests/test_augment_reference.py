"""The fast multi-crop path against a plain re-statement of the official ops.

``dino_jax.data.augment`` resizes with block-banded matrix products and runs the
colour ops of a group of crops in two XLA functions, with the random jitter
order unrolled into rounds. Here every crop is recomputed from the same random
decisions by the textbook definitions: PIL's own resize (float "F" mode, the
very coefficients torchvision's PIL path uses), torchvision's blend formulas in
the drawn order, hue through Python's ``colorsys``, grayscale with PIL's "L"
weights, an exact Gaussian blur, solarize and the ImageNet normalisation.
Tolerances are float32 rounding (stated per test).
"""
import colorsys

import numpy as np
import pytest
from PIL import Image

from dino_jax.data import augment
from dino_jax.data.sources import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.data.tfutil import tf

GRAY = np.array([0.299, 0.587, 0.114])


def pil_resize(img, size):
    """PIL bicubic resize of a float HxWxC image, channel by channel (mode 'F')."""
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32), "F")
                                .resize(size[::-1], Image.BICUBIC)) for c in range(img.shape[-1])], -1)


def ref_hue(x, delta):
    flat = x.reshape(-1, 3).astype(np.float64)
    out = np.empty_like(flat)
    for i, (r, g, b) in enumerate(flat):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        out[i] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
    return out.reshape(x.shape)


def ref_jitter(x, factors, order):
    fb, fc, fs, fh = factors
    for op in order:
        gray = x @ GRAY
        if op == 0:
            x = np.clip(x * fb, 0, 1)
        elif op == 1:
            x = np.clip(fc * x + (1 - fc) * gray.mean(), 0, 1)
        elif op == 2:
            x = np.clip(fs * x + (1 - fs) * gray[..., None], 0, 1)
        else:
            x = ref_hue(x, fh)
    return x


def ref_blur(x, sigma, radius):
    k = np.arange(-radius, radius + 1)
    w = np.exp(-(k ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    for axis in (0, 1):
        p = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="symmetric")
        x = sum(w[j] * np.take(p, np.arange(j, j + x.shape[axis]), axis=axis) for j in range(2 * radius + 1))
    return x


def ref_crop(image_u8, p, i, size, radius):
    top, left, h, w = p["box"][i]
    x = pil_resize(image_u8[top:top + h, left:left + w].astype(np.float32) / 255.0, (size, size))
    x = np.clip(x.astype(np.float64), 0, 1)
    if p["flip"][i]:
        x = x[:, ::-1]
    if p["jitter"][i]:
        x = ref_jitter(x, p["factors"][i], p["order"][i])
    if p["gray"][i]:
        x = np.repeat((x @ GRAY)[..., None], 3, -1)
    if p["blur"][i]:
        x = ref_blur(x, p["sigma"][i], radius)
    if p["solarize"][i]:
        x = np.where(x >= 128 / 255, 1 - x, x)
    return (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def photo(h, w, seed=0):
    """Smooth colour structure plus noise: every op has something to change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(7 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy) + 2)], -1)
    return np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("box,size", [((5, 7, 60, 45), 24),     # downscale, non-square
                                      ((0, 0, 90, 70), 24),     # larger factor
                                      ((10, 3, 17, 20), 24),    # upscale (no antialias widening)
                                      ((2, 1, 24, 24), 24)])    # identity geometry
def test_crop_resize_equals_pil(box, size):
    """PIL-bicubic resize of uint8 crops: equal to PIL's own float resize within 2e-5
    (measured ~1e-5: float32 accumulation of the weighted sums)."""
    img = photo(96, 80)
    got = augment.crop_resize(tf.constant(img), tf.constant(box), size, gain=1 / 255).numpy()  # (W, H, C)
    top, left, h, w = box
    want = pil_resize(img[top:top + h, left:left + w].astype(np.float32) / 255, (size, size))
    np.testing.assert_allclose(got.transpose(1, 0, 2), want, rtol=0, atol=2e-5)


def test_crop_resize_on_imagenet_sized_crops_equals_pil():
    """Real sizes (a 500x375 image, a global 360x345 crop to 224, a local one to 96), and
    the column cut rounded up to a multiple of 8 near the right edge: within 3e-5."""
    img = photo(375, 500, seed=3)
    for box, size in (((7, 30, 360, 345), 224), ((100, 497 - 141, 150, 141), 96)):
        got = augment.crop_resize(tf.constant(img), tf.constant(box), size, gain=1 / 255).numpy()
        top, left, h, w = box
        want = pil_resize(img[top:top + h, left:left + w].astype(np.float32) / 255, (size, size))
        np.testing.assert_allclose(got.transpose(1, 0, 2), want, rtol=0, atol=3e-5)


def test_crop_group_with_unequal_spans_equals_pil():
    """One group whose crops need very different window spans (upscale 0.6x to downscale
    4.5x, so most are padded to the group's widest window and sliced back), the image's
    channel count unknown to the graph: each crop equals PIL's own resize within 3e-5."""
    img = photo(375, 500, seed=5)
    boxes = [(0, 0, 375, 432), (200, 310, 58, 57), (10, 400, 96, 100), (120, 5, 250, 180), (300, 0, 75, 75)]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
    def group(x):
        return augment.crop_resize_group(x, tf.constant(boxes), 96, gain=1 / 255)

    got = group(tf.constant(img)).numpy()                                  # (n, W, H, C)
    assert got.shape == (len(boxes), 96, 96, 3)
    for k, (top, left, h, w) in enumerate(boxes):
        want = pil_resize(img[top:top + h, left:left + w].astype(np.float32) / 255, (96, 96))
        np.testing.assert_allclose(got[k].transpose(1, 0, 2), want, rtol=0, atol=3e-5)


def test_rendered_crops_equal_the_reference_ops():
    """Sixteen 24 px crops with every op drawn (jitter in all sorts of orders, gray, blur,
    solarize, flip): equal to the reference within 2e-4 after normalisation (float32 vs
    float64, hue through colorsys; 1 / std ~ 4.4 scales pixel errors up)."""
    img = photo(90, 70)
    cfg = augment.MultiCropConfig(blur_sigma=(0.5, 2.0))
    n = 16
    params = augment.sample_crop_params(tf.constant([3, 9], tf.int64), n, 90, 70, (0.1, 0.9), cfg,
                                        blur_p=(0.5,) * n, solarize_p=(0.3,) * n)
    got = augment.render_crops(tf.constant(img), params, 24, cfg).numpy()
    p = {k: v.numpy() for k, v in params.items()}
    assert p["jitter"].any() and (~p["jitter"]).any() and p["blur"].any() and p["solarize"].any()
    assert p["flip"].any() and len({tuple(o) for o in p["order"][p["jitter"]]}) >= 5
    radius = augment.blur_radius(24, cfg.blur_sigma[1])
    for i in range(n):
        np.testing.assert_allclose(got[i], ref_crop(img, p, i, 24, radius), rtol=0, atol=2e-4, err_msg=str(i))


def test_hue_shift_equals_colorsys():
    """The HSV hue rotation on planar data equals colorsys' to 1e-5 for every shift sign,
    on pixels that include grays (no hue) and each sextant."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 3, 6, 6)).astype(np.float32)
    x[0, :, 0, 0] = 0.5                   # gray
    x[1, :, 0, 0] = (1.0, 0.0, 0.0)       # pure hues
    x[1, :, 0, 1] = (0.0, 1.0, 0.0)
    deltas = np.array([0.1, -0.1, 0.05, -0.0999], np.float32)
    got = augment.hue_shift_planar(tf.constant(x), tf.constant(deltas)[:, None, None]).numpy()
    for n in range(4):
        want = ref_hue(x[n].transpose(1, 2, 0), float(deltas[n])).transpose(2, 0, 1)
        np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-5)


def test_crop_params_follow_the_official_distributions():
    """Over 4000 draws: flip 0.5, jitter 0.8, gray 0.2, blur/solarize at the per-crop
    probabilities, factors inside the ColorJitter ranges, every order a permutation and
    all 24 orders drawn (4 standard deviations of a Bernoulli mean at n=4000 is 0.032)."""
    cfg = augment.MultiCropConfig()
    n = 4000
    p = augment.sample_crop_params(tf.constant([0, 1], tf.int64), n, 375, 500, cfg.global_scale, cfg,
                                   blur_p=(1.0, 0.1) * (n // 2), solarize_p=(0.0, 0.2) * (n // 2))
    p = {k: v.numpy() for k, v in p.items()}
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)):
        assert abs(p[key].mean() - rate) < 0.032, (key, p[key].mean())
    assert p["blur"][0::2].all() and abs(p["blur"][1::2].mean() - 0.1) < 0.032
    assert not p["solarize"][0::2].any() and abs(p["solarize"][1::2].mean() - 0.2) < 0.04
    lo, hi = np.array([0.6, 0.6, 0.8, -0.1]), np.array([1.4, 1.4, 1.2, 0.1])
    assert np.all(p["factors"] >= lo) and np.all(p["factors"] <= hi)
    assert np.all(np.abs(p["factors"].min(0) - lo) < 0.01) and np.all(np.abs(p["factors"].max(0) - hi) < 0.01)
    assert np.all(np.sort(p["order"], axis=1) == np.arange(4))
    assert len({tuple(o) for o in p["order"]}) == 24
    assert np.all((p["sigma"] >= 0.1) & (p["sigma"] <= 2.0))
    boxes = p["box"]
    area = boxes[:, 2] * boxes[:, 3] / (375 * 500)
    assert area.min() >= 0.4 * 0.98 and area.max() <= 1.0


@pytest.mark.parametrize("h,w", [(375, 500), (500, 333), (81, 80), (28, 28), (301, 299)])
def test_eval_transform_equals_torchvision_resize_and_center_crop(h, w):
    """Resize(256) + CenterCrop(224) by torchvision's rules (long side truncated,
    half-to-even centring) with PIL's resize: equal within 3e-5 before normalisation."""
    img = photo(h, w, seed=h)
    size = 24 if min(h, w) < 100 else 224
    short = int(size * 256 / 224)
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nh, nw = short, int(short * w / h)
    full = pil_resize(img.astype(np.float32) / 255, (nh, nw))
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    want = np.clip(full[top:top + size, left:left + size], 0, 1)
    got = augment.eval_transform(tf.constant(img), size).numpy()
    got = got * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)


def test_pil_ops_path_makes_the_official_pil_crops_on_the_same_decisions():
    """data.pil_ops: the crops PIL makes from our decisions. With every photometric op
    off, each crop is exactly PIL's crop + 8-bit BICUBIC resize (flipped where drawn):
    the boxes are read as (top, left, h, w). With the ops on, it stays close to the
    float tf path (mean |diff| under 3 grey levels per crop: the same ops, rounded to
    uint8 after each one) without being equal to it."""
    from PIL import Image

    img = photo(40, 36, seed=7)
    cfg = augment.MultiCropConfig(global_size=28, local_size=12)
    n = 32
    params = augment.sample_crop_params(tf.constant([4, 1], tf.int64), n, 40, 36, (0.1, 1.0), cfg,
                                        blur_p=(0.5,) * n, solarize_p=(0.3,) * n)
    plain = dict(params, **{k: tf.zeros_like(params[k]) for k in ("jitter", "gray", "blur", "solarize")})
    got = augment.render_crops_pil(tf.constant(img), plain, 12, cfg).numpy()
    for i, (top, left, h, w) in enumerate(params["box"].numpy().tolist()):
        x = Image.fromarray(img).crop((left, top, left + w, top + h)).resize((12, 12), Image.BICUBIC)
        if params["flip"].numpy()[i]:
            x = x.transpose(Image.FLIP_LEFT_RIGHT)
        want = (np.asarray(x, np.float32) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5, err_msg=str(i))
    pil = augment.render_crops_pil(tf.constant(img), params, 12, cfg).numpy()
    ours = augment.render_crops(tf.constant(img), params, 12, cfg).numpy()
    levels = np.abs(pil - ours).mean(axis=(1, 2, 3)) * 0.226 * 255
    assert levels.max() < 3.0, levels
    assert levels.mean() > 0.05, levels


def test_pil_ops_and_device_augment_exclude_each_other(tmp_path):
    from dino_jax.config_defaults import base_config
    from dino_jax.data import pipeline

    c = base_config().data
    c.source, c.path, c.train_split = "fashion_mnist", str(tmp_path), "train"
    c.pil_ops, c.device_augment = True, True
    with pytest.raises(pipeline.DataError, match="pil_ops.*device_augment.*exclude"):
        pipeline.TrainIterator(c, 8, seed=0, process_index=0, process_count=1)

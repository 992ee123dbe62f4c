"""The photometric half of the DINO multi-crop augmentation in JAX, on the accelerator.

With ``config.data.device_augment = True`` the input pipeline (``dino_jax/data``)
only decodes each image and cuts + resizes its crops (uint8), and ships every
random decision of every crop with the batch (drawn on the host from (seed,
example position) exactly as the all-host path draws them, so resumption stays
exact). :func:`apply`, called at the top of the train step, then does the rest
on the device, in the official order:

    flip (p 0.5) -> colour jitter (p 0.8; brightness, contrast, saturation, hue
    in the crop's random order) -> grayscale (p 0.2) -> Gaussian blur ->
    solarize (global crop 2) -> ImageNet mean/std normalisation.

The formulas are those of ``dino_jax/data/augment.py`` (torchvision's blend
forms, PIL's "L" luma, float HSV hue shift, an exact separable Gaussian with
symmetric edges): on the same uint8 crops and decisions both give the same
floats (``tests/test_device_augment.py``). The one difference from the
all-host path is upstream: the resized crops are rounded to uint8 before the
colour ops (as PIL's resize does; the host path keeps them float).

Batch layout (per host, leading axis = examples): ``global_crops`` uint8
(B, 2, G, G, 3), ``local_crops`` uint8 (B, L, l, l, 3), each crop width first
((W, H, 3): the layout the host's separable resize leaves it in; :func:`apply`
swaps the two axes back, which costs the accelerator nothing and the host a
float transpose of every crop), and ``global_aug`` /
``local_aug``: {flip, jitter, gray, blur, solarize: (B, n) bool; factors:
(B, n, 4) float32 [brightness, contrast, saturation, hue]; order: (B, n, 4)
int32 (a permutation of 0..3, the op order); sigma: (B, n) float32}.
This module does not import TensorFlow.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dino_jax.data.files import IMAGENET_MEAN, IMAGENET_STD  # TF-free

GRAY = (0.299, 0.587, 0.114)   # PIL's "L" conversion (ITU-R 601-2)
AUG_KEYS = ("flip", "jitter", "factors", "order", "gray", "blur", "sigma", "solarize")


def blur_radius(size: int, max_sigma: float) -> int:
    """Half-width of the Gaussian kernel: min(ceil(3 sigma_max), size / 2), at least 1
    (as ``augment.blur_radius``)."""
    return max(1, min(int(math.ceil(3 * max_sigma)), size // 2))


def _per_crop(t):
    """(N,) per-crop values broadcast against (N, H, W, C)."""
    return t[:, None, None, None]


def _gray(x):
    return GRAY[0] * x[..., 0:1] + GRAY[1] * x[..., 1:2] + GRAY[2] * x[..., 2:3]


def hue_shift(x, delta):
    """torchvision/PIL adjust_hue in float: RGB -> HSV, h += delta (mod 1), -> RGB.
    x (N, H, W, 3) in [0, 1]; delta (N,)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    c = v - jnp.minimum(jnp.minimum(r, g), b)
    safe = jnp.where(c > 0, c, 1.0)
    h6 = jnp.where(v == r, (g - b) / safe, jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h6 = h6 + 6.0 * delta[:, None, None]
    h6 = h6 - 6.0 * jnp.floor(h6 / 6.0)                                   # hue in sextants, [0, 6)

    def channel(n):  # HSV -> RGB: v - c * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
        k = n + h6
        k = jnp.where(k >= 6.0, k - 6.0, k)
        return v - c * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _linear_round(x, op, factors):
    """One jitter op per crop (op: 0 brightness, 1 contrast, 2 saturation, else none) as
    clip(a x + b mean(gray) + d gray): torchvision's _blend forms."""
    fb, fc, fs = factors[:, 0], factors[:, 1], factors[:, 2]
    one, zero = jnp.ones_like(fb), jnp.zeros_like(fb)
    a = jnp.where(op == 0, fb, jnp.where(op == 1, fc, jnp.where(op == 2, fs, one)))
    b = jnp.where(op == 1, 1.0 - fc, zero)
    d = jnp.where(op == 2, 1.0 - fs, zero)
    gray = _gray(x)
    mean = jnp.mean(gray, axis=(1, 2, 3))
    e = _per_crop
    y = jnp.clip(e(a) * x + e(b * mean) + e(d) * gray, 0.0, 1.0)
    return jnp.where(e((op >= 0) & (op <= 2)), y, x)


def colour(x, flip, jitter, factors, order, gray):
    """Flip, colour jitter in each crop's order, grayscale of (N, H, W, 3) in [0, 1].
    Hue is the only non-linear op: the linear ops before it (in the crop's order),
    hue, then those after it -- 3 + 1 + 3 rounds for any order."""
    e = _per_crop
    x = jnp.where(e(flip), x[:, :, ::-1], x)
    hue_pos = jnp.argmax(order == 3, axis=1).astype(jnp.int32)
    none = jnp.full_like(hue_pos, -1)
    for k in range(3):
        x = _linear_round(x, jnp.where(jitter & (k < hue_pos), order[:, k], none), factors)
    x = jnp.where(e(jitter), hue_shift(x, factors[:, 3]), x)
    for k in range(3):
        pos = hue_pos + 1 + k
        op = jnp.take_along_axis(order, jnp.minimum(pos, 3)[:, None], axis=1)[:, 0]
        x = _linear_round(x, jnp.where(jitter & (pos <= 3), op, none), factors)
    return jnp.where(e(gray), jnp.broadcast_to(_gray(x), x.shape), x)


def _blur_axis(x, w, axis: int, radius: int):
    """Per-crop 1-D filter w (N, 2R+1) along ``axis`` (1 = H or 2 = W), symmetric edges."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    p = jnp.pad(x, pad, mode="symmetric")
    acc = 0.0
    for j in range(2 * radius + 1):
        acc += w[:, j, None, None, None] * jax.lax.slice_in_dim(p, j, j + n, axis=axis)
    return acc


def gaussian_blur(x, sigma, radius: int):
    """Separable Gaussian blur of (N, H, W, 3) with per-crop sigma (N,)."""
    k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-(k[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    w = w / jnp.sum(w, axis=1, keepdims=True)
    return _blur_axis(_blur_axis(x, w, 1, radius), w, 2, radius)


def augment_crops(crops_uint8, aug: dict, max_sigma: float = 2.0, normalize: bool = True):
    """(N, H, W, 3) uint8 crops + their decisions (each (N, ...)) -> (N, H, W, 3) float32,
    augmented and normalised."""
    x = crops_uint8.astype(jnp.float32) / 255.0
    x = colour(x, aug["flip"], aug["jitter"], aug["factors"].astype(jnp.float32),
               aug["order"].astype(jnp.int32), aug["gray"])
    # A fusion barrier: fused into the blur's shifted reads, the colour ops would be
    # recomputed once per tap.
    x = jax.lax.optimization_barrier(x)
    if max_sigma > 0:
        x = jnp.where(_per_crop(aug["blur"]), gaussian_blur(x, aug["sigma"].astype(jnp.float32),
                                                           blur_radius(x.shape[1], max_sigma)), x)
    x = jnp.where(_per_crop(aug["solarize"]) & (x >= 128.0 / 255.0), 1.0 - x, x)
    if normalize:
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x


def augment_group(crops, aug: dict, max_sigma: float = 2.0, normalize: bool = True):
    """(B, n, W, H, 3) uint8 crops, width first as the host ships them, + {key: (B, n, ...)}
    decisions -> (B, n, H, W, 3) float32."""
    b, n, w, h, c = crops.shape
    flat = lambda v: v.reshape(b * n, *v.shape[2:])  # noqa: E731
    out = augment_crops(jnp.swapaxes(flat(crops), 1, 2), {k: flat(aug[k]) for k in AUG_KEYS}, max_sigma,
                        normalize)
    return out.reshape(b, n, h, w, c)


def apply(config, batch: dict) -> dict:
    """The train step's hook: a device-augment batch (see the module docstring) ->
    {'global_crops', 'local_crops'} float32, augmented and normalised. Other keys pass."""
    max_sigma = float(config.data.blur_sigma[1])
    out = {k: v for k, v in batch.items() if k not in ("global_aug", "local_aug")}
    for name in ("global", "local"):
        crops = batch.get(name + "_crops")
        if crops is None:
            continue
        if crops.shape[1] == 0:
            out[name + "_crops"] = crops.astype(jnp.float32)
        else:
            out[name + "_crops"] = augment_group(crops, batch[name + "_aug"], max_sigma)
    return out

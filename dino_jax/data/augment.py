"""The official DINO multi-crop augmentation (main_dino.DataAugmentationDINO) in tf.

Per example, the crops of one decoded image are made in two steps:

1. :func:`sample_crop_params` draws every random decision of a group of crops
   (the 2 global or the L local ones) in one stateless op seeded by (run seed,
   global stream position, group), so crops do not depend on thread
   scheduling, host count or resumption.
2. :func:`render_crops` applies them: each crop is cut and resized with
   PIL's antialiased bicubic filter (:func:`resample_axis`, block-banded
   matrix products), then the crops of the group go through the colour ops,
   blur, solarize and normalisation together in two XLA-compiled functions
   (:func:`_jitter_stage_impl`, :func:`_finish_stage_impl`) on planar (N, 3, H, W) data.

Same as the official torchvision/PIL recipe:
- RandomResizedCrop: 10 attempts of (area ~ U(scale) * area, log-ratio ~
  U(log 3/4, log 4/3)), rounded sides, uniform position; else the centre crop
  with the ratio clamped; PIL's bicubic resize (a = -0.5, the kernel widened
  by the downscale factor, taps clipped to the crop and renormalised).
- horizontal flip p 0.5; colour jitter p 0.8 (brightness 0.4, contrast 0.4,
  saturation 0.2, hue 0.1, factors drawn once) in a random order; grayscale
  p 0.2 (ITU-R 601-2 luma, as PIL's "L"); Gaussian blur sigma ~ U(0.1, 2) with
  p 1.0 (global 1), 0.1 (global 2), 0.5 (locals); solarize (>= 128 -> 255 - x)
  p 0.2 on global 2; ImageNet mean/std.
Deviations (documented, small): pixels stay float between ops instead of being
rounded to uint8 after each PIL op (the contrast mean is not rounded either);
the blur is an exact separable Gaussian (kernel radius min(ceil(3 sigma_max),
size/2), symmetric edges) where PIL approximates one with three box blurs.

With ``config.data.device_augment`` the host stops after step 2's cut + resize
(``multi_crop(..., until='device')``): uint8 crops plus their decisions, finished
on the accelerator by :mod:`dino_jax.data.device_augment` with the same formulas.

The resize gives the numbers of TF's antialiased ``tf.image.resize`` (both are
PIL's, to 1e-5) as banded matrix products, and the colour stage runs on all crops of
a group at once; ``benchmarks/input_pipeline.py`` measures both.

With ``config.data.pil_ops`` PIL itself renders the crops from the same decisions
(:func:`render_crops_pil`), as the official torchvision transforms do.
"""
from __future__ import annotations

import dataclasses
import math

from dino_jax.data.sources import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.data.tfutil import tf

_fold = tf.random.experimental.stateless_fold_in
_ATTEMPTS = 10          # torchvision RandomResizedCrop.get_params
_GRAY = (0.299, 0.587, 0.114)   # PIL's "L" conversion (ITU-R 601-2)


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    num_local: int = 8
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: tuple = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.2          # global 2 only
    normalize: bool = True
    pil_ops: bool = False            # photometric ops by PIL on uint8 (render_crops_pil)

    @classmethod
    def from_data_config(cls, d) -> "MultiCropConfig":
        return cls(global_size=int(d.global_crop_size), local_size=int(d.local_crop_size),
                   global_scale=tuple(d.global_crops_scale), local_scale=tuple(d.local_crops_scale),
                   num_local=int(d.num_local_crops),
                   blur_sigma=tuple(d.blur_sigma), pil_ops=bool(d.pil_ops))


def _u(seed, k, shape=(), lo=0.0, hi=1.0):
    return tf.random.stateless_uniform(shape, _fold(seed, k), lo, hi, dtype=tf.float32)


# --------------------------------------------------------------------------
# Random decisions.
# --------------------------------------------------------------------------
def random_resized_crop_boxes(u_area, u_ratio, u_top, u_left, height, width, scale, ratio):
    """(N, 4) int32 (top, left, h, w) by torchvision's RandomResizedCrop.get_params,
    from (N, attempts) uniforms in [0, 1) for area, log-ratio, top and left."""
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    target = hf * wf * (scale[0] + (scale[1] - scale[0]) * u_area)
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(lr0 + (lr1 - lr0) * u_ratio)
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    valid = (cw > 0) & (cw <= wf) & (ch > 0) & (ch <= hf)
    top = tf.floor(u_top * (hf - ch + 1))
    left = tf.floor(u_left * (wf - cw + 1))
    first = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
    pick = lambda v: tf.gather(v, first, axis=1, batch_dims=1)  # noqa: E731
    # Fallback: the whole image, ratio clamped into [ratio0, ratio1], centred.
    in_ratio = wf / hf
    fw = tf.where(in_ratio > ratio[1], tf.round(hf * ratio[1]), wf)
    fh = tf.where(in_ratio < ratio[0], tf.round(wf / ratio[0]), hf)
    fallback = tf.stack([tf.floor((hf - fh) / 2), tf.floor((wf - fw) / 2), fh, fw])
    boxes = tf.stack([pick(top), pick(left), pick(ch), pick(cw)], axis=1)
    boxes = tf.where(tf.reduce_any(valid, axis=1)[:, None], boxes, fallback[None, :])
    return tf.cast(boxes, tf.int32)


def random_resized_crop_box(seed, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """One (top, left, h, w) int32 box (see :func:`random_resized_crop_boxes`)."""
    u = tf.random.stateless_uniform([4, 1, _ATTEMPTS], seed, dtype=tf.float32)
    return random_resized_crop_boxes(u[0], u[1], u[2], u[3], height, width, scale, ratio)[0]


# Columns of the per-crop uniforms drawn by sample_crop_params.
_BOX, _FLIP, _JITTER, _FACTORS, _ORDER, _GRAYU, _BLURU, _SIGMA, _SOLU = (
    0, 4 * _ATTEMPTS, 4 * _ATTEMPTS + 1, 4 * _ATTEMPTS + 2, 4 * _ATTEMPTS + 6, 4 * _ATTEMPTS + 10,
    4 * _ATTEMPTS + 11, 4 * _ATTEMPTS + 12, 4 * _ATTEMPTS + 13)
_NUM_UNIFORMS = 4 * _ATTEMPTS + 14


def sample_crop_params(seed, n: int, height, width, scale, cfg: MultiCropConfig, blur_p, solarize_p):
    """Every random decision of ``n`` crops (one stateless draw), as a dict of tensors:
    box (n, 4) int32; flip, jitter, gray, blur, solarize (n,) bool; factors (n, 4)
    [brightness, contrast, saturation, hue]; order (n, 4) int32 (a permutation of
    0..3 = brightness, contrast, saturation, hue, as torchvision's randperm);
    sigma (n,). ``blur_p`` and ``solarize_p`` are per-crop probabilities."""
    u = tf.random.stateless_uniform([n, _NUM_UNIFORMS], seed, dtype=tf.float32)
    a = _ATTEMPTS
    box = random_resized_crop_boxes(u[:, 0:a], u[:, a:2 * a], u[:, 2 * a:3 * a], u[:, 3 * a:4 * a],
                                    height, width, scale, cfg.ratio)
    lo = tf.constant([max(0.0, 1 - cfg.brightness), max(0.0, 1 - cfg.contrast),
                      max(0.0, 1 - cfg.saturation), -cfg.hue])
    hi = tf.constant([1 + cfg.brightness, 1 + cfg.contrast, 1 + cfg.saturation, cfg.hue])
    blur_p = tf.constant(list(blur_p), tf.float32)
    solarize_p = tf.constant(list(solarize_p), tf.float32)
    return {
        "box": box,
        "flip": u[:, _FLIP] < cfg.flip_p,
        "jitter": u[:, _JITTER] < cfg.jitter_p,
        "factors": lo + (hi - lo) * u[:, _FACTORS:_FACTORS + 4],
        "order": tf.argsort(u[:, _ORDER:_ORDER + 4], axis=1, stable=True),
        "gray": u[:, _GRAYU] < cfg.gray_p,
        "blur": u[:, _BLURU] < blur_p,
        "sigma": cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, _SIGMA],
        "solarize": u[:, _SOLU] < solarize_p,
    }


# --------------------------------------------------------------------------
# Geometry: PIL's antialiased bicubic resize as block-banded matrix products.
# --------------------------------------------------------------------------
_BLOCK = 16  # output rows per block of the banded product (measured: 8-16 are fastest)


def _pil_bicubic(x, a=-0.5):
    x = tf.abs(x)
    return tf.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    tf.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


# Matrix shapes are rounded up to multiples of this: oneDNN (TF's CPU matmul) JIT-compiles
# a kernel per distinct shape, which cost ~16% of the pipeline while every crop had
# its own; with rounded shapes its primitive cache serves nearly every call.
_QUANTUM = 8


def _round_up(n, q):
    return (n + q - 1) // q * q


def band_weights(in_size, out_size, out_count: int, out_start=0, gain: float = 1.0, block: int = _BLOCK):
    """PIL's antialiased bicubic weights of ``n`` 1-D resizes at once: one set of ops
    for a whole group of crops instead of one per crop (TF's per-op cost: the host
    side went from ~2,300 to ~830 ops per ImageNet example, ~25% less CPU).
    ``in_size``: (n,) input lengths; ``out_size`` and ``out_start``: scalars or (n,);
    outputs [out_start, out_start + out_count) are computed.

    PIL's precompute_coeffs: output i has centre c = (i + 0.5) * scale, support
    2 * max(scale, 1), taps j in [int(c - support + 0.5), int(c + support + 0.5))
    clipped to the input, weights bicubic((j - c + 0.5) / max(scale, 1))
    renormalised. The taps of ``block`` consecutive outputs lie in one window of
    span inputs, so one resize is a batched (blocks, block, span) @ (blocks, span,
    rest) product over gathered windows: ~(block + 4 scale) / out_size of a dense one.

    Returns w (n, blocks, block, S) float32 (times ``gain``), start (n, blocks) int32
    (first input of each block's window), span (n,) int32, S = max(span); the
    weights at window positions >= span are zero."""
    in_size = tf.reshape(tf.cast(in_size, tf.int32), [-1, 1])                            # (n, 1)
    insz = tf.cast(in_size, tf.float32)
    scale = insz / tf.reshape(tf.cast(out_size, tf.float32), [-1, 1])
    fscale = tf.maximum(scale, 1.0)
    support = 2.0 * fscale
    nb = -(-out_count // block)
    span = tf.cast(tf.math.ceil(block * scale + 2.0 * support), tf.int32) + 2
    span = tf.minimum(_round_up(span, _QUANTUM), in_size)                                 # (n, 1)
    i = tf.reshape(tf.cast(out_start, tf.float32), [-1, 1]) + tf.range(nb * block, dtype=tf.float32)
    center = (i + 0.5) * scale                                                            # (n, nb * block)
    lo = tf.maximum(tf.floor(center - support + 0.5), 0.0)
    hi = tf.minimum(tf.floor(center + support + 0.5), insz)
    start = tf.clip_by_value(tf.reshape(lo, [-1, nb, block])[:, :, 0], 0.0, insz - tf.cast(span, tf.float32))
    src = start[:, :, None, None] + tf.range(tf.reduce_max(span), dtype=tf.float32)      # (n, nb, 1, S)
    center, lo, hi = (tf.reshape(v, [-1, nb, block, 1]) for v in (center, lo, hi))
    w = tf.where((src >= lo) & (src < hi), _pil_bicubic((src - center + 0.5) / fscale[:, :, None, None]), 0.0)
    w = w * (gain / tf.reduce_sum(w, axis=-1, keepdims=True))                            # (n, nb, block, S)
    return w, tf.cast(start, tf.int32), span[:, 0]


def _apply_band(x, w, idx, shape, out_shape):
    """One resize along axis 0 of ``x`` by :func:`band_weights` of one crop: ``w``
    (nb, block, span), ``idx`` (nb, span) input rows, ``shape`` = [nb, span, -1] (a
    tensor); ``out_shape``: the output's shape, [nb * block, ...] (-1 for at most one
    unknown)."""
    windows = tf.cast(tf.reshape(tf.gather(x, idx), shape), tf.float32)                 # (nb, span, rest)
    y = tf.matmul(w, windows)                                                             # (nb, block, rest)
    return tf.reshape(y, out_shape)


def resample_axis(x, in_size, out_size, out_start=0, out_count: int | None = None, offset=0,
                  gain: float = 1.0, block: int = _BLOCK):
    """Resize axis 0 of ``x`` (entries [offset, offset + in_size)) to ``out_size`` with
    PIL's antialiased bicubic filter (see :func:`band_weights`); returns output entries
    [out_start, out_start + out_count) as float32, multiplied by ``gain``. ``x`` may be
    uint8 and must have a static rank (2 or 3)."""
    out_count = int(out_size if out_count is None else out_count)
    w, start, span = band_weights(tf.reshape(in_size, [1]), out_size, out_count, out_start, gain, block)
    span = span[0]
    idx = offset + start[0][:, None] + tf.range(span)[None, :]
    rest = [int(d) if d is not None else -1 for d in x.shape[1:]]
    return _apply_band(x, w[0, :, :, :span], idx, tf.stack([w.shape[1], span, -1]),
                       [w.shape[1] * w.shape[2]] + rest)[:out_count]


def crop_resize_group(image, boxes, size: int, gain: float = 1.0):
    """Crops (top, left, h, w) = ``boxes`` (n, 4) of an HxWxC image (uint8 or float),
    each PIL-bicubic resized to size x size, times ``gain``: float32 (n, size_w, size_h,
    C) -- width first, the layout the passes leave it in (not clipped).

    The weights, indices and slice shapes of all n crops are computed together, so
    each crop costs ~15 ops (a cut, two gathers, two matrix products, a transpose)
    instead of ~200. The crops stay separate ops, which tf.data's inter-op threads run
    in parallel. Rows first, over the crop's rows and a column cut whose width is rounded up (see
    _QUANTUM) and kept inside the image; the columns pass then reads the crop's own
    columns from it."""
    n = int(boxes.shape[0])
    channels = int(image.shape[-1]) if image.shape[-1] is not None else None

    def out_shape(*dims):  # a static list unless the channel count is unknown
        return list(dims) + [channels] if channels is not None else tf.stack(list(dims) + [tf.shape(image)[2]])
    width = tf.shape(image)[1]
    top, left, bh, bw = tf.unstack(tf.cast(boxes, tf.int32), axis=1)
    cut_w = tf.minimum(_round_up(bw, _QUANTUM), width)
    cut_left = tf.minimum(left, width - cut_w)
    w1, start1, span1 = band_weights(bh, size, size, gain=gain)
    w2, start2, span2 = band_weights(bw, size, size)
    nb, rows_out = int(w1.shape[1]), int(w1.shape[1]) * int(w1.shape[2])
    # Window rows relative to the cut; positions past a crop's span (zero weight,
    # sliced off) are kept in range.
    idx1 = tf.minimum(start1[:, :, None] + tf.range(tf.shape(w1)[-1]), (bh - 1)[:, None, None])
    off2 = left - cut_left
    idx2 = tf.minimum(off2[:, None, None] + start2[:, :, None] + tf.range(tf.shape(w2)[-1]),
                      (off2 + bw - 1)[:, None, None])
    zeros, ones, nbs = tf.zeros_like(top), tf.ones_like(top), tf.fill([n], nb)

    def rows(*cols):
        return tf.unstack(tf.stack(cols, axis=1))

    cut_begin, cut_size = rows(top, cut_left, zeros), rows(bh, cut_w, -ones)
    w_size1, w_size2 = rows(-ones, -ones, span1), rows(-ones, -ones, span2)
    i_size1, i_size2 = rows(-ones, span1), rows(-ones, span2)
    shape1, shape2 = rows(nbs, span1, -ones), rows(nbs, span2, -ones)
    w1, w2, idx1, idx2 = (tf.unstack(t) for t in (w1, w2, idx1, idx2))
    z3, z2 = tf.zeros([3], tf.int32), tf.zeros([2], tf.int32)
    out = []
    for i in range(n):
        cut = tf.slice(image, cut_begin[i], cut_size[i])                                 # (bh, cut_w, C)
        y = _apply_band(cut, tf.slice(w1[i], z3, w_size1[i]), tf.slice(idx1[i], z2, i_size1[i]), shape1[i],
                        out_shape(rows_out, -1))                                 # (size, cut_w, C)
        y = tf.transpose(y[:size], [1, 0, 2])                                            # (cut_w, size, C)
        y = _apply_band(y, tf.slice(w2[i], z3, w_size2[i]), tf.slice(idx2[i], z2, i_size2[i]), shape2[i],
                        out_shape(rows_out, size))
        out.append(y[:size])
    return tf.stack(out)


def crop_resize(image, box, size: int, gain: float = 1.0):
    """One crop (top, left, h, w) by :func:`crop_resize_group`: (size_w, size_h, C)."""
    return crop_resize_group(image, tf.reshape(box, [1, 4]), size, gain)[0]


# --------------------------------------------------------------------------
# Colour, blur, solarize, normalise: two XLA functions over (N, 3, H, W) crops.
# --------------------------------------------------------------------------
def _per_crop(t):
    """(N,) per-crop values broadcast against (N, C, H, W)."""
    return t[:, None, None, None]


def _gray_planar(x):
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def hue_shift_planar(x, delta):
    """torchvision/PIL adjust_hue in float: RGB -> HSV, h += delta (mod 1), -> RGB.
    x (N, 3, H, W) in [0, 1]; delta broadcastable to (N, H, W)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = tf.maximum(tf.maximum(r, g), b)
    c = v - tf.minimum(tf.minimum(r, g), b)
    safe = tf.where(c > 0, c, 1.0)
    h6 = tf.where(v == r, (g - b) / safe, tf.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h6 = h6 + 6.0 * delta
    h6 = h6 - 6.0 * tf.floor(h6 / 6.0)                                   # hue in sextants, [0, 6)

    def channel(n):  # HSV -> RGB: v - c * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
        k = n + h6
        k = tf.where(k >= 6.0, k - 6.0, k)
        return v - c * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)

    return tf.stack([channel(5.0), channel(3.0), channel(1.0)], axis=1)


def _linear_round(x, op, factors):
    """One colour-jitter op per crop (op: 0 brightness, 1 contrast, 2 saturation, else
    none) as clip(a x + b mean(gray) + d gray): torchvision's _blend forms."""
    fb, fc, fs = factors[:, 0], factors[:, 1], factors[:, 2]
    one, zero = tf.ones_like(fb), tf.zeros_like(fb)
    a = tf.where(op == 0, fb, tf.where(op == 1, fc, tf.where(op == 2, fs, one)))
    b = tf.where(op == 1, 1.0 - fc, zero)
    d = tf.where(op == 2, 1.0 - fs, zero)
    gray = _gray_planar(x)
    mean = tf.reduce_mean(gray, axis=[1, 2, 3])
    e = _per_crop
    y = tf.clip_by_value(e(a) * x + e(b * mean) + e(d) * gray, 0.0, 1.0)
    return tf.where(e(op >= 0) & e(op <= 2), y, x)


def _symmetric_blur_axis(x, w, axis: int, radius: int):
    """Per-crop 1-D filter w (N, 2R+1) along ``axis`` (2 or 3) with symmetric edges."""
    n = x.shape[axis]
    left = tf.reverse(tf.gather(x, tf.range(radius), axis=axis), [axis])
    right = tf.reverse(tf.gather(x, tf.range(n - radius, n), axis=axis), [axis])
    p = tf.concat([left, x, right], axis)
    acc = 0.0
    for j in range(2 * radius + 1):
        sl = p[:, :, j:j + n] if axis == 2 else p[:, :, :, j:j + n]
        acc += w[:, j, None, None, None] * sl
    return acc


def gaussian_blur_planar(x, sigma, radius: int):
    """Separable Gaussian blur of (N, 3, H, W) with per-crop sigma (N,), symmetric edges."""
    k = tf.range(-radius, radius + 1, dtype=tf.float32)
    w = tf.exp(-(k[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    w = w / tf.reduce_sum(w, axis=1, keepdims=True)
    return _symmetric_blur_axis(_symmetric_blur_axis(x, w, 2, radius), w, 3, radius)


def _jitter_stage_impl(x, flip, jitter, factors, order, gray, use_jitter: bool):
    """Resized (N, W, H, 3) crops -> (N, 3, H, W): clip, flip, colour jitter, grayscale
    (official order)."""
    e = _per_crop
    x = tf.clip_by_value(tf.transpose(x, [0, 3, 2, 1]), 0.0, 1.0)
    x = tf.where(e(flip), tf.reverse(x, [3]), x)
    if use_jitter:
        # The hue op is the only non-linear one: the ops before it (in each crop's
        # order), hue, then the ops after it -- 3 + 1 + 3 rounds for any order.
        hue_pos = tf.argmax(tf.cast(order == 3, tf.int32), axis=1, output_type=tf.int32)
        none = tf.fill(tf.shape(hue_pos), -1)
        for k in range(3):
            op = tf.where(jitter & (k < hue_pos), order[:, k], none)
            x = _linear_round(x, op, factors)
        x = tf.where(e(jitter), hue_shift_planar(x, factors[:, 3, None, None]), x)
        for k in range(3):
            pos = hue_pos + 1 + k
            op = tf.gather(order, tf.minimum(pos, 3), axis=1, batch_dims=1)
            x = _linear_round(x, tf.where(jitter & (pos <= 3), op, none), factors)
    return tf.where(e(gray), tf.tile(_gray_planar(x), [1, 3, 1, 1]), x)


def _finish_stage_impl(x, blur, sigma, solarize, radius: int, normalize: bool, use_blur: bool):
    """(N, 3, H, W) -> (N, H, W, 3): blur, solarize, normalise (official order)."""
    e = _per_crop
    if use_blur:
        x = tf.where(e(blur), gaussian_blur_planar(x, sigma, radius), x)
    x = tf.where(e(solarize) & (x >= 128.0 / 255.0), 1.0 - x, x)
    x = tf.transpose(x, [0, 2, 3, 1])
    return normalize_imagenet(x) if normalize else x


# Two XLA functions, not one: inside a single one XLA fuses the jitter into each of
# the blur's shifted reads and recomputes it per tap.
_jitter_stage_xla = tf.function(_jitter_stage_impl, jit_compile=True)
_finish_stage_xla = tf.function(_finish_stage_impl, jit_compile=True)


def blur_radius(size: int, max_sigma: float) -> int:
    return max(1, min(int(math.ceil(3 * max_sigma)), size // 2))


def render_crops(image, params, size: int, cfg: MultiCropConfig, until: str = "all"):
    """(N, size, size, 3) float32 crops of a uint8 HxWx3 image by ``params``
    (from :func:`sample_crop_params`). ``until`` stops early (benchmarks' per-stage
    costs): 'resize' (the cut + resized crops, (N, W, H, 3) in [0, 255], not clipped),
    'colour' (+ flip, jitter, grayscale: (N, 3, H, W)), 'no_blur' (everything but the
    blur), 'all'."""
    n = params["box"].shape[0]
    gain = 1.0 if until == "resize" else 1.0 / 255.0
    crops = tf.ensure_shape(crop_resize_group(image, params["box"], size, gain=gain), [n, size, size, 3])
    if until == "resize":
        return crops
    x = _jitter_stage_xla(crops, params["flip"], params["jitter"], params["factors"], params["order"], params["gray"],
                  use_jitter=cfg.jitter_p > 0)
    if until == "colour":
        return x
    return _finish_stage_xla(x, params["blur"], params["sigma"], params["solarize"],
                     radius=blur_radius(size, cfg.blur_sigma[1]), normalize=cfg.normalize,
                     use_blur=until == "all" and max(cfg.blur_p) > 0 and cfg.blur_sigma[1] > 0)


def multi_crop(image_uint8, seed, cfg: MultiCropConfig, until: str = "all"):
    """{'global_crops': (2, G, G, 3), 'local_crops': (L, l, l, 3)} float32 from one decoded
    uint8 image (the crops are cut from the uint8 pixels: no full-image float copy).

    ``until='device'`` (``config.data.device_augment``): the crops are only cut and
    resized, rounded to uint8 (as PIL's resize does) and left width first, (n, W, H, 3)
    (:func:`dino_jax.data.device_augment.apply` swaps the axes back), and every photometric decision
    goes with them, for :mod:`dino_jax.data.device_augment` to finish on the accelerator:
    'global_aug' / 'local_aug' = {flip, jitter, gray, blur, solarize: (n,) bool;
    factors: (n, 4) float32; order: (n, 4) int32; sigma: (n,) float32}, the same
    decisions the host path draws. Other ``until`` values: see :func:`render_crops`."""
    image = image_uint8
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    groups = [("global", 2, cfg.global_size, cfg.global_scale, cfg.blur_p[:2], (0.0, cfg.solarize_p))]
    if cfg.num_local:
        groups.append(("local", cfg.num_local, cfg.local_size, cfg.local_scale,
                       (cfg.blur_p[2],) * cfg.num_local, (0.0,) * cfg.num_local))
    out = {}
    for g, (name, n, size, scale, blur_p, solarize_p) in enumerate(groups):
        params = sample_crop_params(_fold(seed, g), n, h, w, scale, cfg, blur_p=blur_p, solarize_p=solarize_p)
        if until == "device":
            crops = render_crops(image, params, size, cfg, until="resize")        # (n, W, H, 3)
            out[name + "_crops"] = tf.cast(tf.round(tf.clip_by_value(crops, 0.0, 255.0)), tf.uint8)
            out[name + "_aug"] = {k: v for k, v in params.items() if k != "box"}
        elif cfg.pil_ops and until == "all":
            out[name + "_crops"] = render_crops_pil(image, params, size, cfg)
        else:
            out[name + "_crops"] = render_crops(image, params, size, cfg, until)
    if not cfg.num_local:
        dtype = tf.uint8 if until == "device" else tf.float32
        out["local_crops"] = tf.zeros([0, cfg.local_size, cfg.local_size, 3], dtype)
        if until == "device":
            out["local_aug"] = {k: tf.zeros([0] + v.shape[1:], v.dtype)
                                for k, v in out["global_aug"].items()}
    return out


def _pil_crops(image, box, flip, jitter, factors, order, gray, blur, sigma, solarize, size, normalize):
    """numpy/PIL side of :func:`render_crops_pil` (runs in tf.numpy_function)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: PLC0415

    img = Image.fromarray(np.asarray(image, np.uint8), "RGB")
    size = int(size)
    out = np.empty((len(box), size, size, 3), np.float32)
    enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i, (top, left, h, w) in enumerate(np.asarray(box).tolist()):
        x = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        if flip[i]:
            x = x.transpose(Image.FLIP_LEFT_RIGHT)
        if jitter[i]:
            for op in order[i]:
                f = float(factors[i][op])
                if op < 3:       # torchvision's F_pil: ImageEnhance blends, uint8 after each
                    x = enhance[op](x).enhance(f)
                else:            # F_pil.adjust_hue: uint8 HSV, h += uint8(f * 255) (wrapping)
                    hch, sch, vch = x.convert("HSV").split()
                    shifted = (np.asarray(hch, np.int32) + int(f * 255)) % 256
                    x = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), sch, vch)).convert("RGB")
        if gray[i]:
            x = x.convert("L").convert("RGB")
        if blur[i]:
            x = x.filter(ImageFilter.GaussianBlur(radius=float(sigma[i])))
        if solarize[i]:
            x = ImageOps.solarize(x, 128)
        out[i] = np.asarray(x, np.float32) / 255.0
    if normalize:
        out = (out - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return out


def render_crops_pil(image, params, size: int, cfg: MultiCropConfig):
    """(N, size, size, 3) float32 crops made by PIL exactly as the official torchvision
    transforms make them (``data.pil_ops``): crop + BICUBIC resize, flip, ColorJitter's
    ImageEnhance ops and uint8 HSV hue shift in each crop's order, convert('L'),
    GaussianBlur(radius=sigma), solarize(128), /255 and normalise, every op on uint8,
    with the decisions of ``params`` (from :func:`sample_crop_params`)."""
    n = params["box"].shape[0]
    args = [image] + [params[k] for k in ("box", "flip", "jitter", "factors", "order", "gray", "blur",
                                           "sigma", "solarize")]
    fn = lambda *a: _pil_crops(*a, size=size, normalize=cfg.normalize)  # noqa: E731
    crops = tf.numpy_function(fn, args, tf.float32, stateful=False)
    return tf.ensure_shape(crops, [n, size, size, 3])


def normalize_imagenet(x):
    """ImageNet mean/std normalisation of (..., 3) float [0, 1] pixels."""
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def eval_resize_geometry(height, width, image_size: int, resize_ratio: float = 256 / 224):
    """(new_h, new_w, top, left) of torchvision's Resize(int(image_size * ratio)) +
    CenterCrop(image_size): the shorter side becomes ``short``, the longer one
    int(short * long / short_side) (truncated, as torchvision); the crop offsets are
    round((new - size) / 2) with Python's half-to-even rounding."""
    h, w = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    short = int(image_size * resize_ratio)
    # int(short * long / short_side) in exact integer arithmetic (floor of a positive ratio).
    nh = tf.where(h <= w, tf.constant(short, tf.int64), (short * h) // w)
    nw = tf.where(h <= w, (short * w) // h, tf.constant(short, tf.int64))
    top = tf.round(tf.cast(nh - image_size, tf.float64) / 2.0)    # tf.round: half to even
    left = tf.round(tf.cast(nw - image_size, tf.float64) / 2.0)
    return (tf.cast(nh, tf.int32), tf.cast(nw, tf.int32), tf.cast(top, tf.int32), tf.cast(left, tf.int32))


def eval_transform(image_uint8, image_size: int, resize_ratio: float = 256 / 224):
    """Resize the shorter side to int(image_size * ratio) (PIL bicubic), centre crop, normalise
    (the official Resize(256) + CenterCrop(224)). Only the rows and columns of the centre
    crop are computed."""
    h, w = tf.shape(image_uint8)[0], tf.shape(image_uint8)[1]
    nh, nw, top, left = eval_resize_geometry(h, w, image_size, resize_ratio)
    sq = int(image_size)
    y = resample_axis(image_uint8, h, nh, top, sq, gain=1.0 / 255.0)                 # (sq, W, 3)
    y = resample_axis(tf.transpose(y, [1, 0, 2]), w, nw, left, sq)                   # (sq_w, sq_h, 3)
    y = tf.clip_by_value(tf.transpose(y, [1, 0, 2]), 0.0, 1.0)
    return normalize_imagenet(tf.ensure_shape(y, [sq, sq, 3]))


def train_transform(image_uint8, seed, image_size: int, scale=(0.08, 1.0)):
    """Linear-probe training: RandomResizedCrop (torchvision default scale) + flip, normalise."""
    h, w = tf.shape(image_uint8)[0], tf.shape(image_uint8)[1]
    box = random_resized_crop_box(_fold(seed, 0), h, w, scale)
    x = tf.transpose(crop_resize(image_uint8, box, image_size, gain=1.0 / 255.0), [1, 0, 2])
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = tf.cond(_u(seed, 1) < 0.5, lambda: tf.reverse(x, [1]), lambda: x)
    return normalize_imagenet(tf.ensure_shape(x, [image_size, image_size, 3]))

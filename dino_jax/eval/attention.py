"""CLS-token self-attention of the last block, one map per head, and the official
threshold masks (the library behind ``python -m dino_jax.visualize_attention``).

    from dino_jax.eval import attention, common
    model, params = common.load_backbone("vits16/")
    maps = attention.attention_maps(model, params, image_uint8)      # (heads, h, w)
    masks = attention.threshold_masks(maps.reshape(len(maps), -1), 0.6)

:func:`visualize` writes what the official visualize_attention.py writes (see
``python -m dino_jax.visualize_attention --help``).
"""
from __future__ import annotations

import io

import numpy as np

from dino_jax import paths
from dino_jax.eval import common

# matplotlib's viridis at 0, 1/8, ..., 1 (linearly interpolated between), so the
# maps look like the official plt.imsave output without a matplotlib dependency.
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 82, 139], [44, 113, 142], [33, 145, 140],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float64)
_TINTS = np.array([[255, 64, 64], [64, 160, 255], [64, 220, 96], [255, 190, 40], [200, 80, 255],
                   [40, 220, 220]], np.float64)


def colorize(x: np.ndarray) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 viridis after min-max scaling."""
    lo, hi = float(x.min()), float(x.max())
    t = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x, np.float64)
    pos = np.clip(t, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(_VIRIDIS) - 2)
    f = (pos - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def threshold_masks(attn: np.ndarray, threshold: float) -> np.ndarray:
    """Official rule on (heads, N) attention: sort ascending, normalise each head to
    sum 1, cumulative sum, keep the patches where it exceeds ``1 - threshold``. The
    kept patches are the most attended ones, their share is >= threshold, and
    dropping the least attended of them takes it below."""
    attn = np.asarray(attn, np.float64)
    idx = np.argsort(attn, axis=1, kind="stable")
    val = np.take_along_axis(attn, idx, axis=1)
    val = val / val.sum(axis=1, keepdims=True)
    keep_sorted = np.cumsum(val, axis=1) > (1.0 - threshold)
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, idx, keep_sorted, axis=1)
    return keep


def upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of the last two axes by an integer factor."""
    return np.repeat(np.repeat(x, factor, axis=-2), factor, axis=-1)


def prepare_image(image: np.ndarray, image_size, patch: int) -> np.ndarray:
    """uint8 (H, W, 3) resized as the official tool (torchvision Resize, bilinear) and cropped
    to a multiple of the patch size; still uint8."""
    from PIL import Image  # noqa: PLC0415

    if image_size and len(image_size) == 2 and min(image_size) > 0:
        h, w = int(image_size[0]), int(image_size[1])
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.uint8)
    elif image_size and len(image_size) == 1 and image_size[0] > 0:
        image = resize_shorter(image, int(image_size[0]), Image.BILINEAR)
    return common.crop_to_patch_multiple(image, patch)


def cls_attention(model, params, image_uint8: np.ndarray) -> np.ndarray:
    """(heads, h, w) float32: the last block's CLS-to-patch attention of one prepared image."""
    import jax.numpy as jnp  # noqa: PLC0415

    x = jnp.asarray(common.normalize_uint8(image_uint8)[None])
    out = model.apply({"params": params}, x, return_attention=True, method="forward_features")
    att = np.asarray(out["cls_attention"][0], np.float32)  # DINOv2's registers left out
    p = model.patch_size
    return att.reshape(att.shape[0], image_uint8.shape[0] // p, image_uint8.shape[1] // p)


def save_png(path: str, array: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    if paths.is_remote(path):  # one object per image
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        paths.write_bytes(path, buf.getvalue())
    else:
        Image.fromarray(array).save(path)


def visualize(model, params, image: np.ndarray, output_dir: str, image_size=(480, 480),
              threshold: float | None = 0.6, progress=print) -> dict:
    """Write the files listed in the module docstring; returns {'attention', 'masks', 'image'}."""
    p = model.patch_size
    img = prepare_image(image, image_size, p)
    attn = cls_attention(model, params, img)
    heads, h, w = attn.shape
    masks = None
    if threshold is not None:
        masks = threshold_masks(attn.reshape(heads, -1), threshold).reshape(heads, h, w)
    paths.makedirs(output_dir)
    save_png(paths.join(output_dir, "img.png"), img)
    progress(f"{paths.join(output_dir, 'img.png')} saved ({img.shape[0]}x{img.shape[1]}, "
             f"{h}x{w} patches of {p})")
    up = upsample(attn, p)
    for j in range(heads):
        fname = paths.join(output_dir, f"attn-head{j}.png")
        save_png(fname, colorize(up[j]))
        progress(f"{fname} saved.")
    if masks is not None:
        up_m = upsample(masks, p)
        for j in range(heads):
            fname = paths.join(output_dir, f"mask_th{threshold}_head{j}.png")
            save_png(fname, (up_m[j] * 255).astype(np.uint8))
            tint = _TINTS[j % len(_TINTS)]
            over = np.where(up_m[j][..., None], 0.5 * img + 0.5 * tint, 0.6 * img)
            save_png(paths.join(output_dir, f"overlay_th{threshold}_head{j}.png"),
                     np.round(over).astype(np.uint8))
            progress(f"{fname} saved ({int(masks[j].sum())} of {h * w} patches keep "
                     f"{100 * attn[j][masks[j]].sum() / attn[j].sum():.1f}% of the attention).")
    extra = {"masks": masks, "threshold": np.float64(threshold)} if masks is not None else {}
    common.save_npz(paths.join(output_dir, "attention.npz"),
                 {"attention": attn, "patch_size": np.int32(p), **extra})
    return {"attention": attn, "masks": masks, "image": img}


def resize_shorter(image: np.ndarray, size: int, resample) -> np.ndarray:
    """torchvision ``Resize(int)`` on a PIL image: shorter side to ``size``, the other
    side ``int(size * long / short)``."""
    from PIL import Image  # noqa: PLC0415

    h, w = image.shape[:2]
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    return np.asarray(Image.fromarray(image).resize((ow, oh), resample), np.uint8)


def attention_maps(model, params, image_uint8: np.ndarray, image_size=None) -> np.ndarray:
    """(heads, h, w) float32 last-block CLS attention of one uint8 (H, W, 3) image,
    after :func:`prepare_image` (``image_size`` None: the image's own size)."""
    return cls_attention(model, params, prepare_image(image_uint8, image_size, model.patch_size))


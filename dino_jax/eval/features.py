"""Backbone features of image files or arrays: the CLS token and, from the same
forward pass, the last block's CLS-to-patch attention (the library behind
``python -m dino_jax.extract``).

    from dino_jax.eval import common, features
    model, params = common.load_backbone("vits16/")
    cls, att = features.extract_features(model, params, images_uint8, attention=True)

Inputs: a folder (every image under it, :func:`dino_jax.data.files.list_images`
order, read with PIL as RGB) or an array: uint8 NHWC (N, H, W, 3), (N, H, W, 1)
or (N, H, W), pixel values 0..255, or float32 NHWC taken as already normalised.
uint8 images are normalised with the ImageNet mean/std. Without ``image_size``
each image is used at its own size, cropped at the bottom/right to a multiple of
the patch size (as the official visualize_attention.py); with ``image_size S``
the evaluation transform of :mod:`dino_jax.eval.common` is applied first (the
one k-NN uses: shorter side to ``int(S * resize_ratio)``, bicubic, centre crop S).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import paths, sharding
from dino_jax.eval import common
from dino_jax.eval.common import EvalError
from dino_jax.models.head import l2_normalize


class Inputs:
    """Lazily prepared model inputs: ``len``, ``sizes[i]`` (H, W) and ``get(i)`` ->
    float32 normalised (H, W, 3); ``paths`` for folder input. Images are decoded one
    batch at a time, so a large folder never sits in memory as floats."""

    def __init__(self, n, sizes, get, paths=None):
        self.n, self.sizes, self.get, self.paths = n, [tuple(int(v) for v in s) for s in sizes], get, paths

    def __len__(self):
        return self.n


def as_rgb_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise EvalError(f"{what} must be (N, H, W, 3), (N, H, W, 1) or (N, H, W); got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _model_size(hw, patch: int, image_size):
    """The (H, W) an image of ``hw`` pixels enters the model with."""
    if image_size:
        return image_size, image_size
    h, w = hw[0] - hw[0] % patch, hw[1] - hw[1] % patch
    if h == 0 or w == 0:
        raise EvalError(f"image of {hw[0]}x{hw[1]} pixels is smaller than one {patch}x{patch} patch")
    return h, w


def _preparer(patch: int, image_size, resize_ratio: float):
    def prepare(img):  # uint8 HWC -> normalised float
        if image_size:
            return common.eval_transform(img, image_size, resize_ratio)
        return common.crop_to_patch_multiple(common.normalize_uint8(img), patch)
    return prepare


def _check_size(image_size, patch):
    if image_size and (image_size <= 0 or image_size % patch):
        raise EvalError(f"image size {image_size} is not a positive multiple of the patch size {patch}")


def array_inputs(images: np.ndarray, patch: int, image_size: int | None = None,
                 resize_ratio: float = 256 / 224, what: str = "images") -> Inputs:
    """Inputs of an image array (uint8 0..255, or float32 already normalised NHWC)."""
    _check_size(image_size, patch)
    images = np.asarray(images)
    if len(images) == 0:
        raise EvalError(f"{what} is empty")
    if np.issubdtype(images.dtype, np.floating):
        if image_size:
            raise EvalError("the evaluation transform needs uint8 images; float images are taken as "
                            "already normalised model inputs and used as they are")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EvalError(f"float {what} must be normalised NHWC (N, H, W, 3); got shape {images.shape}")
        hw = _model_size(images.shape[1:3], patch, None)
        return Inputs(len(images), [hw] * len(images), lambda i: images[i, :hw[0], :hw[1]].astype(np.float32))
    if images.dtype != np.uint8:
        raise EvalError(f"{what} must be uint8 (0..255) or float32 (normalised); got {images.dtype}")
    images = as_rgb_uint8(images, what)
    hw = _model_size(images.shape[1:3], patch, image_size)
    prepare = _preparer(patch, image_size, resize_ratio)
    return Inputs(len(images), [hw] * len(images), lambda i: prepare(images[i]))


def folder_inputs(folder: str, patch: int, image_size: int | None = None,
                  resize_ratio: float = 256 / 224) -> Inputs:
    """Inputs of every image file under ``folder``; ``paths`` relative to it."""
    _check_size(image_size, patch)
    full = common.list_images(folder)
    if not full:
        raise EvalError(f"no image files ({' '.join(common.IMAGE_EXTENSIONS)}) under {folder}")
    # With image_size every image enters at S x S: no file header needs opening.
    sizes = ([(image_size, image_size)] * len(full) if image_size else
             [_model_size(common.image_header_size(f), patch, image_size) for f in full])
    prepare = _preparer(patch, image_size, resize_ratio)
    return Inputs(len(full), sizes, lambda i: prepare(common.read_image(full[i])),
                  [f[len(folder.rstrip("/")) + 1:] if paths.is_remote(folder) else os.path.relpath(f, folder)
                   for f in full])


def load_inputs(path: str, patch: int, image_size: int | None = None, resize_ratio: float = 256 / 224) -> Inputs:
    """Inputs of a folder of images or an ``.npz`` holding ``images``."""
    if not paths.exists(path):
        raise EvalError(f"no such input: {path}")
    if paths.isdir(path):
        return folder_inputs(path, patch, image_size, resize_ratio)
    if not path.endswith(".npz"):
        raise EvalError(f"input must be a folder of images or an .npz file with 'images': {path}")
    try:
        data = np.load(paths.readable(path), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - BadZipFile, pickles, truncation: one line
        raise EvalError(f"cannot read {path} as an .npz file: {common.error_line(e)}") from e
    if not hasattr(data, "files"):
        raise EvalError(f"{path} is a single .npy array, not an .npz with an 'images' array")
    with data:
        if "images" not in data.files:
            raise EvalError(f"{path} has no 'images' array (it has: {', '.join(data.files) or 'nothing'})")
        try:
            images = np.asarray(data["images"])
        except Exception as e:  # noqa: BLE001
            raise EvalError(f"cannot read 'images' from {path}: {common.error_line(e)}") from e
    return array_inputs(images, patch, image_size, resize_ratio, what=f"'images' in {path}")


# Linear-probe feature layouts: the official DINO eval_linear's, dinov2's eval/linear.py's.
LINEAR_LAYOUTS = ("dino", "dinov2")


def forward(backbone, params, images, output: str = "cls", normalize: bool = False,
            n_last_blocks: int = 1, avgpool: bool = False, layout: str = "dino"):
    """The features of ``images`` (NHWC, normalised) the evaluations use, float32:

    - ``'cls'``: (B, D), the backbone's CLS feature (its ``__call__``); L2-normalised
      with ``normalize`` (k-NN, retrieval);
    - ``'cls_attention'``: (CLS (B, D), the last block's CLS-to-patch attention
      (B, heads, h, w)) from one forward pass (extract, visualisation);
    - ``'tokens'``: (CLS (B, D), patch tokens (B, N, D)) of the final normalised tokens
      (copy detection, video segmentation);
    - ``'linear'``: (B, D * (n_last_blocks + avgpool)), the linear probe's concatenated CLS
      tokens of the last ``n_last_blocks`` blocks, with ``avgpool`` the last block's mean
      patch token interleaved as the official eval_linear lays it out, or with
      ``layout='dinov2'`` appended after them as dinov2's ``create_linear_input`` does.
    Tokens come from the backbone's own methods (``forward_features``,
    ``get_intermediate_layers``), which leave out DINOv2's register tokens.
    """
    v = {"params": params}
    if output == "cls":
        cls = backbone.apply(v, images).astype(jnp.float32)
        return l2_normalize(cls) if normalize else cls
    if output == "cls_attention":
        p = backbone.patch_size
        out = backbone.apply(v, images, return_attention=True, method="forward_features")
        att = out["cls_attention"]
        att = att.reshape(images.shape[0], att.shape[1], images.shape[1] // p, images.shape[2] // p)
        return out["x_norm_clstoken"].astype(jnp.float32), att.astype(jnp.float32)
    if output == "tokens":
        out = backbone.apply(v, images, method="forward_features")
        return out["x_norm_clstoken"].astype(jnp.float32), out["x_norm_patchtokens"].astype(jnp.float32)
    if output == "linear":
        if layout not in LINEAR_LAYOUTS:
            raise ValueError(f"linear feature layout must be one of {LINEAR_LAYOUTS}, got {layout!r}")
        outs = backbone.apply(v, images, n=n_last_blocks, return_class_token=True,
                              method="get_intermediate_layers")  # ((patch tokens, CLS), ...)
        feats = jnp.concatenate([cls for _, cls in outs], axis=-1).astype(jnp.float32)
        if avgpool:
            mean = jnp.mean(outs[-1][0].astype(jnp.float32), axis=1)
            if layout == "dinov2":  # dinov2: cat((CLS tokens..., mean patch token), -1)
                return jnp.concatenate([feats, mean], axis=-1)
            # Official DINO: cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1).
            feats = jnp.stack([feats, mean], axis=-1).reshape(feats.shape[0], -1)
        return feats
    raise ValueError(f"unknown feature output {output!r}")


@functools.lru_cache(maxsize=32)
def feature_fn(backbone, output: str = "cls", normalize: bool = False, mesh=None, n_last_blocks: int = 1,
               avgpool: bool = False, layout: str = "dino"):
    """Jitted ``(params, images) -> forward(...)`` (see :func:`forward`), built once per backbone
    and settings and reused by every evaluation (periodic ones included, so a training run
    compiles each feature program once). With ``mesh`` the batch is split over it and the
    params are replicated."""
    fn = functools.partial(forward, backbone, output=output, normalize=normalize,
                           n_last_blocks=n_last_blocks, avgpool=avgpool, layout=layout)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.batch_sharding(mesh))


def extract(model, params, inputs: Inputs, batch_size: int = 64, attention: bool = False, progress=None,
            sink=None, num_threads: int = 0):
    """(cls (N, D) float32, list of per-image attention maps (heads, h, w) or None).
    Same-size images are batched (in index order when all share one size); batches are
    padded so each size compiles once or a few times. Images are decoded by
    ``num_threads`` threads (0: one per CPU) a few batches ahead of the model. With
    ``sink``, each batch's ``(indices, cls, attention or None)`` is handed to
    ``sink`` as it is made and nothing is kept (returns ``(None, None)``)."""
    if batch_size <= 0:
        raise EvalError(f"batch size must be positive, got {batch_size}")
    fn = feature_fn(model, "cls_attention" if attention else "cls")
    n = len(inputs)
    by_size: dict = {}
    for i in range(n):
        by_size.setdefault(inputs.sizes[i], []).append(i)
    cls = np.zeros((n, model.embed_dim), np.float32) if sink is None else None
    att = [None] * n if attention and sink is None else None
    # A size's batches are padded to one shape: batch_size, or the power of two covering a
    # smaller group (so groups of different counts share compiled shapes).
    batches = [(idx[s:s + batch_size], min(batch_size, 1 << (len(idx) - 1).bit_length()))
               for idx in by_size.values() for s in range(0, len(idx), batch_size)]
    t0, every, done = time.time(), max(1, len(batches) // 10), 0
    decoded = common.parallel_map(inputs.get, (i for idx, _ in batches for i in idx),
                                  num_threads, ahead=2 * batch_size)
    for b, (idx, full) in enumerate(batches):
        x = np.stack([next(decoded) for _ in idx])
        if len(idx) < full:
            x = np.concatenate([x, np.zeros((full - len(idx),) + x.shape[1:], x.dtype)])
        c, a = fn(params, x) if attention else (fn(params, x), None)
        if sink is not None:
            sink(idx, np.asarray(c)[:len(idx)], np.asarray(a)[:len(idx)] if attention else None)
        else:
            cls[idx] = np.asarray(c)[:len(idx)]
        if attention and sink is None:
            a = np.asarray(a)
            for j, i in enumerate(idx):
                att[i] = a[j]
        done += len(idx)
        if progress and ((b + 1) % every == 0 or b + 1 == len(batches)):
            progress(f"  {b + 1}/{len(batches)} batches, {done}/{n} images ({time.time() - t0:.0f}s)")
    return cls, att


def extract_features(model, params, images, batch_size: int = 64, attention: bool = False,
                     image_size: int | None = None, resize_ratio: float = 256 / 224):
    """The Python entry point: ``images`` is a folder path, an ``.npz`` path or an array
    (see the module docstring). Returns ``cls`` (N, D), or ``(cls, attention)`` with
    ``attention=True`` (an (N, heads, h, w) array when all images share a size, else a list)."""
    if isinstance(images, (str, os.PathLike)):
        inputs = load_inputs(os.fspath(images), model.patch_size, image_size, resize_ratio)
    else:
        inputs = array_inputs(images, model.patch_size, image_size, resize_ratio)
    cls, att = extract(model, params, inputs, batch_size, attention)
    if not attention:
        return cls
    return cls, (np.stack(att) if len({a.shape for a in att}) == 1 else att)

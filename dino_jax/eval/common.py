"""What every evaluation shares: one error family with one-line CLI handling,
checkpoint loading, image reading, the evaluation transform, ImageNet
normalisation, dataset flags, batched features of a dataset iterator and safe
``.npz`` writing. The ``python -m dino_jax.eval.*`` programs, ``extract``,
``visualize_attention`` and ``export`` import this module, never each other.

The evaluation transform is the one of the training package's evaluation
pipeline (:func:`dino_jax.data.augment.eval_transform`: shorter side to
``int(size * resize_ratio)`` with PIL's bicubic filter, torchvision's centre
crop, ImageNet normalisation), so k-NN, the linear probe and ``extract`` give
the same features for the same image.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import numpy as np

from dino_jax import paths
from dino_jax.data.files import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, list_images  # noqa: F401

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


class EvalError(ValueError):
    """Bad evaluation input (missing file, wrong layout, unreadable image): one line for the user."""


# Every error a tool reports as one line. CheckpointError, ConversionError, DataError and
# EvalError are ValueErrors; FileNotFoundError and PIL's UnidentifiedImageError are OSErrors.
ERRORS = (ValueError, OSError)


def error_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def run_cli(body) -> int:
    """Run ``body()`` (returns an exit code); an error of :data:`ERRORS` becomes one
    ``error: ...`` line on stderr and exit code 1 (``DINO_JAX_DEBUG=1`` re-raises)."""
    try:
        return int(body() or 0)
    except ERRORS as e:
        if os.environ.get("DINO_JAX_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1


COMPILATION_CACHE_ENV = "DINO_JAX_COMPILATION_CACHE"


def default_compilation_cache_dir() -> str:
    """``$DINO_JAX_COMPILATION_CACHE`` if set (empty: no cache), else
    ``$XDG_CACHE_HOME/dino_jax/jax_compilation_cache`` (``~/.cache`` without XDG_CACHE_HOME)."""
    if COMPILATION_CACHE_ENV in os.environ:
        return os.environ[COMPILATION_CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dino_jax", "jax_compilation_cache")


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path`` ('' leaves it off): a second run of an
    evaluation program loads its compiled feature and propagation programs from disk instead
    of compiling them again (JAX caches programs that took at least
    ``jax_persistent_cache_min_compile_time_secs``, 1 s by default, to compile)."""
    if path:
        import jax  # noqa: PLC0415

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


class _ToolParser(argparse.ArgumentParser):
    """An ArgumentParser that turns on the compilation cache its flag names once parsed."""

    def parse_args(self, args=None, namespace=None):
        a = super().parse_args(args, namespace)
        enable_compilation_cache(a.compilation_cache_dir)
        return a


def tool_parser(prog: str, description: str, dtype: bool = True):
    """An argparse parser with the options every evaluation tool shares: ``--checkpoint``,
    ``--compilation_cache_dir`` (turned on by ``parse_args``) and ``--dtype``."""
    ap = _ToolParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="params dir (convert torch2jax / export) or training workdir (its teacher backbone)")
    ap.add_argument("--compilation_cache_dir", default=default_compilation_cache_dir(),
                    help=f"JAX's persistent compilation cache: later runs reuse the compiled programs "
                         f"('' turns it off; default ${COMPILATION_CACHE_ENV} if set, else "
                         f"~/.cache/dino_jax/jax_compilation_cache, under $XDG_CACHE_HOME when that is set)")
    if dtype:
        ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="backbone compute dtype (float32 reproduces the official features to 1e-4)")
    return ap


def load_backbone(path: str, dtype: str = "float32"):
    """(VisionTransformer, backbone params) from a params dir or a training workdir."""
    import jax.numpy as jnp  # noqa: PLC0415

    from dino_jax import checkpoint  # noqa: PLC0415

    return checkpoint.load_backbone(path, dtype=jnp.dtype(dtype))


def require(path: str, what: str = "file") -> str:
    """``path`` (local or gs://) if it exists, else an EvalError naming it."""
    if not paths.exists(path):
        raise EvalError(f"missing {what}: {path}")
    return path


# --------------------------------------------------------------------------
# Images (PIL / NumPy).
# --------------------------------------------------------------------------
def read_image(path: str, mode: str = "RGB"):
    """uint8 (H, W, 3) RGB array of an image file; EvalError naming the path otherwise."""
    from PIL import Image  # noqa: PLC0415

    if not paths.isfile(path):
        raise EvalError(f"no such image: {path}")
    try:
        with Image.open(paths.readable(path)) as im:
            return np.asarray(im.convert(mode), np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalError(f"cannot read image {path}: {error_line(e)}") from e


def open_image(path: str, mode: str = "RGB"):
    """A loaded PIL image (for tools whose official protocol resizes with PIL)."""
    from PIL import Image  # noqa: PLC0415

    if not paths.isfile(path):
        raise EvalError(f"no such image: {path}")
    try:
        with Image.open(paths.readable(path)) as im:
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalError(f"cannot read image {path}: {error_line(e)}") from e


def image_header_size(path: str) -> tuple[int, int]:
    """(H, W) from the file header without decoding the pixels."""
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(paths.readable(path)) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalError(f"cannot read image {path}: {error_line(e)}") from e
    return h, w


def normalize_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 ImageNet-normalised (torchvision ToTensor + Normalize)."""
    return ((np.asarray(image).astype(np.float32) / 255.0) - MEAN) / STD


def crop_to_patch_multiple(image: np.ndarray, patch: int) -> np.ndarray:
    """Drop the bottom/right rows and columns beyond a multiple of the patch size (..., H, W, C)."""
    h, w = image.shape[-3], image.shape[-2]
    h2, w2 = h - h % patch, w - w % patch
    if h2 == 0 or w2 == 0:
        raise EvalError(f"image of {h}x{w} pixels is smaller than one {patch}x{patch} patch")
    return image[..., :h2, :w2, :]


@functools.lru_cache(maxsize=8)
def _eval_transform_fn(size: int, resize_ratio: float):
    from dino_jax.data import augment  # noqa: PLC0415  (imports TensorFlow)
    from dino_jax.data.tfutil import tf  # noqa: PLC0415

    return tf.function(lambda img: augment.eval_transform(img, size, resize_ratio),
                       input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])


def eval_transform(image: np.ndarray, size: int, resize_ratio: float = 256 / 224) -> np.ndarray:
    """The evaluation transform on one uint8 (H, W, 3) image -> float32 (size, size, 3),
    normalised: exactly what the k-NN / linear-probe pipeline feeds the model."""
    short = int(size * resize_ratio)
    if short < size:
        raise EvalError(f"resize ratio {resize_ratio} makes the shorter side {short}, smaller than the crop {size}")
    return _eval_transform_fn(int(size), float(resize_ratio))(np.asarray(image, np.uint8)).numpy()


def bilinear_matrix(in_size: int, scale: float) -> np.ndarray:
    """(floor(in_size * scale), in_size) matrix of PyTorch's ``interpolate(mode='bilinear',
    align_corners=False, scale_factor=scale)`` along one axis (source ``(dst + 0.5) / scale
    - 0.5`` clamped at 0)."""
    out_size = int(math.floor(in_size * scale))
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) / np.float32(scale) - np.float32(0.5), 0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), 1 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def save_npz(path: str, arrays: dict) -> None:
    """np.savez to a temporary file, then renamed to ``path`` (gs://: uploaded as one
    object): no half-written output."""
    tmp = paths.staging_file(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        paths.publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------
# Datasets of the training package (k-NN, linear probe).
# --------------------------------------------------------------------------
def add_data_args(ap, default_split: str = "test", batch_size: int = 256,
                  batch_help: str = "global batch for feature extraction"):
    ap.add_argument("--source", default="fashion_mnist", choices=("fashion_mnist", "image_folder", "tfds"),
                    help="dataset kind: Debian's Fashion-MNIST IDX files, an ImageFolder root with one "
                         "sub-folder per split, or a prepared TFDS dataset")
    ap.add_argument("--path", default="/usr/share/datasets/fashion-mnist",
                    help="IDX directory (fashion_mnist) or ImageFolder root (image_folder)")
    ap.add_argument("--tfds_name", default="", help="TFDS dataset name, e.g. imagenet2012")
    ap.add_argument("--tfds_data_dir", default=None, help="TFDS data_dir holding the prepared dataset")
    ap.add_argument("--train_split", default="train",
                    help="split of the feature bank / training set; a slice such as train[:10000] takes part of it")
    ap.add_argument("--eval_split", default=default_split, help="split evaluated (slices such as test[:2000] work too)")
    ap.add_argument("--image_size", type=int, default=224,
                    help="evaluation crop size (resize shorter side to size*resize_ratio, centre crop)")
    ap.add_argument("--resize_ratio", type=float, default=256 / 224,
                    help="shorter-side resize / crop size (official 256/224; 1.0 for 28 px Fashion-MNIST)")
    ap.add_argument("--batch_size", type=int, default=batch_size, help=batch_help)


def data_config_from_args(a):
    """The training data config (``config_defaults``) with the command line's fields."""
    from dino_jax.config_defaults import base_config  # noqa: PLC0415

    c = base_config().data
    c.update(dict(source=a.source, path=a.path, tfds_name=a.tfds_name, tfds_data_dir=a.tfds_data_dir,
                  train_split=a.train_split, eval_split=a.eval_split, eval_image_size=a.image_size,
                  eval_resize_ratio=a.resize_ratio))
    return c


def iterator_features(feature_fn, params, eval_iterator, mesh=None, progress=None):
    """(features (N, D) float32, labels (N,)) for every valid example of an evaluation
    iterator (all hosts' shards gathered on every host; padding removed)."""
    import jax  # noqa: PLC0415

    feats, labels = [], []
    n_batches = len(eval_iterator)
    t0 = time.time()
    for i, batch in enumerate(eval_iterator):
        images, lab, mask = batch["image"], batch["label"], batch["mask"]
        if mesh is not None:
            from dino_jax import sharding  # noqa: PLC0415

            bsh = sharding.batch_sharding(mesh)
            out = feature_fn(params, jax.make_array_from_process_local_data(bsh, images))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils  # noqa: PLC0415

                out = multihost_utils.process_allgather(out, tiled=True)
                lab = multihost_utils.process_allgather(lab, tiled=True)
                mask = multihost_utils.process_allgather(mask, tiled=True)
        else:
            out = feature_fn(params, images)
        out = np.asarray(out)
        feats.append(out[mask])
        labels.append(np.asarray(lab)[mask])
        if progress and (i + 1) % max(1, n_batches // 10) == 0:
            progress(f"  features {i + 1}/{n_batches} batches ({(time.time() - t0):.0f}s)")
    return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


def batched_apply(fn, images: np.ndarray, batch_size: int):
    """``fn`` over ``images`` in batches of ``batch_size`` (the last one zero-padded, so
    one shape compiles); returns the concatenated numpy outputs (a tuple when ``fn``
    returns one)."""
    import jax  # noqa: PLC0415

    n = len(images)
    outs = []
    for s in range(0, n, batch_size):
        x = images[s:s + batch_size]
        m = len(x)
        if m < batch_size and n > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], x.dtype)])
        outs.append(jax.tree.map(lambda y, m=m: np.asarray(y)[:m], fn(x)))
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


def parallel_map(fn, items, num_threads: int = 0, ahead: int = 0):
    """``fn`` over ``items`` in order, computed by a pool of threads (image decoding and
    resizing release the GIL) at most ``ahead`` items ahead of the consumer, so memory
    stays bounded; ``num_threads`` 0 means one per CPU. An exception of ``fn`` is raised
    when its item is reached."""
    import collections  # noqa: PLC0415
    import concurrent.futures  # noqa: PLC0415

    num_threads = num_threads or os.cpu_count() or 1
    ahead = ahead or 2 * num_threads
    it = iter(items)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        pending = collections.deque()
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result

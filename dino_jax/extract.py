"""Backbone features of a folder of images or an ``.npz`` of images, for retrieval
and copy detection.

    python -m dino_jax.extract --checkpoint DIR --input (FOLDER | images.npz) --output F.npz
                               [--attention] [--image_size H [W]]

Writes ``F.npz`` with

  cls        (N, D) float32  the backbone output: the final-LayerNorm CLS token of
                             every image, not L2-normalised (as the official model(x))
  sizes      (N, 2) int32    the (H, W) each image had when it entered the model
  paths      (N,)   str      folder input only: file paths relative to the folder
  attention  (N, heads, H/p, W/p) float32, with --attention: the last block's
             attention of the CLS token to every patch (``get_last_selfattention``
             [:, :, 0, 1:], what visualize_attention draws). When the images do not
             all share one size the maps are stored one per image as
             ``attention/<index>`` (heads, H_i/p, W_i/p).

Inputs. A folder: every image file under it (recursively; .jpg .jpeg .png .bmp
.gif .webp), in sorted path order, read with PIL and converted to RGB. An
``.npz``: the array ``images``, either uint8 NHWC (N, H, W, 3), (N, H, W, 1) or
(N, H, W), pixel values 0..255, or float32 NHWC taken as *already normalised*
and used as is (so numbers from another pipeline can be fed unchanged).

Preprocessing, as the official code: uint8 images are divided by 255 and
normalised with the ImageNet mean and std. Without ``--image_size`` each image
is used at its own size, cropped at the bottom/right to a multiple of the
patch size (as the official visualize_attention.py). With ``--image_size S``
(or ``H W``) the evaluation transform is applied first: bicubic resize (PIL, as
torchvision) so that the image covers ``int(S * resize_ratio)`` (the shorter
side for a square crop, official 256 for 224), then a centre crop to S x S (or
H x W). Images of one size are batched together; every distinct size compiles
the model once, so pass ``--image_size`` for folders of mixed sizes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)


# --------------------------------------------------------------------------
# Reading and preprocessing (PIL / NumPy; TensorFlow stays inside dino_jax.data).
# --------------------------------------------------------------------------
def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB; one-line ValueError for anything PIL cannot decode."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    out = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for n in names:
            if n.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(dirpath, n), folder))
    return sorted(out)


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


def eval_resize_crop(image: np.ndarray, out_hw: tuple[int, int], resize_ratio: float) -> np.ndarray:
    """The evaluation transform on uint8 (H, W, 3): bicubic resize to cover
    ``int(size * resize_ratio)``, then the torchvision centre crop to ``out_hw``.
    For a square crop this is the official Resize(256, bicubic) + CenterCrop(224)."""
    from PIL import Image  # noqa: PLC0415

    th, tw = int(out_hw[0]), int(out_hw[1])
    h, w = image.shape[:2]
    if th == tw:
        image = resize_shorter(image, int(th * resize_ratio), Image.BICUBIC)
    else:
        sh, sw = int(th * resize_ratio), int(tw * resize_ratio)
        if sh / h >= sw / w:
            nh, nw = sh, max(sw, int(w * sh / h))
        else:
            nh, nw = max(sh, int(h * sw / w)), sw
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC), np.uint8)
    h, w = image.shape[:2]
    if h < th or w < tw:
        raise ValueError(f"resize ratio {resize_ratio} gives {h}x{w}, smaller than the crop {th}x{tw}")
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return image[top:top + th, left:left + tw]


def normalize_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 normalised with the ImageNet mean/std (ToTensor + Normalize)."""
    return ((image.astype(np.float32) / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def crop_to_patch_multiple(image: np.ndarray, patch: int) -> np.ndarray:
    """Drop the bottom/right rows and columns beyond a multiple of the patch size."""
    h, w = image.shape[-3], image.shape[-2]
    h2, w2 = h - h % patch, w - w % patch
    if h2 == 0 or w2 == 0:
        raise ValueError(f"image of {h}x{w} pixels is smaller than one {patch}x{patch} patch")
    return image[..., :h2, :w2, :]


def as_rgb_uint8(images: np.ndarray, what: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must be (N, H, W, 3), (N, H, W, 1) or (N, H, W); got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


class Inputs:
    """Lazily prepared model inputs: ``len``, ``sizes[i]`` (H, W) and ``get(i)`` ->
    float32 normalised (H, W, 3); ``paths`` for folder input. Images are decoded one
    batch at a time, so a large folder never sits in memory as floats."""

    def __init__(self, n, sizes, get, paths=None):
        self.n, self.sizes, self.get, self.paths = n, [tuple(int(v) for v in s) for s in sizes], get, paths

    def __len__(self):
        return self.n


def _image_header_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return h, w


def load_inputs(path: str, patch: int, image_size=None, resize_ratio: float = 256 / 224) -> Inputs:
    """The images of a folder or an .npz, preprocessed as the module docstring says."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such input: {path}")
    size = None
    if image_size:
        size = (int(image_size[0]), int(image_size[-1]))
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"--image_size {size[0]} {size[1]} is not a multiple of the patch size {patch}")

    def own(hw):  # the size an image of hw pixels enters the model with
        if size:
            return size
        h, w = hw[0] - hw[0] % patch, hw[1] - hw[1] % patch
        if h == 0 or w == 0:
            raise ValueError(f"image of {hw[0]}x{hw[1]} pixels is smaller than one {patch}x{patch} patch")
        return h, w

    def prepare(img):  # uint8 HWC -> normalised float
        img = eval_resize_crop(img, size, resize_ratio) if size else img
        return crop_to_patch_multiple(normalize_uint8(img), patch)

    if os.path.isdir(path):
        rel = list_images(path)
        if not rel:
            raise ValueError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {path}")
        full = [os.path.join(path, r) for r in rel]
        sizes = [own(_image_header_size(f)) for f in full]
        return Inputs(len(full), sizes, lambda i: prepare(read_image(full[i])), rel)
    if not path.endswith(".npz"):
        raise ValueError(f"--input must be a folder of images or an .npz file with 'images': {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - BadZipFile, pickles, truncation: one line
        raise ValueError(f"cannot read {path} as an .npz file: {str(e).splitlines()[0]}") from e
    if not hasattr(data, "files"):
        raise ValueError(f"{path} is a single .npy array, not an .npz with an 'images' array")
    with data:
        if "images" not in data.files:
            raise ValueError(f"{path} has no 'images' array (it has: {', '.join(data.files) or 'nothing'})")
        try:
            images = np.asarray(data["images"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read 'images' from {path}: {str(e).splitlines()[0]}") from e
    if len(images) == 0:
        raise ValueError(f"'images' in {path} is empty")
    if np.issubdtype(images.dtype, np.floating):
        if size:
            raise ValueError("--image_size needs uint8 images; float images are taken as already "
                             "normalised model inputs and used as they are")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"float 'images' must be normalised NHWC (N, H, W, 3); got shape {images.shape}")
        hw = own(images.shape[1:3])
        return Inputs(len(images), [hw] * len(images),
                      lambda i: images[i, :hw[0], :hw[1]].astype(np.float32))
    if images.dtype != np.uint8:
        raise ValueError(f"'images' must be uint8 (0..255) or float32 (normalised); got {images.dtype}")
    images = as_rgb_uint8(images, "'images'")
    hw = own(images.shape[1:3])
    return Inputs(len(images), [hw] * len(images), lambda i: prepare(images[i]))


# --------------------------------------------------------------------------
# Features.
# --------------------------------------------------------------------------
def make_extract_fn(model, attention: bool):
    """Jitted ``(params, images NHWC) -> (cls (B, D), cls attention (B, heads, h, w) or None)``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    p = model.patch_size

    def fn(params, x):
        v = {"params": params}
        cls = model.apply(v, x).astype(jnp.float32)
        if not attention:
            return cls, None
        att = model.apply(v, x, method="get_last_selfattention")[:, :, 0, 1:]
        att = att.reshape(x.shape[0], att.shape[1], x.shape[1] // p, x.shape[2] // p)
        return cls, att.astype(jnp.float32)

    return jax.jit(fn)


def extract(model, params, inputs: Inputs, batch_size: int = 64, attention: bool = False, progress=None):
    """(cls (N, D), list of per-image attention maps or None). Same-size images are
    batched; a size's last batch is padded so each size compiles once."""
    fn = make_extract_fn(model, attention)
    n = len(inputs)
    by_size: dict = {}
    for i in range(n):
        by_size.setdefault(inputs.sizes[i], []).append(i)
    cls = np.zeros((n, model.embed_dim), np.float32)
    att = [None] * n if attention else None
    batches = [(idx[s:s + batch_size], min(batch_size, len(idx))) for idx in by_size.values()
               for s in range(0, len(idx), batch_size)]
    t0, every, done = time.time(), max(1, len(batches) // 10), 0
    for b, (idx, full) in enumerate(batches):
        x = np.stack([inputs.get(i) for i in idx])
        if len(idx) < full:
            x = np.concatenate([x, np.zeros((full - len(idx),) + x.shape[1:], x.dtype)])
        c, a = fn(params, x)
        cls[idx] = np.asarray(c)[:len(idx)]
        if attention:
            a = np.asarray(a)
            for j, i in enumerate(idx):
                att[i] = a[j]
        done += len(idx)
        if progress and ((b + 1) % every == 0 or b + 1 == len(batches)):
            progress(f"  {b + 1}/{len(batches)} batches, {done}/{n} images ({time.time() - t0:.0f}s)")
    return cls, att


def save_npz(path: str, arrays: dict) -> None:
    """np.savez to a temporary file beside ``path``, then rename (no half-written output)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dino_jax.extract", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="params dir (convert torch2jax / export) or training workdir (its teacher backbone)")
    ap.add_argument("--input", required=True,
                    help="folder of images (recursive, sorted) or .npz with 'images' (uint8 NHWC 0..255, "
                         "or float32 NHWC already normalised)")
    ap.add_argument("--output", required=True, help="output .npz (cls, sizes, [paths], [attention])")
    ap.add_argument("--attention", action="store_true",
                    help="also write the last block's CLS-to-patch attention maps of every head")
    ap.add_argument("--image_size", type=int, nargs="+", default=None, metavar="H [W]",
                    help="apply the evaluation resize + centre crop to H x W (one value: square); "
                         "default: every image at its own size")
    ap.add_argument("--resize_ratio", type=float, default=256 / 224,
                    help="with --image_size: resize to cover size*ratio before the centre crop "
                         "(official 256/224; 1.0 resizes straight to the crop size)")
    ap.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype (float32 reproduces the official features to 1e-4)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from PIL import UnidentifiedImageError  # noqa: PLC0415

    from dino_jax import checkpoint  # noqa: PLC0415

    try:
        if a.image_size is not None and (len(a.image_size) > 2 or min(a.image_size) <= 0):
            raise ValueError(f"--image_size takes one or two positive sizes, got {a.image_size}")
        if a.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {a.batch_size}")
        import jax.numpy as jnp  # noqa: PLC0415

        model, params = checkpoint.load_backbone(a.checkpoint, dtype=jnp.dtype(a.dtype))
        inputs = load_inputs(a.input, model.patch_size, a.image_size, a.resize_ratio)
        sizes = np.array(inputs.sizes, np.int32).reshape(-1, 2)
        print(f"{len(inputs)} images, {len(set(inputs.sizes))} distinct size(s); "
              f"backbone width {model.embed_dim}, patch {model.patch_size}", flush=True)
        cls, att = extract(model, params, inputs, a.batch_size, a.attention,
                           progress=lambda m: print(m, flush=True))
        out = {"cls": cls, "sizes": sizes}
        if inputs.paths is not None:
            out["paths"] = np.array(inputs.paths)
        if a.attention:
            if len({m.shape for m in att}) == 1:
                out["attention"] = np.stack(att)
            else:
                out.update({f"attention/{i}": m for i, m in enumerate(att)})
        save_npz(a.output, out)
    except (checkpoint.CheckpointError, FileNotFoundError, UnidentifiedImageError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.output}: cls {cls.shape}" + (", attention" if a.attention else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crop statistics: dino_jax's multi-crop augmentation against the official one, image by image.

    python benchmarks/crop_statistics.py --dino_dir DINO_CHECKOUT --torch_python TORCH_VENV/bin/python

Draws ``--draws`` multi-crop sets (2 global + the recipe's local crops) of each of
the first ``--images`` Fashion-MNIST training images twice: with dino_jax's tf.data
augmentation (``configs/fmnist_nano.py``'s crops; one stateless seed per draw) and
with the official anchor's ``DataAugmentationDINO`` (``official_fmnist.py``:
torchvision's RandomResizedCrop, ColorJitter, RandomGrayscale and the official
GaussianBlur / Solarization classes on PIL images), run in ``--torch_python``.

For every crop it measures pixel statistics of the de-normalised intensity in [0, 1]:
mean, standard deviation, fraction of black (< 0.02) and white (> 0.98) pixels, edge
energy (mean |dx| + |dy|), centre minus border mean, and for each image how much its two
global views differ (|mean(g1) - mean(g2)|). Each statistic is averaged over the draws of
an image, and the table gives the per-image paired difference dino_jax - official with
its standard error; differences beyond 3 standard errors are marked. The same images on
both sides remove the image-to-image spread, so what is left is the augmentation's.
A wrong crop-scale range, probability or factor range moves these by many standard
errors (the crop-area distribution alone moves the mean, the edge energy and the
centre contrast); float pixels between colour ops (dino_jax's documented deviation,
``data.pil_ops`` turns it off) move the black/white fractions by a few thousandths.

Prints the table; the last line is a JSON object. ~2 min on 2 cores for 2048 x 4 draws.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dino_jax.data.files import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402  (no TF/JAX import: both sides)

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)
STATS = ("mean", "std", "black", "white", "edges", "centre-border")


def crop_stats(crops: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) normalised crops -> (..., len(STATS)) statistics of the intensity."""
    x = crops[..., 0] * STD[0] + MEAN[0]   # gray images: every channel carries the intensity
    h, w = x.shape[-2:]
    edges = np.abs(np.diff(x, axis=-1)).mean((-2, -1)) + np.abs(np.diff(x, axis=-2)).mean((-2, -1))
    inner = x[..., h // 4: h - h // 4, w // 4: w - w // 4]
    border = (x.sum((-2, -1)) - inner.sum((-2, -1))) / (h * w - inner.shape[-2] * inner.shape[-1])
    return np.stack([x.mean((-2, -1)), x.std((-2, -1)), (x < 0.02).mean((-2, -1)),
                     (x > 0.98).mean((-2, -1)), edges, inner.mean((-2, -1)) - border], axis=-1)


def summarize_draws(global_crops, local_crops):
    """Per-draw statistics: {'global1', 'global2', 'local': (draws, S)}, 'views': (draws,)."""
    g = crop_stats(global_crops)                                   # (D, 2, S)
    return {"global1": g[:, 0], "global2": g[:, 1], "local": crop_stats(local_crops).mean(1),
            "views": np.abs(g[:, 0, 0] - g[:, 1, 0])}


# --------------------------------------------------------------------------
# The two sides. The official one runs in the torch interpreter (this file, --_official).
# --------------------------------------------------------------------------
def official_side(script, dino_dir, images, draws, seed, out):
    import random  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    anchor = __import__(os.path.splitext(os.path.basename(script))[0])
    _, _, utils = anchor.load_official(dino_dir)
    torch.manual_seed(seed)
    random.seed(seed)
    xtr = anchor.load()[0]
    aug = anchor.Aug(utils, 28, 12, 6)
    g, loc = [], []
    for p in range(images * draws):   # draw p of image p % images, as dino_jax's side
        crops = aug(Image.fromarray(xtr[p % images]).convert("RGB"))
        g.append(torch.stack(crops[:2]).permute(0, 2, 3, 1).numpy())
        loc.append(torch.stack(crops[2:]).permute(0, 2, 3, 1).numpy())
    np.savez(out, **summarize_draws(np.stack(g), np.stack(loc)))


def dino_jax_side(config_path, images, draws, seed, pil_ops=False):
    from dino_jax.config_defaults import sibling_config  # noqa: PLC0415
    from dino_jax.data import augment  # noqa: PLC0415
    from dino_jax.data.sources import make_source  # noqa: PLC0415
    from dino_jax.data.tfutil import tf  # noqa: PLC0415

    config = sibling_config(os.path.abspath(config_path), os.path.basename(config_path))
    config.data.pil_ops = bool(pil_ops) or bool(config.data.pil_ops)
    src = make_source(config.data, "train")
    cfg = augment.MultiCropConfig.from_data_config(config.data)

    def draw(p):
        return augment.multi_crop(src.load(p % images)[0], tf.stack([tf.constant(seed, tf.int64), p]), cfg)

    ds = tf.data.Dataset.range(images * draws).map(draw, num_parallel_calls=tf.data.AUTOTUNE,
                                                     deterministic=True).batch(256)
    g, loc = [], []
    for b in ds.as_numpy_iterator():
        g.append(b["global_crops"])
        loc.append(b["local_crops"])
    return config, summarize_draws(np.concatenate(g), np.concatenate(loc))


def compare(ours, official, images, draws):
    """Rows (group, statistic, dino_jax mean, official mean, paired difference, SE)."""
    rows = []

    def per_image(a):  # draw p is image p % images
        return a.reshape(draws, images, *a.shape[1:]).mean(0)

    for group in ("global1", "global2", "local"):
        for j, name in enumerate(STATS):
            a, b = per_image(ours[group][:, j]), per_image(official[group][:, j])
            d = a - b
            rows.append((group, name, float(a.mean()), float(b.mean()), float(d.mean()),
                         float(d.std(ddof=1) / np.sqrt(images))))
    a, b = per_image(ours["views"]), per_image(official["views"])
    rows.append(("views", "|g1 - g2| mean", float(a.mean()), float(b.mean()), float((a - b).mean()),
                 float((a - b).std(ddof=1) / np.sqrt(images))))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dino_dir", help="checkout of facebookresearch/dino (the official side)")
    ap.add_argument("--torch_python", default=sys.executable, help="python with torch and torchvision")
    ap.add_argument("--official_script",
                    default=os.path.join(os.path.dirname(REPO), "shared", "tools", "official_fmnist.py"),
                    help="the official Fashion-MNIST anchor (its Aug class is the official augmentation)")
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "fmnist_nano.py"),
                    help="dino_jax config whose data section makes the crops (the anchor's: fmnist_nano)")
    ap.add_argument("--images", type=int, default=2048, help="first N training images")
    ap.add_argument("--draws", type=int, default=4, help="multi-crop draws per image on each side")
    ap.add_argument("--seed", type=int, default=0, help="augmentation seed of both sides")
    ap.add_argument("--pil_ops", action="store_true",
                    help="dino_jax side with data.pil_ops=true (PIL's uint8 photometric ops on its decisions)")
    ap.add_argument("--_official", metavar="OUT", help=argparse.SUPPRESS)  # internal: the torch side
    a = ap.parse_args(argv)
    if a._official:
        official_side(a.official_script, a.dino_dir, a.images, a.draws, a.seed, a._official)
        return 0
    if not a.dino_dir or not os.path.isdir(a.dino_dir):
        print("error: --dino_dir must be a checkout of facebookresearch/dino", file=sys.stderr)
        return 1
    if not os.path.isfile(a.official_script):
        print(f"error: no official anchor script at {a.official_script} (--official_script)", file=sys.stderr)
        return 1
    if a.images < 2 or a.draws < 1:
        print("error: --images must be >= 2 and --draws >= 1", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "official.npz")
        cmd = [a.torch_python, os.path.abspath(__file__), "--_official", out, "--dino_dir", a.dino_dir,
               "--official_script", a.official_script, "--images", str(a.images), "--draws", str(a.draws),
               "--seed", str(a.seed)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        config, ours = dino_jax_side(a.config, a.images, a.draws, a.seed, a.pil_ops)   # both sides at once
        _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"error: the official side failed: {err.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        official = dict(np.load(out))
    rows = compare(ours, official, a.images, a.draws)
    d = config.data
    print(f"{a.images} images x {a.draws} draws; crops 2x{d.global_crop_size} (scale {tuple(d.global_crops_scale)}) "
          f"+ {d.num_local_crops}x{d.local_crop_size} (scale {tuple(d.local_crops_scale)}), blur sigma "
          f"{tuple(d.blur_sigma)}, pil_ops {bool(d.pil_ops)}")
    print(f"{'crops':8} {'statistic':16} {'dino_jax':>9} {'official':>9} {'paired diff':>12} {'SE':>7}")
    for group, name, m_ours, m_off, diff, se in rows:
        flag = "  <-- beyond 3 SE" if abs(diff) > 3 * se else ""
        print(f"{group:8} {name:16} {m_ours:9.4f} {m_off:9.4f} {diff:+12.4f} {se:7.4f}{flag}")
    beyond = [f"{g}/{n}" for g, n, _, _, diff, se in rows if abs(diff) > 3 * se]
    print(json.dumps({"images": a.images, "draws": a.draws, "beyond_3_se": beyond,
                      "rows": [dict(zip(("crops", "statistic", "dino_jax", "official", "difference", "se"), r))
                               for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Copy detection on Copydays, following the official eval_copy_detection.py.

    python -m dino_jax.eval.copy_detection --checkpoint C --data_path COPYDAYS
        [--whitening_path W] [--distractors_path DIS] [--imsize 320]

Layout (the INRIA Copydays release, https://lear.inrialpes.fr/~jegou/data.php#copydays)::

    COPYDAYS/original/*.jpg            the database (157 images)
    COPYDAYS/strong/*.jpg              strong attacks (229); the first 4 characters of a
                                       name give its original
    COPYDAYS/jpegqual/<q>/*.jpg        optional: q in 3 5 8 10 15 20 30 50 75, one per original
    COPYDAYS/crops/<c>/*.jpg           optional: c in 10 15 20 30 40 50 60 70 80, one per original

Every query block present is evaluated (the official script needs all of
them). Protocol (official): images resized to imsize x imsize (bicubic, aspect
not kept), normalised with the ImageNet mean/std; the feature is the last
block's normalised CLS token concatenated with the GeM (p = 4) pooling of its
patch tokens clamped at 1e-6. With ``--whitening_path`` (official: 20k YFCC100M
images) the features are centred on that set's mean and PCA-whitened (power
0.5) with its uncentred second-moment matrix, as the official code does; with
``--distractors_path`` (official: 10k YFCC100M images) those images join the
database. Features are L2-normalised, each query retrieves its top 20 by
cosine similarity, and the average precision of each block (percent, the
official ``score_ap_from_ranks_1``) is reported; ``copydays_strong_map`` is the
number the paper quotes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from dino_jax import paths
from dino_jax.eval import base, common, features
from dino_jax.eval.common import EvalError

BLOCKS = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
          + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
# The official is_image_file extensions for whitening and distractor folders.
OTHER_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")
TOPK = 20


def score_ap_from_ranks(ranks, nres: int) -> float:
    """Average precision of one search from the sorted ranks of its true positives."""
    ap = 0.0
    recall_step = 1.0 / nres
    for ntp, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else ntp / float(rank)
        precision_1 = (ntp + 1) / float(rank + 1)
        ap += (precision_1 + precision_0) * recall_step / 2.0
    return ap


def block_map(ids: np.ndarray, positives: list) -> float:
    """Mean AP (fraction) of the queries whose retrieved database ids are the rows of ``ids``."""
    total = 0.0
    for qno, line in enumerate(ids):
        ranks = [rank for rank, b in enumerate(line) if b in positives[qno]]
        total += score_ap_from_ranks(ranks, len(positives[qno]))
    return total / len(ids)


def block_files(data_path: str, block: str) -> list[str]:
    d = paths.join(data_path, block)
    return [paths.join(d, f) for f in paths.listdir(d) if f.endswith(".jpg")]


def other_files(folder: str) -> list[str]:
    return [paths.join(folder, s) for s in paths.listdir(folder)
            if s.split(".")[-1] in OTHER_EXTENSIONS]


def read_layout(data_path: str) -> dict:
    """{block: files} of the blocks present (original and strong required)."""
    for b in ("original", "strong"):
        common.require(paths.join(data_path, b), "Copydays folder")
    blocks = {b: block_files(data_path, b) for b in BLOCKS if paths.isdir(paths.join(data_path, b))}
    if not blocks["original"]:
        raise EvalError(f"no .jpg images in {os.path.join(data_path, 'original')}")
    n = len(blocks["original"])
    for b, files in blocks.items():
        if not files:
            raise EvalError(f"no .jpg images in {os.path.join(data_path, b)}")
        if b not in ("original", "strong") and len(files) != n:
            raise EvalError(f"{os.path.join(data_path, b)} has {len(files)} images, expected one per "
                            f"original ({n})")
    return blocks


def positives_of(block: str, blocks: dict) -> list:
    """Database indices each query of ``block`` should retrieve."""
    if block != "strong":
        return [[i] for i in range(len(blocks[block]))]
    originals = [os.path.basename(f) for f in blocks["original"]]
    out = []
    for f in blocks["strong"]:
        pos = [j for j, name in enumerate(originals) if name[:4] == os.path.basename(f)[:4]]
        if not pos:
            raise EvalError(f"strong image {f} matches no original (the first 4 characters of the names)")
        out.append(pos)
    return out


@functools.lru_cache(maxsize=8)
def _gem_fn(model):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    @jax.jit
    def fn(params, x):
        cls, patches = features.forward(model, params, x, "tokens")
        gem = jnp.mean(jnp.maximum(patches, 1e-6) ** 4, axis=1) ** (1.0 / 4)
        return jnp.concatenate([cls, gem], axis=1)

    return fn


def gem_features(model, params, paths: list, imsize: int, batch_size: int = 16) -> np.ndarray:
    """(N, 2D) float32: normalised CLS token ++ GeM(p=4) of the patch tokens, official transform."""
    from PIL import Image  # noqa: PLC0415

    fn = _gem_fn(model)

    def load(p):
        im = common.open_image(p).resize((imsize, imsize), Image.BICUBIC)
        return common.normalize_uint8(np.asarray(im, np.uint8))

    def run(xs):  # one batch, zero-padded to batch_size when there is more than one batch
        m = len(xs)
        if m < batch_size and len(paths) > batch_size:
            xs = xs + [np.zeros_like(xs[0])] * (batch_size - m)
        return np.asarray(fn(params, np.stack(xs)))[:m]

    # Images are decoded and resized by a pool of threads, a few batches ahead of the model.
    out, batch = [], []
    for x in common.parallel_map(load, paths, ahead=2 * batch_size):
        batch.append(x)
        if len(batch) == batch_size:
            out.append(run(batch))
            batch = []
    if batch:
        out.append(run(batch))
    return np.concatenate(out).astype(np.float32)


def pca_whitening(feats: np.ndarray, whit: float = 0.5):
    """(mean, projection) of the official utils.PCA trained on ``feats``' uncentred
    second-moment matrix (eigenvalues floored at 1e-5 of the largest, all dims kept)."""
    mean = feats.mean(axis=0)
    cov = (feats.T @ feats) / feats.shape[0]
    d, v = np.linalg.eigh(cov)
    eps = d.max() * 1e-5
    d[d < eps] = eps
    idx = np.argsort(d)[::-1][:feats.shape[1]]
    d, v = d[idx], v[:, idx]
    return mean, np.dot(np.diag(1.0 / d ** whit), v.T)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search(queries: np.ndarray, database: np.ndarray, whitening=None, topk: int = TOPK) -> np.ndarray:
    """(num_queries, min(topk, db)) database ids by decreasing cosine similarity after the
    optional whitening (mean, projection)."""
    if whitening is not None:
        mean, proj = whitening
        queries = ((queries - mean) @ proj.T).astype(np.float32)
        database = ((database - mean) @ proj.T).astype(np.float32)
    sim = l2n(queries) @ l2n(database).T
    return np.argsort(-sim, axis=1, kind="stable")[:, :min(topk, sim.shape[1])]


def evaluate(backbone, params, data_path: str, whitening_path: str = "", distractors_path: str = "",
             imsize: int = 320, batch_size: int = 16, progress=None) -> dict:
    """{'copydays_<block>_map': percent} for every query block present (``copydays_strong_map``
    is the paper's number)."""
    blocks = read_layout(data_path)
    for p, what in ((whitening_path, "whitening folder"), (distractors_path, "distractors folder")):
        if p and not paths.isdir(p):
            raise EvalError(f"missing {what}: {p}")
    feats = {b: gem_features(backbone, params, files, imsize, batch_size) for b, files in blocks.items()}
    database = feats["original"]
    if distractors_path:
        dis = other_files(distractors_path)
        if progress:
            progress(f"{len(dis)} distractors join the database")
        database = np.concatenate([database, gem_features(backbone, params, dis, imsize, batch_size)])
    whitening = None
    if whitening_path:
        wf = other_files(whitening_path)
        if not wf:
            raise EvalError(f"no images in the whitening folder {whitening_path}")
        whitening = pca_whitening(gem_features(backbone, params, wf, imsize, batch_size).astype(np.float64))
    out = {}
    for b in blocks:
        ids = search(feats[b], database, whitening)
        out[f"copydays_{b.replace('/', '_')}_map"] = 100.0 * block_map(ids, positives_of(b, blocks))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = common.tool_parser("python -m dino_jax.eval.copy_detection", __doc__)
    ap.add_argument("--data_path", required=True, help="Copydays root (original/, strong/, [jpegqual/, crops/])")
    ap.add_argument("--whitening_path", default="",
                    help="folder of images to learn the PCA whitening on (official: 20k YFCC100M images); "
                         "'' = no whitening")
    ap.add_argument("--distractors_path", default="",
                    help="folder of distractor images added to the database (official: 10k YFCC100M)")
    ap.add_argument("--imsize", type=int, default=320, help="square input size (official 320)")
    ap.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body():
        if a.imsize <= 0 or a.batch_size <= 0:
            raise EvalError("--imsize and --batch_size must be positive")
        read_layout(a.data_path)  # a bad layout fails before the model loads
        model, params = common.load_backbone(a.checkpoint, a.dtype)
        if a.imsize % model.patch_size:
            raise EvalError(f"--imsize {a.imsize} is not a multiple of the patch size {model.patch_size}")
        settings = dict(data_path=a.data_path, whitening_path=a.whitening_path,
                        distractors_path=a.distractors_path, imsize=a.imsize, batch_size=a.batch_size)
        res = base.FunctionEvaluator("copy_detection", evaluate, settings,
                                     progress=lambda m: print(m, flush=True)).run(model, params)
        for k, v in res.items():
            print(f"eval on {k[len('copydays_'):-len('_map')]} mAP={v / 100:.3f}")
        print(json.dumps(res))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

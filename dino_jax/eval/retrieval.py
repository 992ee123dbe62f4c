"""Image retrieval on revisited Oxford and Paris, following the official
eval_image_retrieval.py.

    python -m dino_jax.eval.retrieval --checkpoint C --data_path D --dataset roxford5k|rparis6k
                                      [--imsize 224] [--multiscale]

Layout (as distributed by the revisited benchmark, Radenovic et al. 2018)::

    D/roxford5k/gnd_roxford5k.pkl      {'imlist', 'qimlist', 'gnd': [{'easy', 'hard', 'junk', 'bbx'}, ...]}
    D/roxford5k/jpg/<name>.jpg         every name of imlist and qimlist
    D/rparis6k/gnd_rparis6k.pkl, D/rparis6k/jpg/...

Protocol (official): each image is read as RGB and shrunk with PIL's
``thumbnail((imsize, imsize), LANCZOS)`` (aspect kept, never enlarged),
normalised with the ImageNet mean/std and fed at its own size (the ViT's patch
embedding ignores the bottom/right pixels beyond a patch multiple, so they are
cropped); the feature is the CLS token, L2-normalised. ``--multiscale``
averages the CLS of the image at scales 1, 1/sqrt(2), 1/2 (PyTorch bilinear
``interpolate(scale_factor=s)`` of the normalised image) and divides by the
norm. Query images are used whole (the official DINO script does not crop
them to their bounding boxes). Database images are ranked by cosine
similarity; mAP and mean precision at 1, 5, 10 are reported (percent) for the
Medium (positives easy + hard, junk ignored) and Hard (positives hard; easy
and junk ignored) protocols, with the revisited benchmark's ``compute_map``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys

import numpy as np

from dino_jax import paths
from dino_jax.eval import base, common, features
from dino_jax.eval.common import EvalError

DATASETS = ("roxford5k", "rparis6k")
KAPPAS = (1, 5, 10)
SCALES = (1.0, 1 / 2 ** (1 / 2), 1 / 2)


# --------------------------------------------------------------------------
# The revisited Oxford/Paris metric.
# --------------------------------------------------------------------------
def compute_ap(ranks, nres: int) -> float:
    """Average precision from the 0-based ranks of the positives (junk already removed),
    by the trapezoids of the precision-recall curve, as the revisited benchmark."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def compute_map(ranks: np.ndarray, gnd: list, kappas=KAPPAS):
    """(mAP, per-query AP, mean precision at kappas, per-query precision at kappas) for
    ``ranks`` (db_size, num_queries): column q lists database indices best first.
    ``gnd[q]`` has 'ok' and 'junk' index lists; queries without positives are left out
    of the means (their entries are NaN)."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total_ap, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"])
        if ok.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        junk = np.asarray(gnd[i].get("junk", []))
        is_pos = np.isin(ranks[:, i], ok)
        is_junk = np.isin(ranks[:, i], junk)
        pos = np.flatnonzero(is_pos)
        # Each positive moves up by the number of junk images ranked before it.
        pos = pos - np.cumsum(is_junk)[pos] + is_junk[pos]
        ap = compute_ap(pos, len(ok))
        total_ap += ap
        aps[i] = ap
        pos = pos + 1
        for j, k in enumerate(kappas):
            kq = min(max(pos), k)
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return total_ap / (nq - nempty), aps, pr / (nq - nempty), prs


def protocol_gnd(gnd: list, protocol: str) -> list:
    """The 'ok'/'junk' lists of the Medium or Hard protocol from easy/hard/junk."""
    if protocol == "medium":
        return [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.concatenate([g["junk"]])} for g in gnd]
    if protocol == "hard":
        return [{"ok": np.concatenate([g["hard"]]), "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
    raise ValueError(f"unknown protocol {protocol!r}")


def scores(ranks: np.ndarray, gnd: list, prefix: str = "") -> dict:
    """mAP and mP@k (percent) of the Medium and Hard protocols as named numbers."""
    out = {}
    for protocol in ("medium", "hard"):
        m, _, pr, _ = compute_map(ranks, protocol_gnd(gnd, protocol), KAPPAS)
        out[f"{prefix}map_{protocol}"] = 100.0 * float(m)
        out.update({f"{prefix}mp@{k}_{protocol}": 100.0 * float(p) for k, p in zip(KAPPAS, pr)})
    return out


def rank_database(db_feats: np.ndarray, query_feats: np.ndarray) -> np.ndarray:
    """(db_size, num_queries) database indices by decreasing cosine similarity."""
    sim = db_feats @ query_feats.T
    return np.argsort(-sim, axis=0, kind="stable")


# --------------------------------------------------------------------------
# Data and features.
# --------------------------------------------------------------------------
def read_dataset(data_path: str, dataset: str) -> dict:
    """The ground-truth pickle of ``data_path/dataset`` with 'imlist', 'qimlist', 'gnd',
    checked against the image folder."""
    if dataset not in DATASETS:
        raise EvalError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    root = paths.join(data_path, dataset)
    gnd_path = common.require(paths.join(root, f"gnd_{dataset}.pkl"), "ground-truth file")
    try:
        cfg = pickle.loads(paths.read_bytes(gnd_path))
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise EvalError(f"cannot read {gnd_path}: {common.error_line(e)}") from e
    if not isinstance(cfg, dict) or any(k not in cfg for k in ("imlist", "qimlist", "gnd")):
        raise EvalError(f"{gnd_path} is not a revisited Oxford/Paris ground truth (needs imlist, qimlist, gnd)")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise EvalError(f"{gnd_path}: {len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries")
    for i, g in enumerate(cfg["gnd"]):
        if not all(k in g for k in ("easy", "hard", "junk")):
            raise EvalError(f"{gnd_path}: ground truth of query {i} lacks easy/hard/junk")
    img_dir = common.require(paths.join(root, "jpg"), "image folder")
    cfg["db_paths"] = [paths.join(img_dir, n + ".jpg") for n in cfg["imlist"]]
    cfg["query_paths"] = [paths.join(img_dir, n + ".jpg") for n in cfg["qimlist"]]
    for p in cfg["db_paths"] + cfg["query_paths"]:
        common.require(p, "image")
    return cfg


def thumbnail(path: str, imsize: int) -> np.ndarray:
    """uint8 RGB image shrunk to fit imsize x imsize (PIL thumbnail, Lanczos), as the official loader."""
    from PIL import Image  # noqa: PLC0415

    im = common.open_image(path)
    im.thumbnail((imsize, imsize), Image.LANCZOS)
    return np.asarray(im, np.uint8)


def rescale(x: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear rescale of a float (H, W, C) image by ``scale`` (PyTorch semantics), one
    axis at a time (two float32 matrix products)."""
    if scale == 1.0:
        return x
    mh, mw = common.bilinear_matrix(x.shape[0], scale), common.bilinear_matrix(x.shape[1], scale)
    x = np.tensordot(mh, np.asarray(x, np.float32), axes=(1, 0))   # (h', W, C)
    return np.matmul(mw, x).astype(np.float32)                      # (h', w', C)


def _padded_batch(m: int, batch_size: int) -> int:
    """Rows a bucket of ``m`` images is padded to: the batch size, or the power of two
    covering a smaller remainder (a few compiled shapes per image size)."""
    return min(batch_size, 1 << (m - 1).bit_length())


def image_features(model, params, images, multiscale: bool = False, batch_size: int = 32,
                   progress=None) -> np.ndarray:
    """L2-normalised CLS features (N, D) of uint8 images of any sizes, given as a list or
    any iterable (read one at a time: only the images waiting in a batch are in memory).
    Each (scale, size) has its own bucket, run when it holds ``batch_size`` images and
    at the end (batch padded with zeros, the pad rows dropped)."""
    p = model.patch_size
    fn = features.feature_fn(model, "cls")
    scales = SCALES if multiscale else (1.0,)
    rows: list = []  # float64 sums of the CLS over the scales, one per image
    buckets: dict = {}  # input shape -> ([image index], [normalised input])

    def flush(shape):
        idx, xs = buckets.pop(shape)
        full = _padded_batch(len(xs), batch_size)
        x = np.stack(xs + [np.zeros_like(xs[0])] * (full - len(xs)))
        cls = np.asarray(fn(params, x))[:len(idx)]
        for i, c in zip(idx, cls):
            rows[i] += c

    for i, im in enumerate(images):
        rows.append(np.zeros(model.embed_dim, np.float64))
        x0 = common.normalize_uint8(im)
        for s in scales:
            x = common.crop_to_patch_multiple(rescale(x0, s), p)
            b = buckets.setdefault(x.shape, ([], []))
            b[0].append(i)
            b[1].append(x)
            if len(b[0]) == batch_size:
                flush(x.shape)
        if progress and (i + 1) % 100 == 0:
            progress(f"  {i + 1} images")
    for shape in list(buckets):
        flush(shape)
    if not rows:
        return np.zeros((0, model.embed_dim), np.float32)
    total = np.stack(rows)
    if multiscale:
        total /= len(scales)
        total /= np.linalg.norm(total, axis=1, keepdims=True)  # official: v /= v.norm()
    feats = total.astype(np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def evaluate(backbone, params, data_path: str, dataset: str = "roxford5k", imsize: int = 224,
             multiscale: bool = False, batch_size: int = 32, progress=None) -> dict:
    """{'<dataset>_map_medium', '<dataset>_map_hard', '<dataset>_mp@{1,5,10}_{medium,hard}'} in percent.
    Database and query images stream through one pass (decoded by a pool of threads), so
    images of one size share batches and compiled shapes."""
    cfg = read_dataset(data_path, dataset)
    if progress:
        progress(f"{dataset}: {len(cfg['db_paths'])} database / {len(cfg['query_paths'])} query images")
    paths = cfg["db_paths"] + cfg["query_paths"]
    images = common.parallel_map(lambda path: thumbnail(path, imsize), paths)
    feats = image_features(backbone, params, images, multiscale, batch_size, progress)
    n_db = len(cfg["db_paths"])
    return scores(rank_database(feats[:n_db], feats[n_db:]), cfg["gnd"], prefix=f"{dataset}_")


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = common.tool_parser("python -m dino_jax.eval.retrieval", __doc__)
    ap.add_argument("--data_path", required=True,
                    help="folder holding roxford5k/ and/or rparis6k/ (jpg/ + gnd_<dataset>.pkl each)")
    ap.add_argument("--dataset", default="roxford5k", choices=DATASETS, help="benchmark to evaluate")
    ap.add_argument("--imsize", type=int, default=224,
                    help="images are shrunk to fit imsize x imsize, aspect kept (official default 224)")
    ap.add_argument("--multiscale", action="store_true",
                    help="average the features at scales 1, 1/sqrt(2), 1/2 (official option)")
    ap.add_argument("--batch_size", type=int, default=32,
                    help="images of one size per forward pass (official: 1; the results do not depend on it)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body():
        if a.imsize <= 0 or a.batch_size <= 0:
            raise EvalError("--imsize and --batch_size must be positive")
        read_dataset(a.data_path, a.dataset)  # a bad layout fails before the model loads
        model, params = common.load_backbone(a.checkpoint, a.dtype)
        settings = dict(data_path=a.data_path, dataset=a.dataset, imsize=a.imsize, multiscale=a.multiscale,
                        batch_size=a.batch_size)
        res = base.FunctionEvaluator("retrieval", evaluate, settings,
                                     progress=lambda m: print(m, flush=True)).run(model, params)
        d = a.dataset
        print(f">> {d}: mAP M: {res[f'{d}_map_medium']:.2f}, H: {res[f'{d}_map_hard']:.2f}")
        print(f">> {d}: mP@k{list(KAPPAS)} M: {[round(res[f'{d}_mp@{k}_medium'], 2) for k in KAPPAS]}, "
              f"H: {[round(res[f'{d}_mp@{k}_hard'], 2) for k in KAPPAS]}")
        print(json.dumps(res))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""DAVIS-2017 video object segmentation by label propagation, following the official
eval_video_segmentation.py, plus the DAVIS J (region IoU) and F (boundary)
measures of the written masks.

    python -m dino_jax.eval.video_segmentation --checkpoint C --data_path DAVIS --output_dir O
        [--n_last_frames 7] [--size_mask_neighborhood 12] [--topk 5] [--scale_size 480]

Layout (DAVIS-2017 trainval 480p, https://davischallenge.org/davis2017/code.html)::

    DAVIS/ImageSets/2017/val.txt                  one video name a line
    DAVIS/JPEGImages/480p/<video>/00000.jpg ...   the frames
    DAVIS/Annotations/480p/<video>/00000.png ...  indexed PNGs (0 background, 1..K objects);
                                                  the first is the input, the others score J&F

Propagation (official): frames read as RGB, resized so the shorter side is
``scale_size`` and the longer one a multiple of 64 (bilinear, as cv2.resize),
normalised with mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225) (the
official values); the features are the last block's normalised patch tokens.
Each frame's labels are propagated from the first frame and the
``n_last_frames`` previous ones: affinities exp(cos / 0.1) restricted to a
(2 * size_mask_neighborhood + 1)^2 patch neighbourhood, only each target
patch's top-k sources kept, normalised, labels averaged; the soft labels are
upsampled bilinearly by the patch size, min-max normalised per object, arg-maxed,
resized to the frame (nearest) and written as indexed PNGs in the DAVIS palette
to ``OUTPUT/<video>/<frame>.png``. Propagation runs on device (jit).

Scores (the DAVIS-2017 semi-supervised protocol, computed here so no other
package is needed): for each object of each video, J = mean region IoU and
F = mean boundary F-measure (boundaries matched within ceil(0.008 * image
diagonal) pixels, a disk dilation), over the frames except the first and the
last; ``J&F`` is the mean of the object means of J and F.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import sys
import tempfile

import numpy as np

from dino_jax import paths
from dino_jax.eval import base, common, features
from dino_jax.eval.common import EvalError
from dino_jax.models.head import l2_normalize

MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.228, 0.224, 0.225), np.float32)  # the official color_normalize values (0.228, not 0.229)


def davis_palette() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC / DAVIS colour map (index bits spread over R, G, B)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------
def target_size(h: int, w: int, scale_size: int) -> tuple[int, int]:
    """(th, tw) of the official read_frame: shorter side scale_size, the other a multiple of 64."""
    if h > w:
        tw = scale_size
        th = int(((tw * h) / w // 64) * 64)
    else:
        th = scale_size
        tw = int(((th * w) / h // 64) * 64)
    return th, tw


def _linear_taps(in_size: int, out_size: int):
    """(i0, i1, lam) of cv2.resize INTER_LINEAR along one axis (half-pixel centres, clamped):
    output ``j`` is ``(1 - lam[j]) * x[i0[j]] + lam[j] * x[i1[j]]``."""
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    i0 = np.floor(src).astype(np.int64)
    lam = src - i0
    i0c, i1c = np.clip(i0, 0, in_size - 1), np.clip(i0 + 1, 0, in_size - 1)
    lam = np.where(i0 < 0, 0.0, lam)
    return i0c, i1c, lam


def _linear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) dense form of :func:`_linear_taps` (the reference the tests check against)."""
    i0, i1, lam = _linear_taps(in_size, out_size)
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), i0), 1 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def resize_linear(img: np.ndarray, th: int, tw: int) -> np.ndarray:
    """cv2's bilinear resize of a (H, W, C) image in float64, one axis at a time (two taps
    per output pixel), rounded to uint8."""
    x = img.astype(np.float64)
    for axis, out in ((0, th), (1, tw)):
        if x.shape[axis] != out:
            i0, i1, lam = _linear_taps(x.shape[axis], out)
            lam = lam.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
            x = np.take(x, i0, axis=axis) * (1 - lam) + np.take(x, i1, axis=axis) * lam
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def read_frame(path: str, scale_size: int = 480):
    """(normalised float32 (th, tw, 3), original h, original w). The resize is cv2's
    bilinear in float arithmetic rounded to uint8 (cv2 uses 11-bit fixed point: a pixel
    may differ by one level); frames already at the target size are not resampled."""
    img = common.read_image(path)
    h, w = img.shape[:2]
    th, tw = target_size(h, w, scale_size)
    if (th, tw) != (h, w):
        img = resize_linear(img, th, tw)
    return ((img.astype(np.float32) / 255.0) - MEAN) / STD, h, w


def read_seg(path: str, patch: int, scale_size: int = 480):
    """(one-hot (C, th/p, tw/p) float32 of the first annotation, the annotation (H, W) uint8)."""
    from PIL import Image  # noqa: PLC0415

    if not paths.isfile(path):
        raise EvalError(f"missing annotation: {path}")
    try:
        with Image.open(paths.readable(path)) as im:
            seg = im.copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalError(f"cannot read annotation {path}: {common.error_line(e)}") from e
    if seg.mode not in ("P", "L"):
        raise EvalError(f"annotation {path} is not an indexed (palette) PNG (mode {seg.mode})")
    w, h = seg.size
    th, tw = target_size(h, w, scale_size)
    small = np.asarray(seg.resize((tw // patch, th // patch), 0), np.int64)
    n = int(small.max()) + 1
    onehot = (small[None] == np.arange(n)[:, None, None]).astype(np.float32)
    return onehot, np.asarray(seg, np.uint8)


def read_davis(data_path: str, max_videos: int = 0) -> list:
    """[(video, frame paths, annotation dir)] of ImageSets/2017/val.txt."""
    lst = common.require(paths.join(data_path, "ImageSets", "2017", "val.txt"), "video list")
    videos = [v.strip() for v in paths.read_text(lst).splitlines() if v.strip()]
    if not videos:
        raise EvalError(f"{lst} names no video")
    if max_videos:
        videos = videos[:max_videos]
    out = []
    for v in videos:
        vdir = common.require(paths.join(data_path, "JPEGImages", "480p", v), "frame folder")
        frames = sorted(paths.join(vdir, f) for f in paths.listdir(vdir) if f.endswith(".jpg"))
        if not frames:
            raise EvalError(f"no .jpg frames in {vdir}")
        adir = common.require(paths.join(data_path, "Annotations", "480p", v), "annotation folder")
        out.append((v, frames, adir))
    return out


def imwrite_indexed(path: str, array: np.ndarray, palette: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    im = Image.fromarray(array)
    im.putpalette(palette.ravel())
    if paths.is_remote(path):  # one object per frame
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        paths.write_bytes(path, buf.getvalue())
    else:
        im.save(path, format="PNG")


# --------------------------------------------------------------------------
# Propagation (jitted).
# --------------------------------------------------------------------------
def neighbourhood_mask(h: int, w: int, size: int) -> np.ndarray:
    """(h*w, h*w) 1 where the source patch lies within ``size`` rows and columns of the target."""
    i = np.arange(h)
    j = np.arange(w)
    mi = np.abs(i[:, None] - i[None, :]) <= size
    mj = np.abs(j[:, None] - j[None, :]) <= size
    return (mi[:, None, :, None] & mj[None, :, None, :]).reshape(h * w, h * w).astype(np.float32)


@functools.lru_cache(maxsize=8)
def make_feature_fn(model):
    """Jitted ``(params, frame (H, W, 3)) -> (h*w, D)``: the final normalised patch tokens,
    built once per backbone."""
    import jax  # noqa: PLC0415

    @jax.jit
    def fn(params, x):
        return features.forward(model, params, x[None], "tokens")[1][0]

    return fn


def kth_largest(x, k: int):
    """The k-th largest value of each row of ``x`` (what ``top_k(x, k)[0][:, -1]`` gives,
    duplicates counted), by k passes that each take out one row maximum: O(k n) where
    XLA's CPU top-k sorts each row."""
    import jax.numpy as jnp  # noqa: PLC0415

    cols = jnp.arange(x.shape[1])[None]
    m = jnp.max(x, axis=1)
    for _ in range(k - 1):  # k is small (official 5): unrolled, XLA fuses each pass
        x = jnp.where(cols == jnp.argmax(x, axis=1)[:, None], -jnp.inf, x)
        m = jnp.max(x, axis=1)
    return m


def _propagate_impl(feat_tar, feat_src, segs, valid, mask, topk: int):
    """Official label_propagation: feat_tar (hw, D), feat_src (n, hw, D), segs (n, C, hw),
    valid (n,) 1 for a source frame and 0 for an empty slot of the padded queue, mask
    (hw, hw) or None -> soft labels (C, hw). An empty slot's affinities are 0, as are
    masked-out neighbours: they never pass the top-k threshold with weight and add
    nothing to the sums, so the result is that of the unpadded queue."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    t, s = l2_normalize(feat_tar), l2_normalize(feat_src)
    aff = jnp.exp(jnp.einsum("qd,nkd->qnk", t, s, precision=jax.lax.Precision.HIGHEST) / 0.1)  # (q, n, k)
    aff = aff * valid[None, :, None]
    if mask is not None:
        aff = aff * mask[:, None, :]
    aff = aff.reshape(t.shape[0], -1)                                                   # (q, n*k)
    kth = kth_largest(aff, topk)                                                        # (q,)
    aff = jnp.where(aff < kth[:, None], 0.0, aff)
    aff = aff / jnp.sum(aff, axis=1, keepdims=True)
    n, c, hw = segs.shape
    flat = jnp.transpose(segs, (1, 0, 2)).reshape(c, n * hw)                           # (C, n*hw)
    return jnp.einsum("cs,qs->cq", flat, aff, precision=jax.lax.Precision.HIGHEST)


def upsample_labels(seg: np.ndarray, factor: int) -> np.ndarray:
    """PyTorch bilinear interpolate (align_corners=False) of (C, h, w) by an integer factor,
    one axis at a time (two float32 matrix products)."""
    mh, mw = common.bilinear_matrix(seg.shape[1], factor), common.bilinear_matrix(seg.shape[2], factor)
    return np.matmul(np.matmul(mh, seg.astype(np.float32)), mw.T).astype(np.float32)


def norm_mask(mask: np.ndarray) -> np.ndarray:
    """Official norm_mask: each channel whose max is > 0 is min-max scaled to [0, 1]."""
    out = mask.copy()
    for c in range(out.shape[0]):
        m = out[c]
        if m.max() > 0:
            m = m - m.min()
            out[c] = m / m.max()
    return out


def segment_video(model, params, frames: list, first_seg: np.ndarray, seg_ori: np.ndarray, out_dir: str,
                  n_last_frames: int = 7, size_mask_neighborhood: int = 12, topk: int = 5,
                  scale_size: int = 480, palette=None, feature_fn=None, propagate=None) -> None:
    """Propagate ``first_seg`` through ``frames`` and write OUT_DIR/<frame>.png for every frame."""
    import jax  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    palette = davis_palette() if palette is None else palette
    feature_fn = feature_fn or make_feature_fn(model)
    propagate = propagate or jax.jit(_propagate_impl, static_argnames=("topk",))
    p = model.patch_size
    paths.makedirs(out_dir)
    x, _, _ = read_frame(frames[0], scale_size)
    h, w = x.shape[0] // p, x.shape[1] // p
    if first_seg.shape[1:] != (h, w):
        raise EvalError(f"annotation of {frames[0]} gives a {first_seg.shape[1]}x{first_seg.shape[2]} label "
                        f"grid, the frame a {h}x{w} patch grid")
    first_feat = feature_fn(params, common.crop_to_patch_multiple(x, p))
    first = first_seg.reshape(first_seg.shape[0], -1)
    imwrite_indexed(paths.join(out_dir, "00000.png"), seg_ori, palette)
    # The neighbourhood mask goes to the device once per video.
    mask = (jax.device_put(neighbourhood_mask(h, w, size_mask_neighborhood))
            if size_mask_neighborhood > 0 else None)
    # The sources are the first frame and the n_last_frames previous ones, held in a stack of
    # fixed length (empty slots masked), so propagation compiles once per frame size.
    slots = 1 + n_last_frames
    zero_feat = jax.numpy.zeros_like(first_feat)
    zero_seg = np.zeros_like(first)
    topk = min(topk, slots * h * w)
    queue = []  # (features, soft labels) of the last n_last_frames frames
    for path, (x, ori_h, ori_w) in zip(frames[1:], common.parallel_map(
            lambda f: read_frame(f, scale_size), frames[1:], num_threads=2)):
        feat = feature_fn(params, common.crop_to_patch_multiple(x, p))
        pad = slots - 1 - len(queue)
        feats = jax.numpy.stack([first_feat] + [q[0] for q in queue] + [zero_feat] * pad)
        segs = np.stack([first] + [q[1] for q in queue] + [zero_seg] * pad)
        valid = np.array([1.0] * (1 + len(queue)) + [0.0] * pad, np.float32)
        seg = np.asarray(propagate(feat, feats, segs, valid, mask, topk=topk))
        if len(queue) == n_last_frames:
            queue.pop(0)
        if n_last_frames > 0:
            queue.append((feat, seg))
        up = norm_mask(upsample_labels(seg.reshape(-1, h, w), p))
        labels = np.argmax(up, axis=0).astype(np.uint8)
        labels = np.asarray(Image.fromarray(labels).resize((ori_w, ori_h), 0))
        imwrite_indexed(paths.join(out_dir, paths.basename(path)[:-4] + ".png"), labels, palette)


# --------------------------------------------------------------------------
# DAVIS J and F.
# --------------------------------------------------------------------------
def region_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """J: |gt & pred| / |gt | pred| (1 when both are empty)."""
    union = np.logical_or(gt, pred).sum()
    return 1.0 if union == 0 else float(np.logical_and(gt, pred).sum() / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask (the DAVIS seg2bmap at the mask's own size)."""
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by the disk x^2 + y^2 <= radius^2 (skimage.morphology.disk)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    pad = np.pad(mask, radius)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
    return out


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """F: boundary precision/recall within ceil(bound_th * diagonal) pixels, their harmonic mean."""
    bound_pix = bound_th if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(gt.shape)))
    fg_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    fg_dil, gt_dil = dilate_disk(fg_b, bound_pix), dilate_disk(gt_b, bound_pix)
    n_fg, n_gt = fg_b.sum(), gt_b.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float((fg_b & gt_dil).sum() / n_fg)
        recall = float((gt_b & fg_dil).sum() / n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def read_mask(path: str) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    if not paths.isfile(path):
        raise EvalError(f"missing mask: {path}")
    try:
        with Image.open(paths.readable(path)) as im:
            return np.asarray(im if im.mode in ("P", "L") else im.convert("L"), np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalError(f"cannot read mask {path}: {common.error_line(e)}") from e


def score_video(gt_dir: str, pred_dir: str, frame_names: list) -> tuple[list, list]:
    """Per-object mean J and mean F of one video over its frames except the first and last."""
    gts = [read_mask(paths.join(gt_dir, n + ".png")) for n in frame_names]
    preds = [read_mask(paths.join(pred_dir, n + ".png")) for n in frame_names]
    objects = [o for o in np.unique(gts[0]) if o not in (0, 255)]
    idx = range(1, len(frame_names) - 1) if len(frame_names) > 2 else range(1, len(frame_names))
    j_obj, f_obj = [], []
    for o in objects:
        js = [region_iou(gts[i] == o, preds[i] == o) for i in idx]
        fs = [boundary_f(gts[i] == o, preds[i] == o) for i in idx]
        j_obj.append(float(np.mean(js)) if js else float("nan"))
        f_obj.append(float(np.mean(fs)) if fs else float("nan"))
    return j_obj, f_obj


def jf_scores(data_path: str, output_dir: str, videos: list) -> dict:
    """{'davis_j_mean', 'davis_f_mean', 'davis_jf_mean'} (percent) over all objects of ``videos``."""
    js, fs = [], []
    for v, frames, adir in videos:
        names = [paths.basename(f)[:-4] for f in frames]
        j, f = score_video(adir, paths.join(output_dir, v), names)
        js += j
        fs += f
    if not js:
        raise EvalError(f"no object in the first annotations of {data_path}")
    j_mean, f_mean = 100.0 * float(np.nanmean(js)), 100.0 * float(np.nanmean(fs))
    return {"davis_j_mean": j_mean, "davis_f_mean": f_mean, "davis_jf_mean": (j_mean + f_mean) / 2}


def evaluate(backbone, params, data_path: str, output_dir: str = "", n_last_frames: int = 7,
             size_mask_neighborhood: int = 12, topk: int = 5, scale_size: int = 480, max_videos: int = 0,
             progress=None) -> dict:
    """Segment the val videos into ``output_dir`` (a temporary folder when '') and score them."""
    import jax  # noqa: PLC0415

    videos = read_davis(data_path, max_videos)
    tmp = None
    if not output_dir:
        tmp = tempfile.TemporaryDirectory(prefix="davis-")
        output_dir = tmp.name
    try:
        feature_fn = make_feature_fn(backbone)
        propagate = jax.jit(_propagate_impl, static_argnames=("topk",))
        for i, (v, frames, adir) in enumerate(videos):
            if progress:
                progress(f"[{i}/{len(videos)}] segmenting {v} ({len(frames)} frames)")
            first_seg, seg_ori = read_seg(paths.join(adir, paths.basename(frames[0])[:-4] + ".png"),
                                          backbone.patch_size, scale_size)
            segment_video(backbone, params, frames, first_seg, seg_ori, paths.join(output_dir, v), n_last_frames,
                          size_mask_neighborhood, topk, scale_size, feature_fn=feature_fn, propagate=propagate)
        return jf_scores(data_path, output_dir, videos)
    finally:
        if tmp is not None:
            tmp.cleanup()


def build_parser() -> argparse.ArgumentParser:
    ap = common.tool_parser("python -m dino_jax.eval.video_segmentation", __doc__)
    ap.add_argument("--data_path", required=True,
                    help="DAVIS-2017 root (ImageSets/2017/val.txt, JPEGImages/480p, Annotations/480p)")
    ap.add_argument("--output_dir", required=True, help="where OUTPUT/<video>/<frame>.png masks are written")
    ap.add_argument("--n_last_frames", type=int, default=7, help="previous frames used as context (official 7)")
    ap.add_argument("--size_mask_neighborhood", type=int, default=12,
                    help="sources restricted to this many patches around the target (official 12; 0: all)")
    ap.add_argument("--topk", type=int, default=5, help="labels accumulated from the top-k sources (official 5)")
    ap.add_argument("--scale_size", type=int, default=480,
                    help="frames resized to this shorter side, the longer one a multiple of 64 (official 480)")
    ap.add_argument("--max_videos", type=int, default=0, help="only the first N videos of val.txt (0: all)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body():
        if a.topk <= 0 or a.n_last_frames < 0 or a.scale_size <= 0:
            raise EvalError("--topk and --scale_size must be positive, --n_last_frames non-negative")
        read_davis(a.data_path, a.max_videos)  # a bad layout fails before the model loads
        model, params = common.load_backbone(a.checkpoint, a.dtype)
        settings = dict(data_path=a.data_path, output_dir=a.output_dir, n_last_frames=a.n_last_frames,
                        size_mask_neighborhood=a.size_mask_neighborhood, topk=a.topk, scale_size=a.scale_size,
                        max_videos=a.max_videos)
        res = base.FunctionEvaluator("video_segmentation", evaluate, settings,
                                     progress=lambda m: print(m, flush=True)).run(model, params)
        print(f"J&F-Mean {res['davis_jf_mean']:.2f}  J-Mean {res['davis_j_mean']:.2f}  "
              f"F-Mean {res['davis_f_mean']:.2f}  (masks in {a.output_dir})")
        print(json.dumps(res))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

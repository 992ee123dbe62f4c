"""Self-attention of the CLS token in the last block, one map per head, as in the
official visualize_attention.py.

    python -m dino_jax.visualize_attention --checkpoint DIR --image I.jpg --output OUT/
                                           [--image_size 480 480] [--threshold 0.6]

The image is resized (``--image_size H W``: exactly H x W, bilinear, the
official default 480 480; one value S: shorter side to S; 0: its own size),
cropped at the bottom/right to a multiple of the patch size and normalised with
the ImageNet mean/std. The last block's attention of the CLS query on the patch
keys (``forward_features``' ``cls_attention``; a DINOv2 model's registers left
out) of every head is upsampled to the image by nearest neighbour
(each patch becomes a patch-size square). Written to OUT/:

  img.png                        the resized, cropped input
  attn-head{j}.png               head j's map, min-max scaled, viridis colours
  mask_th{t}_head{j}.png         white where head j keeps the patch: the smallest set
                                 of most-attended patches whose attention is at least
                                 the fraction t of the head's total (official rule:
                                 ascending sort, cumulative share > 1 - t)
  overlay_th{t}_head{j}.png      the image with the kept patches tinted
  attention.npz                  'attention' (heads, h, w) float32 at patch resolution,
                                 'masks' (heads, h, w) bool, 'threshold', 'patch_size'
"""
from __future__ import annotations

import argparse
import sys

from dino_jax.eval import common

def build_parser() -> argparse.ArgumentParser:
    ap = common.tool_parser("python -m dino_jax.visualize_attention", __doc__, dtype=False)
    ap.add_argument("--image", required=True, help="image file to visualise (any format PIL reads)")
    ap.add_argument("--output", required=True, help="output directory for the PNGs and attention.npz")
    ap.add_argument("--image_size", type=int, nargs="+", default=[480, 480], metavar="H [W]",
                    help="resize to H x W (official default 480 480), shorter side to H when one value, "
                         "or 0 to keep the image's own size")
    ap.add_argument("--threshold", type=float, default=0.6,
                    help="fraction of each head's attention mass the masks keep (official papers use 0.6); "
                         "0 or a negative value writes no masks")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body():
        from dino_jax.eval import attention  # noqa: PLC0415

        if len(a.image_size) > 2 or min(a.image_size) < 0:
            raise common.EvalError(f"--image_size takes H [W] (or 0 for the image's own size), got {a.image_size}")
        if a.threshold > 1:
            raise common.EvalError(f"--threshold is a fraction of the attention mass in (0, 1], got {a.threshold}")
        threshold = a.threshold if a.threshold > 0 else None
        image = common.read_image(a.image)
        model, params = common.load_backbone(a.checkpoint)
        attention.visualize(model, params, image, a.output, a.image_size, threshold,
                            progress=lambda m: print(m, flush=True))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""Backbone features of a folder of images or an ``.npz`` of images, for retrieval
and copy detection.

    python -m dino_jax.extract --checkpoint DIR --input (FOLDER | images.npz) --output F.npz
                               [--attention] [--image_size S]

Writes ``F.npz`` with

  cls        (N, D) float32  the backbone output: the final-LayerNorm CLS token of
                             every image, not L2-normalised (as the official model(x))
  sizes      (N, 2) int32    the (H, W) each image had when it entered the model
  paths      (N,)   str      folder input only: file paths relative to the folder
  attention  (N, heads, H/p, W/p) float32, with --attention: the last block's
             attention of the CLS token to every patch (``forward_features``'
             ``cls_attention``: registers left out; what visualize_attention
             draws). When the images do not all share one size the maps are
             stored one per image as
             ``attention/<index>`` (heads, H_i/p, W_i/p).

Inputs. A folder: every image file under it (recursively; .jpg .jpeg .png .bmp
.gif .webp; directories in sorted order, files sorted by name within each, the
order ImageFolder training uses), read with PIL and converted to RGB. An
``.npz``: the array ``images``, either uint8 NHWC (N, H, W, 3), (N, H, W, 1) or
(N, H, W), pixel values 0..255, or float32 NHWC taken as *already normalised*
and used as is (so numbers from another pipeline can be fed unchanged).

Preprocessing, as the official code: uint8 images are divided by 255 and
normalised with the ImageNet mean and std. Without ``--image_size`` each image
is used at its own size, cropped at the bottom/right to a multiple of the
patch size (as the official visualize_attention.py). With ``--image_size S``
the evaluation transform is applied first, the same one k-NN and the linear
probe use (``dino_jax.eval.common.eval_transform``): the shorter side to
``int(S * resize_ratio)`` with PIL's bicubic filter (official 256 for 224),
then torchvision's centre crop to S x S. Images of one size are batched
together; every distinct size compiles the model once, so pass
``--image_size`` for folders of mixed sizes. The CLS token and the attention
come from one forward pass. Images are decoded by a pool of threads a few
batches ahead of the model, and the outputs are written to ``F.npz`` as they
are made (the attention maps straight into the archive, the CLS rows through a
temporary file beside it), so memory does not grow with the number of images.
Python API: ``dino_jax.eval.features``.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile

import numpy as np

from dino_jax import paths
from dino_jax.eval import common


class NpzStreamWriter:
    """An ``.npz`` archive (what ``np.savez`` writes: stored ``<name>.npy`` members) built
    while the data is made: :meth:`begin` opens a member of known shape whose rows are
    then :meth:`append`-ed in order; :meth:`put` adds a whole array. Written to a
    temporary file and renamed (gs://: uploaded) on :meth:`close`, so a failed run leaves
    no half file."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = paths.staging_file(path)
        self.zf = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = None

    def begin(self, name: str, shape, dtype) -> None:
        self.member = self.zf.open(name + ".npy", "w", force_zip64=True)
        np.lib.format.write_array_header_2_0(self.member, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(int(v) for v in shape)})

    def append(self, rows: np.ndarray) -> None:
        self.member.write(np.ascontiguousarray(rows).tobytes())

    def end(self) -> None:
        self.member.close()
        self.member = None

    def put(self, name: str, array: np.ndarray) -> None:
        with self.zf.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def put_file(self, name: str, npy_path: str) -> None:
        self.zf.write(npy_path, name + ".npy")

    def close(self) -> None:
        self.zf.close()
        paths.publish(self.tmp, self.path)

    def abort(self) -> None:
        if self.member is not None:
            self.member.close()
        self.zf.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_features(model, params, inputs, output: str, batch_size: int = 64, attention: bool = False,
                   progress=None) -> None:
    """Extract ``inputs`` and write ``output`` (the layout of the module docstring) as the
    batches come: attention maps go straight into the archive, CLS rows to a temporary
    ``.npy`` beside it (in order when all images share one size, else written at their
    index through a memory map) that joins the archive at the end."""
    from dino_jax.eval import features  # noqa: PLC0415

    n, d = len(inputs), model.embed_dim
    one_size = len(set(inputs.sizes)) == 1
    w = NpzStreamWriter(output)
    cls_tmp = w.tmp + ".cls.npy"
    try:
        if one_size:
            cls_file = open(cls_tmp, "wb")
            np.lib.format.write_array_header_2_0(cls_file, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        else:
            cls_file = np.lib.format.open_memmap(cls_tmp, "w+", np.float32, (n, d))
        if attention and one_size:
            h, wd = inputs.sizes[0]
            w.begin("attention", (n, model.num_heads, h // model.patch_size, wd // model.patch_size), np.float32)

        def sink(idx, cls, att):
            if one_size:
                cls_file.write(np.ascontiguousarray(cls, np.float32).tobytes())
            else:
                cls_file[idx] = cls
            if att is None:
                return
            if one_size:
                w.append(att.astype(np.float32))
            else:
                for i, a in zip(idx, att):
                    w.put(f"attention/{i}", a.astype(np.float32))

        features.extract(model, params, inputs, batch_size, attention, progress=progress, sink=sink)
        if attention and one_size:
            w.end()
        if one_size:
            cls_file.close()
        else:
            cls_file.flush()
            del cls_file
        w.put_file("cls", cls_tmp)
        w.put("sizes", np.array(inputs.sizes, np.int32).reshape(-1, 2))
        if inputs.paths is not None:
            w.put("paths", np.array(inputs.paths))
        w.close()
    except BaseException:
        w.abort()
        raise
    finally:
        if os.path.exists(cls_tmp):
            os.remove(cls_tmp)


def build_parser() -> argparse.ArgumentParser:
    ap = common.tool_parser("python -m dino_jax.extract", __doc__)
    ap.add_argument("--input", required=True,
                    help="folder of images (recursive, sorted; local or gs://) or .npz with 'images' (uint8 NHWC 0..255, "
                         "or float32 NHWC already normalised)")
    ap.add_argument("--output", required=True,
                    help="output .npz (cls, sizes, [paths], [attention]); local or gs://")
    ap.add_argument("--attention", action="store_true",
                    help="also write the last block's CLS-to-patch attention maps of every head")
    ap.add_argument("--image_size", type=int, nargs="+", default=None, metavar="S",
                    help="apply the evaluation transform (shorter side to S*resize_ratio, bicubic, centre "
                         "crop S x S; what k-NN uses); 'H W' is accepted for H == W only (the official "
                         "evaluation crop is square); default: every image at its own size")
    ap.add_argument("--resize_ratio", type=float, default=256 / 224,
                    help="with --image_size: resize to cover size*ratio before the centre crop "
                         "(official 256/224; 1.0 resizes straight to the crop size)")
    ap.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body():
        from dino_jax.eval import features  # noqa: PLC0415

        image_size = None
        if a.image_size is not None:
            if len(a.image_size) > 2 or len(set(a.image_size)) != 1:
                raise common.EvalError(f"--image_size takes S (or 'S S'): the evaluation crop is square "
                                       f"(Resize + CenterCrop), got {' '.join(map(str, a.image_size))}")
            image_size = a.image_size[0]
            if image_size <= 0:
                raise common.EvalError(f"--image_size must be positive, got {image_size}")
        if a.batch_size <= 0:
            raise common.EvalError(f"--batch_size must be positive, got {a.batch_size}")
        model, params = common.load_backbone(a.checkpoint, a.dtype)
        inputs = features.load_inputs(a.input, model.patch_size, image_size, a.resize_ratio)
        print(f"{len(inputs)} images, {len(set(inputs.sizes))} distinct size(s); "
              f"backbone width {model.embed_dim}, patch {model.patch_size}", flush=True)
        write_features(model, params, inputs, a.output, a.batch_size, a.attention,
                       progress=lambda m: print(m, flush=True))
        print(f"wrote {a.output}: cls ({len(inputs)}, {model.embed_dim})" + (", attention" if a.attention else ""))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""Runs an official DINO evaluation script on the CPU, unchanged, for
``benchmarks/eval_speed.py``. Needs torch and torchvision (plus opencv and tqdm
for the DAVIS script); it does not import dino_jax.

    python official_eval_shim.py --official_dir DINO --script eval_image_retrieval.py -- ARGS...
    python official_eval_shim.py --official_dir DINO --extract FOLDER --weights W.pth --out F.npy

The official scripts assume one or more GPUs and the network. What changes
around them (their code is imported from ``--official_dir``, never copied):

- ``.cuda()`` of tensors and modules returns the object itself, a tensor made
  with ``device='cuda'`` is made on the CPU, ``torch.cuda.synchronize`` and
  ``set_device`` do nothing;
- the distributed set-up is a one-process gloo group (``RANK=0``,
  ``WORLD_SIZE=1``), and ``DistributedDataParallel`` runs without device ids;
- the DAVIS script reads its colour palette from a URL: the same 256-entry PASCAL
  VOC / DAVIS map is served locally;
- Pillow 10 renamed ``Image.ANTIALIAS`` to ``Image.LANCZOS`` and NumPy 2.4 removed
  ``np.in1d`` (= ``np.isin`` on 1-D arrays): the old names are set;
- the Copydays dataset class hard-codes the block sizes of the full release
  (157 and 229 images, 20 blocks): it is given the blocks present under
  ``--data_path`` and their sizes, so a smaller synthetic set runs.

``--extract`` runs the official ``eval_knn.extract_features`` over an
ImageFolder with the official evaluation transform (resize 256 bicubic, centre
crop 224, ImageNet normalisation) and saves the features.
"""
import argparse
import builtins
import io
import os
import runpy
import sys

import numpy as np


def davis_palette_lines() -> bytes:
    """The palette file the DAVIS script downloads: 256 lines 'r g b'."""
    lines = []
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        lines.append(f"{r} {g} {b}")
    return ("\n".join(lines) + "\n").encode()


def patch_copydays(cls):
    """Give the official CopydaysDataset the blocks present on disk and their sizes."""
    init = cls.__init__

    def __init__(self, basedir):
        init(self, basedir)
        present = [b for b in self.block_names if os.path.isdir(os.path.join(basedir, b))]
        self.block_names = present
        self.nblocks = len(present)
        self.query_blocks = range(self.nblocks)
        self.q_block_sizes = np.array([len(self.get_block(i)) for i in range(self.nblocks)], int)

    cls.__init__ = __init__


def install(official_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from PIL import Image

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    make_tensor = torch.tensor

    def tensor(*a, device=None, **k):
        return make_tensor(*a, device=None if str(device).startswith("cuda") else device, **k)

    torch.tensor = tensor
    torch.cuda.set_device = lambda *a, **k: None
    Image.ANTIALIAS = Image.LANCZOS
    if not hasattr(np, "in1d"):
        np.in1d = np.isin
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 300))
    init_pg = dist.init_process_group
    dist.init_process_group = lambda *a, **k: init_pg("gloo", init_method="env://", world_size=1, rank=0)
    ddp = torch.nn.parallel.DistributedDataParallel
    torch.nn.parallel.DistributedDataParallel = lambda module, *a, **k: ddp(module)
    import urllib.request

    urllib.request.urlopen = lambda *a, **k: io.BytesIO(davis_palette_lines())
    build_class = builtins.__build_class__

    def build(func, name, *a, **k):
        cls = build_class(func, name, *a, **k)
        if name == "CopydaysDataset":
            patch_copydays(cls)
        return cls

    builtins.__build_class__ = build
    sys.path.insert(0, os.path.abspath(official_dir))


def extract(a) -> None:
    """The official k-NN feature extraction over an ImageFolder."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    import eval_knn  # official
    import utils  # official
    import vision_transformer as vits  # official

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group()
    model = vits.__dict__[a.arch](patch_size=a.patch_size, num_classes=0)
    utils.load_pretrained_weights(model, a.weights, "teacher", a.arch, a.patch_size)
    model.eval()
    transform = T.Compose([T.Resize(256, interpolation=3), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = eval_knn.ReturnIndexDataset(a.extract, transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=a.num_workers,
                                         pin_memory=False, drop_last=False)
    feats = eval_knn.extract_features(model, loader, use_cuda=False)
    np.save(a.out, feats.numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official_dir", required=True, help="checkout of facebookresearch/dino")
    ap.add_argument("--script", default="", help="official script to run as __main__ (arguments after --)")
    ap.add_argument("--extract", default="", help="ImageFolder root: run the official k-NN feature extraction")
    ap.add_argument("--weights", default="", help="with --extract: the .pth weights")
    ap.add_argument("--out", default="", help="with --extract: where the features (.npy) go")
    ap.add_argument("--arch", default="vit_small", help="with --extract: official architecture name")
    ap.add_argument("--patch_size", type=int, default=16, help="with --extract: patch size")
    ap.add_argument("--batch_size", type=int, default=64, help="with --extract: images per batch")
    ap.add_argument("--num_workers", type=int, default=2, help="with --extract: data loader processes")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a, rest = ap.parse_known_args()
    install(a.official_dir)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.extract:
        extract(a)
        return
    if not a.script:
        sys.exit("error: give --script or --extract")
    script = os.path.join(a.official_dir, a.script)
    sys.argv = [script] + [r for r in rest if r != "--"]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

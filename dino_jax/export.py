"""Export the teacher backbone of a training run.

    python -m dino_jax.export --workdir DIR --output OUT [--format orbax|torch] [--step N]

``orbax`` (default) writes a params dir: ``OUT/params`` (an Orbax checkpoint of
plain nested dicts: ``orbax.checkpoint.StandardCheckpointer().restore(OUT +
"/params")["backbone"]`` works without this package) and
``OUT/model_config.json``. ``torch`` writes a ``.pth`` state dict that the
official ``vision_transformer.vit_*(patch_size=...)`` loads with ``strict=True``.
The teacher is the network DINO evaluates and releases.
"""
from __future__ import annotations

import argparse
import sys

from dino_jax import checkpoint, paths, torch_weights
from dino_jax.eval import common


def export(workdir: str, output: str, fmt: str = "orbax", step: int | None = None,
           overwrite: bool = False) -> str:
    paths.check_bucket(workdir)
    paths.check_bucket(output)
    ckpt_dir = paths.join(paths.abspath(workdir), checkpoint.CHECKPOINTS)
    if not paths.isdir(ckpt_dir):
        raise checkpoint.CheckpointError(f"{workdir} is not a training workdir (no {checkpoint.CHECKPOINTS}/)")
    if paths.exists(output) and not overwrite:
        raise checkpoint.CheckpointError(f"{output} exists (pass --overwrite to replace it)")
    backbone, model_cfg = checkpoint.load_teacher_backbone_from_workdir(workdir, step)
    if fmt == "orbax":
        checkpoint.save_params_dir(output, {"backbone": backbone}, model_cfg, None, overwrite=overwrite,
                                   source=paths.abspath(workdir), network="teacher")
    else:
        torch_weights.write_pth(torch_weights.flax_to_torch_backbone(backbone), output)
    return f"wrote {output} ({fmt}): teacher backbone {model_cfg['arch']} patch {model_cfg['patch_size']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dino_jax.export",
                                 description="Write the teacher backbone of a training run on its own.")
    ap.add_argument("--workdir", required=True,
                    help="training workdir (the one given to dino_jax.main; a local path or gs://)")
    ap.add_argument("--output", required=True,
                    help="output: a directory for --format orbax, a .pth file for --format torch "
                         "(a local path or gs://)")
    ap.add_argument("--format", choices=("orbax", "torch"), default="orbax",
                    help="orbax: params dir readable by plain orbax (default); torch: official state dict")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: latest)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    return common.run_cli(lambda: print(export(args.workdir, args.output, args.format, args.step,
                                               args.overwrite)))


if __name__ == "__main__":
    sys.exit(main())

"""Official PyTorch DINO and DINOv2 checkpoints <-> Flax params.

    python -m dino_jax.convert torch2jax --input W.pth [--checkpoint_key teacher] --output DIR
    python -m dino_jax.convert jax2torch --input DIR --output W.pth

``torch2jax`` accepts a backbone-only release file (``dino_deitsmall8_pretrain.pth``),
a full training checkpoint (``checkpoint.pth`` with ``student``/``teacher``
entries whose names carry ``module.`` and ``backbone.``/``head.`` prefixes), or
the same names in an ``.npz``. The architecture (width, depth, patch size, MLP
ratio, position grid) is read from the tensor shapes; the head count is not
in the shapes, so it is taken from the official builder of that width
(192 -> 3, 384 -> 6, 768 -> 12; DINOv2's 1024 -> 16, 1536 -> 24) or from ``--num_heads``.

DINOv2 hub backbones (``dinov2_vits14_pretrain.pth`` ... ``dinov2_vitg14_reg4_pretrain.pth``,
see docs/dinov2.md) are recognised by their own tensors (``mask_token``,
``register_tokens``, ``ls1.gamma``, ``mlp.w12``): registers, LayerScale and the SwiGLU
FFN come from the shapes; the position-embedding interpolation is not in the weights,
so the hub's settings are taken (offset 0 and antialias with registers, offset 0.1
without) unless ``--interpolate_offset``/``--interpolate_antialias`` say otherwise.
``jax2torch`` writes the hub's names back, which dinov2's model loads with strict=True.

The output directory is the params-dir format of :mod:`dino_jax.checkpoint`:
an Orbax checkpoint of ``{'backbone': ..., ['head': ...]}`` plus
``model_config.json``. It is written to a temporary folder and renamed, so a
failed conversion leaves nothing behind. torch is imported only to read or
write ``.pth`` files.
"""
from __future__ import annotations

import argparse
import sys

from dino_jax.torch_weights import (  # noqa: F401  (the library, re-exported for callers of dino_jax.convert)
    ConversionError,
    read_state_dict,
    select_state_dict,
    detect_backbone_config,
    detect_head_config,
    torch_to_flax,
    torch_to_flax_backbone,
    torch_to_flax_head,
    flax_to_torch_backbone,
    flax_to_torch_head,
    write_pth,
)
from dino_jax import paths
from dino_jax.eval import common


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def cmd_torch2jax(args) -> str:
    from dino_jax import checkpoint  # noqa: PLC0415

    raw = read_state_dict(args.input)
    sd = select_state_dict(raw, args.checkpoint_key)
    params, model_cfg, head_cfg = torch_to_flax(sd, args.num_heads, with_head=not args.backbone_only)
    for field in ("interpolate_offset", "interpolate_antialias"):
        if getattr(args, field) is not None:
            if field not in model_cfg:
                raise ConversionError(f"--{field} is for DINOv2 backbones; {args.input} holds a DINO ViT")
            value = getattr(args, field)
            model_cfg[field] = value == "true" if field == "interpolate_antialias" else value
    checkpoint.save_params_dir(args.output, params, model_cfg, head_cfg,
                               source=paths.abspath(args.input), overwrite=args.overwrite)
    return (f"wrote {args.output}: {model_cfg['arch']} patch {model_cfg['patch_size']} "
            f"(width {model_cfg['embed_dim']}, depth {model_cfg['depth']}, heads {model_cfg['num_heads']})"
            + (f" + head (out_dim {head_cfg['out_dim']})" if head_cfg else ""))


def cmd_jax2torch(args) -> str:
    from dino_jax import checkpoint  # noqa: PLC0415

    params, model_cfg, head_cfg = checkpoint.load_params_dir(args.input)
    sd = flax_to_torch_backbone(params["backbone"])
    if args.with_head:
        if "head" not in params:
            raise ConversionError(f"{args.input} holds no head params (--with_head)")
        sd = {**{"backbone." + k: v for k, v in sd.items()}, **flax_to_torch_head(params["head"])}
    if paths.exists(args.output) and not args.overwrite:
        raise ConversionError(f"{args.output} exists (pass --overwrite to replace it)")
    write_pth(sd, args.output)
    return f"wrote {args.output}: {len(sd)} tensors ({model_cfg['arch']} patch {model_cfg['patch_size']})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m dino_jax.convert",
        description="Convert official DINO PyTorch checkpoints to Flax params (Orbax) and back.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("torch2jax", help="official .pth/.npz -> Orbax params dir",
                       description="Read an official DINO checkpoint and write an Orbax params dir "
                                   "(params/ + model_config.json).")
    t.add_argument("--input", required=True,
                   help="official .pth (release backbone file or training checkpoint.pth) or .npz "
                        "with the same tensor names")
    t.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    t.add_argument("--checkpoint_key", default="teacher",
                   help="entry of a training checkpoint to convert: 'teacher' (default, the network "
                        "DINO evaluates) or 'student'; ignored for backbone-only files")
    t.add_argument("--num_heads", type=int, default=None,
                   help="attention heads; needed only for non-official widths (shapes do not show it)")
    t.add_argument("--backbone_only", action="store_true",
                   help="drop the projection head even when the checkpoint has one")
    t.add_argument("--interpolate_offset", type=float, default=None,
                   help="DINOv2 only: position-embedding resize offset (default: the hub's, 0.0 for "
                        "register models, 0.1 otherwise; not stored in the weights)")
    t.add_argument("--interpolate_antialias", type=str.lower, choices=("true", "false"), default=None,
                   help="DINOv2 only: antialiased position-embedding resize (default: the hub's, "
                        "true for register models)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    j = sub.add_parser("jax2torch", help="Orbax params dir -> official .pth state dict",
                       description="Write a state dict that the official vision_transformer.vit_*"
                                   "(patch_size=...) loads with strict=True.")
    j.add_argument("--input", required=True, help="params dir written by torch2jax or dino_jax.export")
    j.add_argument("--output", required=True, help="output .pth file")
    j.add_argument("--with_head", action="store_true",
                   help="also write the head, with MultiCropWrapper names (backbone.*, head.*)")
    j.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_cli(lambda: print(cmd_torch2jax(args) if args.command == "torch2jax"
                                        else cmd_jax2torch(args)))


if __name__ == "__main__":
    sys.exit(main())

"""TPU inference memory without a TPU: compile a backbone's feature extraction ahead of time.

    python benchmarks/tpu_aot_inference.py --topology v5e:2x2 --config configs/dinov2_vitl14.py \\
        [--batch_size N] [--image_size S] [--dtype bfloat16]

The companion of ``benchmarks/tpu_aot.py`` (same libtpu set-up, topology and mesh;
see its docstring) for inference: it compiles ``forward_features`` (the normalised
CLS, register and patch tokens, what extract and the evaluators compute) of the
config's backbone on a global batch of ``--image_size`` images (default: the
config's ``model.img_size``, 518 for the DINOv2 configs), the batch split over the
chips and the parameters replicated, and prints per-chip HBM (arguments,
outputs, temporaries, code) against the chip's capacity and XLA's FLOPs per
image. Table first; the last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tpu_aot  # noqa: E402  (its REPO path set-up and libtpu helpers)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5e:2x2",
                    help="TPU slice as '<chip>:<shape>' (chips, not cores), e.g. v5e:2x2, v4:2x2x1")
    ap.add_argument("--config", default=os.path.join(tpu_aot.REPO, "configs", "dinov2_vits14.py"),
                    help="config file (configs/*.py) whose model.* builds the backbone")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="GLOBAL batch of images (default: 32 per chip); a multiple of the chips")
    ap.add_argument("--image_size", type=int, default=None,
                    help="square image side in pixels (default: the config's model.img_size)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="compute dtype (parameters stay float32); default bfloat16")
    ap.add_argument("--libtpu_dir", default=tpu_aot.DEFAULT_LIBTPU_DIR,
                    help="folder holding the libtpu package (see benchmarks/tpu_aot.py)")
    a = ap.parse_args(argv)
    if a.batch_size is not None and a.batch_size <= 0:
        ap.error(f"--batch_size must be > 0, got {a.batch_size}")
    if a.image_size is not None and a.image_size <= 0:
        ap.error(f"--image_size must be > 0, got {a.image_size}")
    return a


def main(argv=None):
    a = parse_args(argv)
    tpu_aot.setup_environment(a.libtpu_dir, a.topology)
    tpu_aot.import_jax()  # JAX and dino_jax, imported once the libtpu environment is set
    jax, jnp, sharding, train = tpu_aot.jax, tpu_aot.jnp, tpu_aot.sharding, tpu_aot.train

    config = tpu_aot.load_config(a.config)
    config.model.dtype = a.dtype
    devices = tpu_aot.topology_devices(a.topology)
    n = len(devices)
    kind = devices[0].device_kind
    if kind not in tpu_aot.HBM_GIB:
        raise tpu_aot.UsageError(f"no HBM capacity known for {kind!r}")
    capacity = tpu_aot.HBM_GIB[kind] * tpu_aot.GIB
    mesh = tpu_aot.make_mesh(devices, 1)
    batch = a.batch_size or 32 * n
    if batch % n:
        raise tpu_aot.UsageError(f"--batch_size {batch} is not a multiple of the {n} chips")
    backbone = train.build_models(config)[0]
    size = a.image_size or int(backbone.img_size)
    if size % backbone.patch_size:
        raise tpu_aot.UsageError(f"--image_size {size} is not a multiple of the patch size {backbone.patch_size}")
    repl, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    shapes = jax.eval_shape(lambda k: backbone.init(k, jnp.zeros((1, size, size, 3), jnp.float32))["params"],
                            jax.ShapeDtypeStruct((2,), jnp.uint32))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=bsh)

    def features(p, x):
        return backbone.apply({"params": p}, x, method="forward_features")

    t0 = time.time()
    compiled = jax.jit(features, in_shardings=(repl, bsh), out_shardings=bsh).lower(params, images).compile()
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp, code = int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes)
    total = args + out + temp + code
    per_chip = batch // n
    flops_img = float(cost.get("flops", 0.0)) / per_chip if cost else None
    nparams = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    gib = tpu_aot.gib
    rows = [("device", f"CPU host compiling for TPU (libtpu {tpu_aot.installed_libtpu_version(a.libtpu_dir)}, "
                       f"jax {jax.__version__})"),
            ("topology", f"{a.topology}: {n} x {kind}, {tpu_aot.HBM_GIB[kind]:g} GiB HBM per chip"),
            ("model", f"p{backbone.patch_size} d{backbone.embed_dim} x{backbone.depth}, "
                      f"{backbone.num_register_tokens} registers, ffn {backbone.ffn}, {nparams / 1e6:.1f} M params"),
            ("images", f"{batch} x {size}x{size} ({per_chip} per chip), {a.dtype}"),
            ("compile (s)", f"{compile_s:.1f}"),
            ("HBM arguments / chip", gib(args)), ("HBM outputs / chip", gib(out)),
            ("HBM temporaries / chip", gib(temp)), ("HBM code / chip", gib(code)),
            ("HBM total / capacity", f"{gib(total)} / {gib(capacity)}"),
            ("fits", "yes" if total <= capacity else "NO"),
            ("GFLOP/image (XLA)", f"{flops_img / 1e9:.2f}" if flops_img else "n/a")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps({
        "topology": a.topology, "chips": n, "device_kind": kind, "config": os.path.basename(a.config),
        "image_size": size, "global_batch": batch, "per_chip_batch": per_chip, "dtype": a.dtype,
        "params": nparams, "compile_s": round(compile_s, 1), "argument_bytes": args, "output_bytes": out,
        "temp_bytes": temp, "code_bytes": code, "hbm_total_bytes": total, "hbm_capacity_bytes": int(capacity),
        "fits": total <= capacity, "xla_flops_per_image": flops_img,
        "libtpu": tpu_aot.installed_libtpu_version(a.libtpu_dir), "jax": jax.__version__}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tpu_aot.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

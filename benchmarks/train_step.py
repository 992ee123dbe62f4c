"""Train-step throughput: images/s, step time, FLOPs per image and MFU.

    python benchmarks/train_step.py --config=configs/vit_s16.py --batch_size=256 [--dtype=bfloat16]
    python benchmarks/train_step.py --tiny          # a CPU-sized smoke run
    python benchmarks/train_step.py --recipe nano --official DINO_DIR --official_bench TOOL --repeats 5
    python benchmarks/train_step.py --config=configs/quickstart.py --steps 20 --loop 20 --repeats 3

``--recipe nano|vit_s16`` sets the model, crops and batch of the official anchor
(``official_step_bench.py``'s recipes: nano = patch 4, width 96 x 4 blocks, 3
heads, 2x28 + 6x12 crops, head 512/64/K=1024, batch 128; vit_s16 = ViT-S/16,
2x224 + 10x96, batch 8). With ``--official DINO_DIR`` the official PyTorch step
(``--official_bench``, run with ``--official_python``) is timed as a subprocess
between our repeats, under the same CPU affinity, threads (``--threads``) and
environment (LD_PRELOAD included), and the table gains both medians and their ratio.

Synthetic batches live on the device (the input pipeline is measured by
benchmarks/input_pipeline.py), so this needs JAX only (no TensorFlow).
The bare step is ``train.TrainStep`` (the guarded step the training loop
runs, carrying its on-device metrics accumulator). ``--loop N`` also times N
steps of the real training loop (``trainer.train_and_evaluate`` on
``data.source = 'synthetic'``: prefetching, metrics fetched every
``log_every_steps``; no checkpoint or evaluation inside the timed part: the
timing runs from the first log step, after compilation, to the last step,
before the final save) and prints both rates and their ratio, in wall-clock
images/s and in process CPU time per step. ``--repeats R``
interleaves R bare/loop pairs and reports medians (a persistent compilation
cache in a temporary folder keeps the repeats from recompiling).
FLOPs per image count the recipe as computed (the last block on the CLS row:
``vit_forward_flops``): student forward+backward (3x forward) on all
crops and the teacher forward on the 2 global crops, heads included. MFU is
against the device's dense peak for the compute dtype (``--peak_tflops`` to
override). The XLA cost-analysis FLOPs are printed beside the analytic count.
Prints a table; the last line is a JSON object. Exits 0.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dino_jax import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.reexec_with_tcmalloc()
runtime.set_xla_cpu_defaults()

# After the set-up above, which must run before jax is imported.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from dino_jax import schedules, sharding, train, trainer  # noqa: E402

# Dense peak TFLOP/s per device by (device kind substring, dtype): vendor datasheets.
PEAKS = [("H200", "bfloat16", 989.0), ("H200", "float32", 67.0), ("H100", "bfloat16", 989.0),
         ("H100", "float32", 67.0), ("A100", "bfloat16", 312.0), ("A100", "float32", 19.5),
         ("TPU v5p", "bfloat16", 459.0), ("TPU v5 lite", "bfloat16", 197.0), ("TPU v4", "bfloat16", 275.0)]


def load_config(path):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float, patch: int, chans: int = 3):
    """Multiply-adds x 2 of one ViT CLS-feature forward on one image of ``tokens`` (CLS
    included), as ``VisionTransformer.__call__`` computes it: full blocks, then the last
    block's qkv on every token and its attention row, projection and MLP on CLS alone."""
    def block(rows):  # rows: the query rows (tokens, or 1 for CLS), keys over all tokens
        return (2 * tokens * dim * 3 * dim + 2 * rows * dim * (dim + 2 * mlp_ratio * dim)
                + 4 * rows * tokens * dim)
    patch_embed = 2 * (tokens - 1) * chans * patch * patch * dim
    return (depth - 1) * block(tokens) + block(1) + patch_embed


def head_flops(dim, hidden, bottleneck, out_dim, nlayers=3):
    dims = [dim] + [hidden] * (nlayers - 1) + [bottleneck]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * bottleneck * out_dim


def recipe_flops_per_image(config, backbone, head):
    g, l = config.data.global_crop_size, config.data.local_crop_size
    nl, p = config.data.num_local_crops, backbone.patch_size
    args = (backbone.embed_dim, backbone.depth, backbone.mlp_ratio, p)
    fg = vit_forward_flops(1 + (g // p) ** 2, *args)
    fl = vit_forward_flops(1 + (l // p) ** 2, *args)
    fh = head_flops(backbone.embed_dim, head.hidden_dim, head.bottleneck_dim, head.out_dim, head.nlayers)
    student = 3 * (2 * (fg + fh) + nl * (fl + fh))
    teacher = 2 * (fg + fh)
    return student + teacher


# The official anchor's recipes (official_step_bench.py RECIPES), as config overrides.
RECIPES = {
    "nano": dict(config="quickstart.py", arch="custom", patch=4, dim=96, depth=4, heads=3, g=28, l=12,
                 n_local=6, out_dim=1024, hidden=512, bottleneck=64, batch=128),
    "vit_s16": dict(config="vit_s16.py", arch="vit_small", patch=16, dim=384, depth=12, heads=6, g=224,
                    l=96, n_local=10, out_dim=65536, hidden=2048, bottleneck=256, batch=8),
}


def recipe_config(name: str):
    r = RECIPES[name]
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", r["config"]))
    m, d = config.model, config.data
    m.arch, m.patch_size, m.embed_dim, m.depth, m.num_heads = r["arch"], r["patch"], r["dim"], r["depth"], r["heads"]
    m.img_size, m.drop_path_rate, m.norm_last_layer = r["g"], 0.1, True
    m.out_dim, m.head_hidden_dim, m.head_bottleneck_dim, m.head_nlayers = r["out_dim"], r["hidden"], r["bottleneck"], 3
    d.global_crop_size, d.local_crop_size, d.num_local_crops = r["g"], r["l"], r["n_local"]
    config.batch_size = r["batch"]
    config.clip_grad = 3.0
    config.freeze_last_layer = 0  # the anchor times epoch 1: last layer trained
    return config


def build_bare_step(config):
    """The step the benchmarks time: ``train.TrainStep`` on a mesh of
    ``config.num_fsdp``, a fresh state, a synthetic batch on the devices, compiled.
    Returns (compiled, step, state, batch, models, compile seconds)."""
    mesh = sharding.make_mesh(int(config.num_fsdp))
    sharding.check_batch_size(config.batch_size, mesh)
    models = train.build_models(config)
    state = train.create_train_state(config, jax.random.PRNGKey(0), mesh=mesh, models=models)
    step = train.TrainStep(config, schedules.build_schedules(config, 1000), mesh=mesh, models=models,
                           state_sharding=jax.tree.map(lambda x: x.sharding, state))
    b, d = config.batch_size, config.data
    bsh = sharding.batch_sharding(mesh)
    key = jax.random.PRNGKey(1)
    batch = {"global_crops": jax.device_put(
                 jax.random.normal(key, (b, 2, d.global_crop_size, d.global_crop_size, 3)), bsh),
             "local_crops": jax.device_put(
                 jax.random.normal(key, (b, d.num_local_crops, d.local_crop_size, d.local_crop_size, 3)), bsh)}
    t0 = time.time()
    compiled = step.lower(state, batch).compile()
    return compiled, step, state, batch, models, time.time() - t0


def run_official(a, recipe: str, batch: int) -> float:
    """Images/s of one run of the official step (subprocess; same affinity and env)."""
    cmd = [a.official_python, a.official_bench, "--dino_dir", a.official, "--recipe", recipe,
           "--batch", str(batch), "--steps", str(a.official_steps), "--warmup", "1",
           "--threads", str(a.threads), "--device", a.official_device] + (["--fp16"] if a.official_fp16 else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: official step bench failed ({' '.join(cmd)}): {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"])


def time_loop(config, steps: int) -> tuple[float, float]:
    """(images/s, process CPU seconds per step) of ``steps`` steps of the training loop
    on the synthetic source, in a temporary workdir: log_every_steps warm-up steps
    (compilation) first, no periodic checkpoint or evaluation; timed from the first
    log step to the last step."""
    cfg = copy.deepcopy(config)
    warm = int(cfg.log_every_steps)
    cfg.data.source = "synthetic"
    cfg.total_steps = warm + steps
    cfg.checkpoint_every_steps = cfg.total_steps + 1
    for block in cfg.evals.values():
        block.every_epochs = -1       # no evaluation: the loop alone
    cpu_at = {}  # process CPU time at each sync point (on_sync runs after its work)

    def on_sync(step, checkpointer):  # noqa: ARG001
        cpu_at[step] = time.process_time()

    workdir = tempfile.mkdtemp(prefix="dino_bench_loop_")
    try:
        summary = trainer.train_and_evaluate(cfg, workdir, stream=io.StringIO(), on_sync=on_sync)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return float(summary["images_per_second"]), (cpu_at[cfg.total_steps] - cpu_at[warm]) / steps


def peak_tflops(dtype: str):
    kind = jax.devices()[0].device_kind
    for sub, dt, peak in PEAKS:
        if sub.lower() in kind.lower() and dt == dtype:
            return peak
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vit_s16.py", help="training config file")
    ap.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
    ap.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 | auto (default: the config's)")
    ap.add_argument("--num_local_crops", type=int, default=None, help="override data.num_local_crops")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    ap.add_argument("--fused_attention", action="store_true", help="model.fused_attention=True")
    ap.add_argument("--remat", action="store_true", help="model.remat=True")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: table)")
    ap.add_argument("--tiny", action="store_true", help="small CPU-sized model (smoke test)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                    help="the official anchor's recipe (model, crops, batch); overrides --config")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed repeats of --steps steps each (median reported); with --official "
                         "the official step, with --loop the training loop, runs between them")
    ap.add_argument("--loop", type=int, default=0, metavar="N",
                    help="also time N steps of the training loop (trainer.train_and_evaluate) on synthetic data "
                         "(after log_every_steps warm-up steps); 0: bare step only")
    ap.add_argument("--log_every_steps", type=int, default=None,
                    help="the loop's log interval (metrics fetch; default: the config's)")
    ap.add_argument("--official", default=None, metavar="DINO_DIR",
                    help="checkout of facebookresearch/dino: also time the official step (needs --recipe)")
    ap.add_argument("--official_bench", default=None, help="path of official_step_bench.py")
    ap.add_argument("--official_python", default=sys.executable,
                    help="python with torch + torchvision for the official step")
    ap.add_argument("--official_steps", type=int, default=3, help="timed official steps per repeat")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the official step")
    ap.add_argument("--official_device", default="cpu",
                    help="torch device of the official step: cpu | cuda (on a GPU host, beside ours)")
    ap.add_argument("--official_fp16", action="store_true",
                    help="the official step with its fp16 autocast + GradScaler (its --use_fp16)")
    a = ap.parse_args()
    if a.official and not (a.recipe and a.official_bench and os.path.isfile(a.official_bench)):
        sys.exit("error: --official needs --recipe and an existing --official_bench file")
    if a.steps < 1 or a.repeats < 1 or a.loop < 0:
        sys.exit("error: --steps and --repeats must be >= 1, --loop >= 0")

    config = recipe_config(a.recipe) if a.recipe else load_config(a.config)
    if a.tiny:
        config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          "configs", "quickstart.py"))
        config.batch_size = 32
    if a.batch_size:
        config.batch_size = a.batch_size
    if a.dtype:
        config.model.dtype = a.dtype
    config.model.dtype = jnp.dtype(train.compute_dtype(config)).name  # 'auto' -> this backend's
    if a.num_local_crops is not None:
        config.data.num_local_crops = a.num_local_crops
    config.model.fused_attention = a.fused_attention or config.model.fused_attention
    config.model.remat = a.remat or config.model.remat
    if a.log_every_steps:
        config.log_every_steps = a.log_every_steps
    cache_dir = None
    if a.repeats > 1 and a.loop:
        cache_dir = tempfile.mkdtemp(prefix="dino_bench_xla_cache_")
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    compiled, step, state, batch, models, compile_s = build_bare_step(config)
    backbone, head = models
    b, g, l, nl = (config.batch_size, config.data.global_crop_size, config.data.local_crop_size,
                   config.data.num_local_crops)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    acc = step.new_accumulator()
    for _ in range(2):
        state, m, acc = compiled(state, batch, step.schedule, acc)
    jax.block_until_ready(m)
    ours, ours_cpu, official, loop_ips, loop_cpu = [], [], [], [], []
    for _ in range(a.repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(a.steps):
            state, m, acc = compiled(state, batch, step.schedule, acc)
        jax.block_until_ready(m)
        ours.append((time.perf_counter() - t0) / a.steps)
        ours_cpu.append((time.process_time() - c0) / a.steps)
        if a.official:
            official.append(run_official(a, a.recipe, b))
        if a.loop:
            ips_loop, cpu_loop = time_loop(config, a.loop)
            loop_ips.append(ips_loop)
            loop_cpu.append(cpu_loop)
    dt = float(np.median(ours))
    flops_img = recipe_flops_per_image(config, backbone, head)
    ips = b / dt
    achieved = flops_img * ips / 1e12
    peak = a.peak_tflops or peak_tflops(str(config.model.dtype))
    mfu = achieved / (peak * jax.device_count()) if peak else None
    rows = [("device", f"{jax.device_count()} x {jax.devices()[0].device_kind}"),
            ("model", f"{config.model.arch} p{backbone.patch_size} d{backbone.embed_dim} x{backbone.depth}"),
            ("crops", f"2x{g} + {nl}x{l}"), ("global batch", b), ("dtype", config.model.dtype),
            ("compile (s)", f"{compile_s:.1f}"), ("step time (ms)", f"{dt * 1e3:.1f}"),
            ("images/s", f"{ips:.1f}"), ("images/s/device", f"{ips / jax.device_count():.1f}"),
            ("GFLOP/image (analytic)", f"{flops_img / 1e9:.2f}"),
            ("GFLOP/image (XLA)", f"{xla_flops / b / 1e9:.2f}"),
            ("achieved TFLOP/s", f"{achieved:.2f}"),
            ("MFU", f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown peak: --peak_tflops)"),
            ("loss", f"{float(m['loss']):.4f}")]
    try:  # GPU/TPU report the allocator's peak; XLA:CPU has no memory stats
        peak_bytes = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - optional backend feature
        peak_bytes = None
    if peak_bytes:
        rows.append(("peak device memory (GiB)", f"{peak_bytes / 2 ** 30:.2f}"))
    off_ips = float(np.median(official)) if official else None
    if off_ips:
        rows += [("repeats (ours, official)", f"{a.repeats} x {a.steps} steps, {a.repeats} x {a.official_steps} steps"),
                 ("images/s per repeat", " ".join(f"{b / t:.2f}" for t in ours)),
                 ("official images/s per repeat", " ".join(f"{v:.2f}" for v in official)),
                 ("official images/s (median)", f"{off_ips:.2f}"),
                 ("ratio ours / official", f"{ips / off_ips:.2f}"),
                 ("XLA_FLAGS", os.environ.get("XLA_FLAGS", "")),
                 ("LD_PRELOAD", os.environ.get("LD_PRELOAD", ""))]
    loop = float(np.median(loop_ips)) if loop_ips else None
    # The same comparison in process CPU time per step (user + sys, every thread): on a
    # shared machine wall-clock rates move with the other jobs' load, CPU time much less.
    cpu_ratio = float(np.median(ours_cpu)) / float(np.median(loop_cpu)) if loop_cpu else None
    if loop is not None:
        rows += [("loop images/s (trainer)", f"{loop:.1f}"),
                 ("loop / bare step", f"{loop / ips:.3f}"),
                 ("repeats (median)", f"{a.repeats}: bare {[round(b / x, 1) for x in ours]}, "
                                      f"loop {[round(x, 1) for x in loop_ips]}"),
                 ("CPU ms/step bare, loop", f"{[round(1e3 * x, 1) for x in ours_cpu]}, "
                                            f"{[round(1e3 * x, 1) for x in loop_cpu]}"),
                 ("loop / bare step (CPU time)", f"{cpu_ratio:.3f}")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps({"images_per_second": round(ips, 2), "step_ms": round(dt * 1e3, 2),
                      "gflop_per_image": round(flops_img / 1e9, 3), "mfu": mfu,
                      "device": jax.devices()[0].device_kind, "batch_size": b, "dtype": str(config.model.dtype),
                      "recipe": a.recipe, "official_images_per_second": off_ips,
                      "peak_memory_gib": round(peak_bytes / 2 ** 30, 3) if peak_bytes else None,
                      "ratio_vs_official": round(ips / off_ips, 3) if off_ips else None,
                      "loop_images_per_second": round(loop, 2) if loop is not None else None,
                      "loop_ratio": round(loop / ips, 4) if loop is not None else None,
                      "loop_ratio_cpu_time": round(cpu_ratio, 4) if cpu_ratio is not None else None}))
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""TPU pods checked without a TPU: compile the real train step ahead of time.

    python benchmarks/tpu_aot.py --topology v5e:4x4 --config configs/vit_s8.py \\
        [--batch_size N] [--num_fsdp K] [--dtype bfloat16] [--find_max_batch]

Runs on any CPU machine with libtpu importable (no TPU needed). It builds the
topology's compile-only devices (``jax.experimental.topologies``), the mesh and
shardings a real run on that slice uses (``dino_jax.sharding``,
``train.state_shardings``), the TrainState's shapes with ``jax.eval_shape``
(nothing is initialised) and compiles ``train.TrainStep`` (the step the
training loop runs) for them. It prints the compile time, per-chip HBM (arguments, outputs that do
not alias a donated argument, temporaries, code) against the chip's capacity,
whether it fits, XLA's FLOPs per image beside the analytic recipe count of
``benchmarks/train_step.py``, the collectives of the compiled program, and the
roofline bound on the step time (XLA's FLOPs and bytes accessed against the
chip's peak bf16 FLOP/s and HBM bandwidth, ``PEAK_TFLOPS`` / ``HBM_GBPS``) with
the images/s per chip it implies.
``--find_max_batch`` then searches the largest per-chip batch that fits (each
probe is one compile; the TPU compiler itself rejects programs that exceed the
chip's HBM). Table first; the last line is a JSON object.

libtpu: install the one that matches your jax in its own folder, so that
ordinary JAX processes do not probe for a TPU::

    pip install --target ~/.cache/dino_jax/libtpu "libtpu==0.0.42.*"   # jax 0.10.2 (what jax[tpu] pins)

This script puts ``--libtpu_dir`` (default ``$DINO_JAX_LIBTPU_DIR`` or
``~/.cache/dino_jax/libtpu``) on ``sys.path`` and runs JAX with
``JAX_PLATFORMS=cpu``. Compiling a recipe's multi-crop step takes minutes of CPU
time, and every ``--find_max_batch`` probe costs as much.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_LIBTPU_DIR = os.environ.get("DINO_JAX_LIBTPU_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "dino_jax", "libtpu")

# HBM per chip, from the Cloud TPU system-architecture pages:
#   v4:  "HBM2 capacity and bandwidth: 32 GiB, 1200 GBps"  https://cloud.google.com/tpu/docs/v4
#   v5e: "HBM capacity per chip: 16 GB"                    https://cloud.google.com/tpu/docs/v5e
#   v5p: "HBM capacity per chip (GiB): 95"                 https://cloud.google.com/tpu/docs/v5p-training
#   v6e: "HBM capacity per chip: 32 GB"                    https://cloud.google.com/tpu/docs/v6e
# (the compiler's own limit is a little lower, e.g. 15.75 GiB on v5e: the runtime
# keeps some; "fits" below is the compiler's verdict AND the total within this).
# Keyed by jax's device_kind of the topology's devices.
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v6 lite": 32.0}
# Peak dense bfloat16 FLOP/s and HBM bandwidth per chip, for the roofline bound on the
# step time: max(XLA FLOPs / peak FLOP/s, XLA bytes accessed / HBM bandwidth).
#   v4:  275 TFLOP/s bf16, 1228 GB/s    v5e: 197 TFLOP/s bf16, 819 GB/s
#   v5p: 459 TFLOP/s bf16, 2765 GB/s    v6e: 918 TFLOP/s bf16, 1640 GB/s
# (Cloud TPU system-architecture pages). The bound ignores collectives and
# assumes every FLOP at the bf16 peak, so a real step is slower.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6 lite": 918.0}
HBM_GBPS = {"TPU v4": 1228.0, "TPU v5 lite": 819.0, "TPU v5": 2765.0, "TPU v6 lite": 1640.0}
# Topology-name prefix -> (chip config, Cloud TPU accelerator-type prefix, TensorCores per chip).
# v4 and v5p have two TensorCores per chip that JAX drives as one device ("megacore").
CHIPS = {"v4": ("megacore", "v4", 2), "v5p": ("megacore", "v5p", 2), "v5": ("megacore", "v5p", 2),
         "v5e": ("default", "v5litepod", 1), "v6e": ("default", "v6e", 1)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
IMAGENET_TRAIN = 1281167  # schedule length: the recipe's epochs over ImageNet's train split
GIB = 2.0 ** 30


class UsageError(Exception):
    """Bad input: printed as one ``error:`` line, exit 2."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5e:4x4",
                    help="TPU slice as '<chip>:<shape>': v5e:2x2, v5e:4x4, v5e:16x16, v6e:4x4, "
                         "v4:2x2x2, v5p:2x2x4, ... (chips, not cores)")
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "vit_s16.py"),
                    help="training config file (configs/*.py)")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="GLOBAL batch (default: the config's batch_size); must be a multiple of "
                         "the number of chips")
    ap.add_argument("--num_fsdp", type=int, default=None,
                    help="chips per fsdp group: parameters and optimiser state split over them "
                         "(default: the config's num_fsdp; 1 = data parallel)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="compute dtype (model.dtype; default: the config's). Parameters stay float32")
    ap.add_argument("--remat", action="store_true", help="model.remat=True (rematerialise blocks)")
    ap.add_argument("--find_max_batch", action="store_true",
                    help="also search the largest per-chip batch that fits (one compile per probe)")
    ap.add_argument("--batch_step", type=int, default=8,
                    help="granularity of --find_max_batch in images per chip (default 8)")
    ap.add_argument("--max_per_chip", type=int, default=2048,
                    help="upper bound of --find_max_batch per chip (default 2048)")
    ap.add_argument("--steps_per_epoch", type=int, default=None,
                    help="schedule length per epoch (default: ImageNet's 1,281,167 images / global "
                         "batch; the schedules are step arguments held on every chip)")
    ap.add_argument("--dump_hlo", default=None,
                    help="write the compiled (optimised, partitioned) HLO text of the first compile here")
    ap.add_argument("--lowered_sha256", action="store_true",
                    help="print the SHA-256 of the lowered step (StableHLO, before compiling) and stop: "
                         "two checkouts with the same digest compile to the same program")
    ap.add_argument("--libtpu_dir", default=DEFAULT_LIBTPU_DIR,
                    help="folder holding the libtpu package (pip install --target DIR libtpu==...); "
                         f"default $DINO_JAX_LIBTPU_DIR or {DEFAULT_LIBTPU_DIR}")
    a = ap.parse_args(argv)
    if a.batch_size is not None and a.batch_size <= 0:
        ap.error(f"--batch_size must be > 0, got {a.batch_size}")
    if a.num_fsdp is not None and a.num_fsdp <= 0:
        ap.error(f"--num_fsdp must be > 0, got {a.num_fsdp}")
    if a.batch_step <= 0 or a.max_per_chip <= 0:
        ap.error("--batch_step and --max_per_chip must be > 0")
    return a


# --------------------------------------------------------------------------
# Environment: libtpu importable, JAX on CPU.
# --------------------------------------------------------------------------
def libtpu_pin() -> str:
    """The libtpu requirement of the installed jax's [tpu] extra, e.g. 'libtpu==0.0.42.*'."""
    try:
        for req in importlib.metadata.requires("jax") or []:
            if req.startswith("libtpu"):
                return req.split(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    return "libtpu"


def setup_environment(libtpu_dir: str, topology: str) -> None:
    """Before jax is imported: JAX on CPU, libtpu found in ``libtpu_dir``, and the
    Cloud-TPU metadata probes libtpu makes on start-up answered locally (this is not
    a TPU VM; without them it prints a screen of warnings)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if not os.path.isfile(os.path.join(libtpu_dir, "libtpu", "__init__.py")):
        raise UsageError(
            f"libtpu not found in {libtpu_dir}: install it there with  "
            f"pip install --target {libtpu_dir} \"{libtpu_pin()}\"  (or pass --libtpu_dir / "
            f"set DINO_JAX_LIBTPU_DIR)")
    sys.path.insert(0, libtpu_dir)
    pin, have = libtpu_pin(), installed_libtpu_version(libtpu_dir)
    m = re.fullmatch(r"libtpu==([0-9.]+?)\.?\*?", pin)
    if m and not (have == m.group(1) or have.startswith(m.group(1) + ".")):
        print(f"warning: libtpu {have} in {libtpu_dir}, but this jax pins {pin}; compiles may fail "
              f"(pip install --upgrade --target {libtpu_dir} \"{pin}\")", file=sys.stderr)
    chip = topology.split(":")[0]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; these
    # processes only compile, so several may run at once (tests, a benchmark sweep).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if chip in CHIPS and re.fullmatch(r"[0-9]+(x[0-9]+)*", topology.split(":", 1)[-1]):
        n = 1
        for d in topology.split(":", 1)[1].split("x"):
            n *= int(d)
        _, accel, cores = CHIPS[chip]
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{accel}-{n * cores}")


# JAX and the dino_jax modules that import it: bound by import_jax() once
# setup_environment() has run (JAX_PLATFORMS and libtpu must be in place first, and
# the search and roofline helpers below are usable without JAX).
jax = jnp = topologies = schedules = sharding = train = None


def import_jax() -> None:
    """Import JAX and the dino_jax modules into this module (after setup_environment)."""
    global jax, jnp, topologies, schedules, sharding, train  # noqa: PLW0603
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.experimental import topologies  # noqa: PLC0415

    from dino_jax import schedules, sharding, train  # noqa: PLC0415


def installed_libtpu_version(libtpu_dir: str) -> str:
    for name in os.listdir(libtpu_dir):
        m = re.fullmatch(r"libtpu-(.+)\.dist-info", name)
        if m:
            return m.group(1)
    return "unknown"


# --------------------------------------------------------------------------
# Config, mesh, abstract arguments.
# --------------------------------------------------------------------------
def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(path):
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    return load_module(path, "aot_config").get_config()


def topology_devices(name: str):
    chip = name.split(":")[0]
    if chip not in CHIPS:
        raise UsageError(f"--topology {name!r}: unknown chip {chip!r}; use one of "
                         f"{', '.join(sorted(CHIPS))} as in v5e:4x4 or v4:2x2x2")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            chip_config_name=CHIPS[chip][0])
    except jax.errors.JaxRuntimeError as e:
        msg = str(e).splitlines()[0]
        raise UsageError(f"--topology {name!r} rejected by libtpu: {msg}") from None
    return list(topo.devices)


def make_mesh(devices, num_fsdp: int):
    try:
        return sharding.make_mesh(num_fsdp, devices)
    except ValueError as e:
        raise UsageError(f"--num_fsdp: {e}") from None


def abstract_arguments(config, mesh, models, optimizer, steps_per_epoch):
    """ShapeDtypeStructs (with shardings) of the step's (state, batch, schedule)."""

    backbone, head = models

    def init(key):
        return train.train_state_from_params(train.init_student_params(backbone, head, key),
                                             head.out_dim, optimizer, key)

    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state_shape = jax.eval_shape(init, key)
    state_sh = train.state_shardings(state_shape, mesh)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         state_shape, state_sh)
    b, d = int(config.batch_size), config.data
    bsh = sharding.batch_sharding(mesh)
    batch = {"global_crops": jax.ShapeDtypeStruct((b, 2, d.global_crop_size, d.global_crop_size, 3),
                                                  jnp.float32, sharding=bsh)}
    if int(d.num_local_crops) > 0:
        batch["local_crops"] = jax.ShapeDtypeStruct(
            (b, int(d.num_local_crops), d.local_crop_size, d.local_crop_size, 3), jnp.float32, sharding=bsh)
    sched = schedules.device_schedules(schedules.build_schedules(config, steps_per_epoch))
    repl = sharding.replicated(mesh)
    sched = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=repl) for k, v in sched.items()}
    return state, state_sh, batch, sched


# --------------------------------------------------------------------------
# One compile and what it says.
# --------------------------------------------------------------------------
def count_collectives(hlo_text: str) -> dict:
    """Collective instructions in a compiled HLO module's text (sync ops and the
    ``-start`` halves of async pairs; ops inside fusions included)."""
    found = re.findall(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)
    return {c: found.count(c) for c in COLLECTIVES}


_SIZE = r"([0-9.]+)([KMGT]?)i?B?"


def _bytes(num, unit):
    return float(num) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit]


def parse_oom(msg: str) -> dict:
    """Required/available bytes from the TPU compiler's out-of-memory message, e.g.
    'the total memory required for HLO temporaries (16.00G) exceeds available HBM (15.75G)'
    or 'Used 20.5G of 15.48G hbm'. Missing numbers are None."""
    out = {"required": None, "available": None}
    m = re.search(r"required[^(]*\(" + _SIZE + r"\).*available HBM \(" + _SIZE + r"\)", msg)
    if m:
        out["required"], out["available"] = _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4))
        return out
    m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", msg)
    if m:
        out["required"], out["available"] = _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4))
    return out


def lower_step(config, mesh, models, optimizer, steps_per_epoch):
    """The real train step for ``mesh``, lowered (not compiled)."""
    try:
        sharding.check_batch_size(int(config.batch_size), mesh)
    except ValueError as e:
        raise UsageError(f"--batch_size: {e}") from None
    state, state_sh, batch, sched = abstract_arguments(config, mesh, models, optimizer, steps_per_epoch)
    step = train.TrainStep(config, sched, mesh=mesh, state_sharding=state_sh, models=models,
                           optimizer=optimizer)
    return step.lower(state, batch)


def compile_step(config, mesh, models, optimizer, steps_per_epoch, capacity_bytes, dump_hlo=None):
    """Compile the real train step for ``mesh``; a dict of what came out."""
    lowered = lower_step(config, mesh, models, optimizer, steps_per_epoch)
    t0 = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        oom = parse_oom(msg)
        return {"fits": False, "compile_s": time.time() - t0, "oom": msg.splitlines()[0][:300],
                "hbm_total_bytes": oom["required"], "compiler_hbm_limit_bytes": oom["available"]}
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    total = args + (out - alias) + temp + code
    hlo = compiled.as_text()
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(hlo)
    return {"fits": total <= capacity_bytes, "compile_s": compile_s,
            "argument_bytes": args, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "code_bytes": code, "hbm_total_bytes": total,
            "flops_per_chip": float(cost.get("flops", 0.0)) if cost else 0.0,
            "bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)) if cost else 0.0,
            "collectives": count_collectives(hlo)}


def linear_max_batch(res: dict, per_chip: int, batch_bytes_per_image: int, capacity: float):
    """Uncompiled estimate of the largest per-chip batch from one compile: HBM as
    fixed (arguments other than the crops, code, un-aliased outputs) + per image
    (the crops + temporaries / batch). Temporaries that do not grow with the batch
    (gradients, optimiser updates) count as per-image here, so this leans low.
    None when the compile did not fit."""
    if "temp_bytes" not in res or per_chip <= 0:
        return None
    crops = batch_bytes_per_image * per_chip
    fixed = res["hbm_total_bytes"] - res["temp_bytes"] - crops
    per_image = (res["temp_bytes"] + crops) / per_chip
    return int((capacity - fixed) // per_image) if per_image > 0 else None


def analytic_flops_per_image(config, models):
    """The recipe FLOP count of benchmarks/train_step.py (student fwd+bwd on all crops,
    teacher fwd on the globals, heads included)."""
    mod = load_module(os.path.join(REPO, "benchmarks", "train_step.py"), "train_step_bench")
    return float(mod.recipe_flops_per_image(config, *models))


def find_max_batch(probe, start: int, step: int, upper: int, capacity: float, known: dict):
    """Largest per-chip batch (a multiple of ``step``, <= ``upper``) whose compile fits.

    ``probe(b) -> result dict`` (``fits``, ``hbm_total_bytes`` or None); ``known``
    holds results already compiled (updated in place). The search keeps the bracket
    [largest fitting, smallest failing]; the next probe is the batch where a line
    through two probes' HBM totals reaches ``capacity`` (the bracket's ends when both
    have totals, else the last two probes), clipped inside the bracket, and at most
    double / half the last fitting / failing batch while one end is missing. It stops
    when the bracket is one ``step`` wide, so the answer is compiled on both sides.
    Returns (largest fitting per-chip batch or 0, the probed batches in order).
    """
    order = list(known)

    def run(b):
        if b not in known:
            known[b] = probe(b)
            order.append(b)
        return known[b]["fits"]

    def total(b):
        return known[b].get("hbm_total_bytes")

    def predict(lo, hi):
        pts = [x for x in (lo, hi) if x and total(x)]
        if len(pts) < 2:
            pts = [x for x in order if total(x)][-2:]
        if len(pts) < 2 or pts[0] == pts[1]:
            return None
        (x0, x1) = pts
        slope = (total(x1) - total(x0)) / (x1 - x0)
        if slope <= 0:
            return None
        return int(x0 + (capacity - total(x0)) / slope) // step * step

    lo, hi = 0, None
    b = max(step, start // step * step)
    while True:
        if run(b):
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if hi is not None and hi - lo <= step:
            break
        if hi is None and lo >= upper:
            break
        guess = predict(lo, hi)
        if hi is None:      # everything fitted so far: grow, at most doubling
            nxt = min(upper, 2 * lo, max(guess or 2 * lo, lo + step))
        elif lo == 0:       # nothing fitted yet: shrink, at most halving
            nxt = min(hi - step, max(hi // 2 // step * step, guess or 0, step))
        else:
            nxt = guess if guess is not None else (lo + hi) // 2 // step * step
            nxt = min(max(nxt, lo + step), hi - step)
        nxt = nxt // step * step
        if nxt <= 0 or nxt in known:  # cannot happen for a monotone fit; never loop
            break
        b = nxt
    return lo, order


def roofline(flops: float, bytes_accessed: float, kind: str, per_chip_batch: int) -> dict | None:
    """The roofline bound on one step's time per chip from XLA's FLOPs and bytes
    accessed against the chip's peak FLOP/s and HBM bandwidth, and the images/s per
    chip it implies (an upper bound). None without a cost analysis or chip figures."""
    if not flops or kind not in PEAK_TFLOPS:
        return None
    compute_s = flops / (PEAK_TFLOPS[kind] * 1e12)
    memory_s = bytes_accessed / (HBM_GBPS[kind] * 1e9)
    bound = max(compute_s, memory_s)
    return {"compute_s": compute_s, "memory_s": memory_s, "step_s": bound,
            "bound_by": "compute" if compute_s >= memory_s else "memory",
            "images_per_second_per_chip": per_chip_batch / bound}


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------
def gib(x):
    return "n/a" if x is None else f"{x / GIB:.2f} GiB"


def main(argv=None):
    a = parse_args(argv)
    setup_environment(a.libtpu_dir, a.topology)
    import_jax()

    config = load_config(a.config)
    if a.dtype:
        config.model.dtype = a.dtype
    if a.remat:
        config.model.remat = True
    if a.num_fsdp is not None:
        config.num_fsdp = a.num_fsdp
    devices = topology_devices(a.topology)
    n = len(devices)
    kind = devices[0].device_kind
    if kind not in HBM_GIB:
        raise UsageError(f"no HBM capacity known for {kind!r} (add it to HBM_GIB)")
    capacity = HBM_GIB[kind] * GIB
    mesh = make_mesh(devices, int(config.num_fsdp))
    if a.batch_size is not None:
        config.batch_size = a.batch_size
    if int(config.batch_size) % n:
        raise UsageError(f"--batch_size: global batch {config.batch_size} is not divisible by the "
                         f"{n} chips of {a.topology}: use a multiple of {n}")
    models = train.build_models(config)
    optimizer = train.make_optimizer(config)

    def steps_per_epoch():
        return a.steps_per_epoch or max(1, IMAGENET_TRAIN // int(config.batch_size))

    if a.lowered_sha256:
        text = lower_step(config, mesh, models, optimizer, steps_per_epoch()).as_text()
        print(f"lowered step sha256 {hashlib.sha256(text.encode()).hexdigest()} ({len(text)} characters)")
        return 0

    def probe(per_chip):
        config.batch_size = per_chip * n
        r = compile_step(config, mesh, models, optimizer, steps_per_epoch(), capacity, None if known else a.dump_hlo)
        print(f"  compiled per-chip batch {per_chip:5d}: {'fits' if r['fits'] else 'does not fit'}, "
              f"HBM {gib(r.get('hbm_total_bytes'))}, {r['compile_s']:.0f} s", file=sys.stderr, flush=True)
        return r

    per_chip = int(config.batch_size) // n
    known: dict = {}
    res = known[per_chip] = probe(per_chip)
    max_batch, probes = None, None
    if a.find_max_batch:
        max_batch, probes = find_max_batch(probe, per_chip, a.batch_step, a.max_per_chip, capacity, known)
    config.batch_size = per_chip * n
    flops_img = res["flops_per_chip"] / per_chip if res.get("flops_per_chip") else None
    analytic = analytic_flops_per_image(config, models)
    d = config.data
    image_bytes = 4 * 3 * (2 * d.global_crop_size ** 2 + int(d.num_local_crops) * d.local_crop_size ** 2)
    estimate = linear_max_batch(res, per_chip, image_bytes, capacity)
    roof = roofline(res.get("flops_per_chip"), res.get("bytes_accessed_per_chip") or 0.0, kind, per_chip)
    backbone = models[0]
    coll = res.get("collectives") or {}
    rows = [("device", "CPU host compiling for TPU (libtpu " + installed_libtpu_version(a.libtpu_dir)
             + f", jax {jax.__version__})"),
            ("topology", f"{a.topology}: {n} x {kind}, {HBM_GIB[kind]:g} GiB HBM per chip"),
            ("mesh (data x fsdp)", f"{mesh.shape['data']} x {mesh.shape['fsdp']}"),
            ("model", f"{config.model.arch} p{backbone.patch_size} d{backbone.embed_dim} x{backbone.depth}"
                      f", head K={models[1].out_dim}"),
            ("crops", f"2x{d.global_crop_size} + {d.num_local_crops}x{d.local_crop_size}"),
            ("global batch", f"{config.batch_size} ({per_chip} per chip)"),
            ("dtype / remat", f"{config.model.dtype} / {bool(config.model.remat)}"),
            ("compile (s)", f"{res['compile_s']:.1f}")]
    if "argument_bytes" in res:
        rows += [("HBM arguments / chip", gib(res["argument_bytes"])),
                 ("HBM outputs not aliased", gib(res["output_bytes"] - res["alias_bytes"])),
                 ("HBM temporaries / chip", gib(res["temp_bytes"])),
                 ("HBM code / chip", gib(res["code_bytes"]))]
    else:
        rows += [("compiler", res["oom"])]
    rows += [("HBM total / capacity", f"{gib(res.get('hbm_total_bytes'))} / {gib(capacity)}"),
             ("fits", "yes" if res["fits"] else "NO"),
             ("GFLOP/image (XLA)", f"{flops_img / 1e9:.2f}" if flops_img else "n/a"),
             ("GFLOP/image (analytic)", f"{analytic / 1e9:.2f}"),
             ("collectives", ", ".join(f"{k} {v}" for k, v in coll.items()) or "n/a")]
    if roof:
        rows += [("roofline step time (ms)",
                  f"{roof['step_s'] * 1e3:.1f} ({roof['bound_by']}-bound: {roof['compute_s'] * 1e3:.1f} ms of "
                  f"FLOPs at {PEAK_TFLOPS[kind]:g} TFLOP/s, {roof['memory_s'] * 1e3:.1f} ms of "
                  f"{res['bytes_accessed_per_chip'] / GIB:.1f} GiB at {HBM_GBPS[kind]:g} GB/s)"),
                 ("roofline images/s per chip", f"{roof['images_per_second_per_chip']:.0f} (upper bound)")]
    rows.append(("max batch/chip, linear est.", f"{estimate} (from this one compile; not compiled)"
                 if estimate is not None else "n/a"))
    if a.find_max_batch:
        rows.append(("max batch per chip", f"{max_batch} (step {a.batch_step}; probed {probes})"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    summary = {
        "topology": a.topology, "chips": n, "device_kind": kind, "config": os.path.basename(a.config),
        "num_fsdp": int(mesh.shape["fsdp"]), "dtype": str(config.model.dtype),
        "remat": bool(config.model.remat), "global_batch": int(config.batch_size),
        "per_chip_batch": per_chip, "compile_s": round(res["compile_s"], 1), "fits": bool(res["fits"]),
        "hbm_capacity_bytes": int(capacity),
        "hbm_total_bytes": res.get("hbm_total_bytes"),
        "argument_bytes": res.get("argument_bytes"), "temp_bytes": res.get("temp_bytes"),
        "output_bytes": res.get("output_bytes"), "alias_bytes": res.get("alias_bytes"),
        "code_bytes": res.get("code_bytes"),
        "xla_flops_per_image": flops_img, "analytic_flops_per_image": analytic,
        "xla_bytes_accessed_per_chip": res.get("bytes_accessed_per_chip"),
        "roofline_step_s": roof["step_s"] if roof else None,
        "roofline_bound_by": roof["bound_by"] if roof else None,
        "roofline_images_per_second_per_chip": roof["images_per_second_per_chip"] if roof else None,
        "collectives": coll, "oom": res.get("oom"),
        "est_max_per_chip_batch": estimate, "max_per_chip_batch": max_batch, "max_batch_probes": probes,
        "libtpu": installed_libtpu_version(a.libtpu_dir), "jax": jax.__version__}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

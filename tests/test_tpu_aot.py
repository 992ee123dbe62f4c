"""benchmarks/tpu_aot.py: the real train step compiled ahead of time for a TPU slice
(v5e:2x2) on this CPU machine, with libtpu from its own folder (see the script's doc;
.ci/run installs it). A tiny ViT so each compile takes seconds."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "tpu_aot.py")

TINY_CONFIG = '''
from dino_jax.config_defaults import base_config

def get_config():
    c = base_config()
    c.model.arch = "custom"
    c.model.embed_dim, c.model.depth, c.model.num_heads = 64, 2, 2  # a full block and the CLS-only last one
    c.model.patch_size, c.model.img_size = 8, 32
    c.model.out_dim, c.model.head_hidden_dim, c.model.head_bottleneck_dim = 256, 128, 32
    c.data.global_crop_size, c.data.local_crop_size, c.data.num_local_crops = 32, 16, 2
    c.batch_size = 16
    c.epochs = 2
    return c
'''
CHIPS = 4          # v5e:2x2
STEPS_PER_EPOCH = 10


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _start(args):
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "tiny_aot.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def _tiny_state_bytes(config_path):
    """Logical bytes of the tiny TrainState (student, teacher, Adam moments, ...)."""
    spec = importlib.util.spec_from_file_location("tiny_aot_cfg", config_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    backbone, head = models = train.build_models(config)
    opt = train.make_optimizer(config)
    shape = jax.eval_shape(
        lambda k: train.train_state_from_params(train.init_student_params(backbone, head, k),
                                                head.out_dim, opt, k),
        jax.ShapeDtypeStruct((2,), jnp.uint32))
    del models
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shape))


def test_tpu_aot_compiles_tiny_step_for_v5e_dp_and_fsdp(tiny_config):
    common = ["--topology", "v5e:2x2", "--config", tiny_config,
              "--steps_per_epoch", str(STEPS_PER_EPOCH)]
    # Both compiles at once: each is mostly single-threaded XLA passes.
    procs = {"dp": _start(common), "fsdp": _start(common + ["--num_fsdp", "4"])}
    res = {}
    for name, p in procs.items():
        rc, out, err = _finish(p)
        assert rc == 0, f"{name}: rc {rc}\n{out[-2000:]}\n{err[-3000:]}"
        res[name] = json.loads(out.strip().splitlines()[-1])

    state_bytes = _tiny_state_bytes(tiny_config)
    batch_per_chip = 16 // CHIPS
    crop_bytes = batch_per_chip * (2 * 32 * 32 * 3 + 2 * 16 * 16 * 3) * 4
    for name, r in res.items():
        assert r["chips"] == CHIPS and r["device_kind"] == "TPU v5 lite", r
        assert r["per_chip_batch"] == batch_per_chip and r["global_batch"] == 16
        assert r["hbm_capacity_bytes"] == 16 * 2 ** 30       # v5e: 16 GiB per chip
        assert r["fits"] is True and r["oom"] is None
        assert r["hbm_total_bytes"] >= r["argument_bytes"] + r["temp_bytes"] > 0
        # Donated state: (almost) every output buffer aliases an argument.
        assert r["alias_bytes"] > 0.9 * r["output_bytes"] > 0
        # XLA counts per chip; the script divides by the per-chip batch. The analytic count
        # covers the matmuls only, so XLA is somewhat above it (elementwise, softmax, Adam):
        # within [1.0, 1.5] x here. Per global batch would be 1/4, per chip without the
        # division 4x: both outside.
        ratio = r["xla_flops_per_image"] / r["analytic_flops_per_image"]
        assert 1.0 <= ratio <= 1.5, (name, ratio)
        assert r["est_max_per_chip_batch"] >= batch_per_chip    # it fits, so at least this
        # Roofline on v5e (197 TFLOP/s bf16, 819 GB/s): the slower of compute and HBM traffic.
        flops = r["xla_flops_per_image"] * batch_per_chip
        bound = max(flops / 197e12, r["xla_bytes_accessed_per_chip"] / 819e9)
        assert r["roofline_step_s"] == pytest.approx(bound, rel=1e-6) and bound > 0
        assert r["roofline_images_per_second_per_chip"] == pytest.approx(batch_per_chip / bound, rel=1e-6)
    assert res["dp"]["num_fsdp"] == 1 and res["fsdp"]["num_fsdp"] == 4
    # Data parallel: the whole state on every chip (TPU tiling pads small tensors, so
    # the buffers are at least the logical bytes) and the gradients all-reduced.
    dp = res["dp"]
    assert dp["argument_bytes"] >= state_bytes + crop_bytes
    assert dp["xla_bytes_accessed_per_chip"] >= state_bytes  # the step reads the whole state
    assert dp["collectives"]["all-reduce"] >= 1
    assert dp["collectives"]["all-gather"] == 0
    # fsdp over the 4 chips: large tensors split (less argument HBM per chip than data
    # parallel), parameters all-gathered for the forward/backward.
    fs = res["fsdp"]
    assert fs["argument_bytes"] < dp["argument_bytes"]
    assert fs["collectives"]["all-gather"] >= 1
    assert fs["xla_flops_per_image"] == pytest.approx(dp["xla_flops_per_image"], rel=0.05)


def test_lowered_sha256_is_the_same_for_the_same_program(tiny_config):
    """--lowered_sha256 digests the lowered step without compiling: the same arguments give
    the same digest in two processes, and --remat (another program) a different one."""
    common = ["--topology", "v5e:2x2", "--config", tiny_config, "--lowered_sha256"]
    procs = [_start(common), _start(common), _start(common + ["--remat"])]
    digests = []
    for p in procs:
        rc, out, err = _finish(p)
        assert rc == 0, f"rc {rc}\n{out[-2000:]}\n{err[-3000:]}"
        m = re.fullmatch(r"lowered step sha256 ([0-9a-f]{64}) \(\d+ characters\)", out.strip().splitlines()[-1])
        assert m, out
        digests.append(m.group(1))
    assert digests[0] == digests[1] != digests[2]


def test_tpu_aot_bad_input_one_error_line(tiny_config, tmp_path):
    cases = {
        "topology": (["--topology", "v5e:3x3"], ["--topology 'v5e:3x3'"]),
        "batch": (["--topology", "v5e:2x2", "--batch_size", "18"], ["not divisible by the 4 chips"]),
        "libtpu": (["--libtpu_dir", str(tmp_path / "none")], ["pip install --target", "libtpu=="]),
    }
    procs = {k: _start(args + ["--config", tiny_config]) for k, (args, _) in cases.items()}
    for k, p in procs.items():
        rc, out, err = _finish(p, timeout=120)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 2, (k, rc, err[-2000:])
        assert len(lines) == 1 and all(s in lines[0] for s in cases[k][1]), (k, err[-2000:])
        assert "Traceback" not in err


def _load_script():
    spec = importlib.util.spec_from_file_location("tpu_aot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)   # imports no jax at module level
    return mod


def test_roofline_bound():
    """Compute-bound and memory-bound cases on the stated chip figures."""
    aot = _load_script()
    r = aot.roofline(275e12, 1228e9 / 2, "TPU v4", 64)   # 1 s of FLOPs, 0.5 s of HBM traffic
    assert r["bound_by"] == "compute" and r["step_s"] == pytest.approx(1.0)
    assert r["images_per_second_per_chip"] == pytest.approx(64.0)
    r = aot.roofline(197e12, 2 * 819e9, "TPU v5 lite", 32)  # 1 s of FLOPs, 2 s of HBM traffic
    assert r["bound_by"] == "memory" and r["step_s"] == pytest.approx(2.0)
    assert r["images_per_second_per_chip"] == pytest.approx(16.0)
    assert aot.roofline(0.0, 1e9, "TPU v4", 8) is None


@pytest.mark.parametrize("start,slope,power", [(32, 1e8, 1.0), (512, 1e8, 1.0), (32, 1e7, 1.0),
                                               (32, 1e8, 1.3), (32, 2e9, 1.0)])
def test_find_max_batch_search(start, slope, power):
    """The search on a made-up HBM curve (args 1 GB + slope * batch^power, 16 GB chip)
    finds the exact largest fitting multiple of 8, compiled on both sides of it."""
    aot = _load_script()
    cap, step, upper = 16e9, 8, 2048
    need = lambda b: 1e9 + slope * b ** power  # noqa: E731
    probe = lambda b: {"fits": need(b) <= cap, "hbm_total_bytes": need(b)}  # noqa: E731
    best, order = aot.find_max_batch(probe, start, step, upper, cap, {start: probe(start)})
    truth = max([b for b in range(step, upper + 1, step) if need(b) <= cap] or [0])
    assert best == truth
    if truth:
        assert truth in order
    if truth < upper:
        assert truth + step in order
    assert len(order) <= 9

"""The same train step on 1 device and on 8 simulated CPU devices (data-parallel,
and with parameters/optimiser state split over an 'fsdp' axis) gives the same
state within 1e-5.

The simulated devices need XLA_FLAGS before jax is imported, so the comparison
runs in a subprocess (XLA_FLAGS in its environment): this file executed as a
script is the worker.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dino_jax import schedules, sharding, train
from dino_jax.config_defaults import base_config
from official_fixtures import state_rel_err

NUM_DEVICES = 8
STEPS = 3
TOL = 1e-5


def _config():
    c = base_config()
    c.update(dict(
        model=dict(arch="custom", patch_size=4, embed_dim=16, depth=2, num_heads=2, img_size=16,
                   drop_path_rate=0.1, out_dim=32, norm_last_layer=False, head_nlayers=3,
                   head_hidden_dim=24, head_bottleneck_dim=8, dtype="float32"),
        batch_size=8, epochs=3, total_steps=0, lr=0.1, min_lr=1e-4, warmup_epochs=1,
        weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.9, clip_grad=0.5,
        freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.07,
        warmup_teacher_temp_epochs=2, student_temp=0.1, center_momentum=0.9, seed=0, num_fsdp=1))
    return c


def _worker():
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    config = _config()
    sched = schedules.build_schedules(config, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    batches = [{"global_crops": rng.normal(size=(8, 2, 16, 16, 3)).astype(np.float32),
                "local_crops": rng.normal(size=(8, 3, 8, 8, 3)).astype(np.float32)}
               for _ in range(STEPS)]
    fresh = jax.device_get(train.create_train_state(config))
    # Biases and norms perturbed away from 0/1 (as in the official fixtures), so the
    # relative comparison is not of tensors that only hold a few Adam steps.
    noise = np.random.default_rng(1)
    student = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * noise.standard_normal(x.shape).astype(x.dtype)
        if x.ndim == 1 or str(p[-1]) == "['bias']" else x, fresh.student)
    init = fresh.replace(student=student, teacher=student)
    out = {}

    def run(mesh, num_fsdp):
        # Tiny tensors split too, to exercise fsdp.
        st_shape = jax.eval_shape(lambda: init)
        st_sh = train.state_shardings(st_shape, mesh, num_fsdp=num_fsdp, min_fsdp_size=0)
        state = jax.device_put(init, st_sh)
        step = train.TrainStep(config, sched, mesh=mesh, state_sharding=st_sh)
        losses, acc = [], step.new_accumulator()
        for b in batches:
            state, m, acc = step(state, jax.device_put(b, sharding.batch_sharding(mesh)), acc)
            losses.append(float(m["loss"]))
        n_split = sum(1 for x in jax.tree.leaves(state)
                      if any(a is not None for a in x.sharding.spec))
        return jax.device_get(state), losses, n_split

    ref, ref_loss, _ = run(sharding.make_mesh(1, jax.devices()[:1]), 1)
    out["fsdp_init_equal"] = bool(all(
        np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(jax.device_get(train.create_train_state(
                config, mesh=sharding.make_mesh(4), min_fsdp_size=0))), jax.tree.leaves(fresh))))
    for label, num_fsdp in (("dp8", 1), ("fsdp2x4", 4)):
        state, loss, n_split = run(sharding.make_mesh(num_fsdp), num_fsdp)
        errs = [state_rel_err(p, a, b, config.model.embed_dim) for (p, a), b in
                zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(ref))]
        if os.environ.get("DEBUG_SHARDING"):
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref)[0]]
            for p, e in sorted(zip(paths, errs), key=lambda t: -t[1])[:8]:
                print(label, p, e)

        out[label] = {"max_rel_err": max(errs), "n_split": n_split, "loss": loss,
                      "step": int(state.step), "same_tree": jax.tree.structure(state) == jax.tree.structure(ref)}
    out["ref_loss"] = ref_loss
    out["moved"] = float(np.max(np.abs(ref.student["head"]["last_layer"]["weight_v"]
                                       - init.student["head"]["last_layer"]["weight_v"])))
    mesh8 = sharding.make_mesh(1)
    step8 = train.TrainStep(config, sched, mesh=mesh8)
    bad = {k: v[:4].repeat(3, axis=0) for k, v in batches[0].items()}  # 12 images
    try:
        step8(init, bad, step8.new_accumulator())
        out["bad_batch"] = None
    except ValueError as e:
        out["bad_batch"] = str(e)
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def multi_device_result():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("label", ["dp8", "fsdp2x4"])
def test_multi_device_matches_single_device(multi_device_result, label):
    r = multi_device_result[label]
    assert r["same_tree"] and r["step"] == STEPS
    assert r["max_rel_err"] < TOL, r
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(r["loss"], multi_device_result["ref_loss"]))
    if label.startswith("fsdp"):
        assert r["n_split"] > 10  # parameters and moments really are split over 'fsdp'
    else:
        assert r["n_split"] == 0


def test_fsdp_init_equals_unsharded_init(multi_device_result):
    assert multi_device_result["fsdp_init_equal"]


def test_training_moved_the_state(multi_device_result):
    # The comparison is not between untouched states: the last layer (frozen in
    # epoch 0) trained in the later steps.
    assert multi_device_result["moved"] > 1e-3


def test_indivisible_batch_is_one_clear_error(multi_device_result):
    msg = multi_device_result["bad_batch"]
    assert msg and "\n" not in msg and "12" in msg and "8 devices" in msg


def test_fsdp_spec_rules():
    assert sharding.fsdp_spec((384, 1152), 4, min_size=0) == P(None, "fsdp")
    assert sharding.fsdp_spec((6, 10), 4, min_size=0) == P()          # nothing divisible
    assert sharding.fsdp_spec((384, 1152), 1, min_size=0) == P()      # no fsdp
    assert sharding.fsdp_spec((8, 8), 4) == P()                       # small: replicated
    assert sharding.fsdp_spec((1, 65536), 8) == P(None, "fsdp")


if __name__ == "__main__":
    _worker()

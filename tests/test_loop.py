"""The training loop (``trainer.train_and_evaluate``) on the on-device synthetic source:

- between two sync points (log step, epoch end, checkpoint, end) the loop makes
  no device-to-host read and waits for nothing (counted: every implicit or
  explicit read of a jax.Array's value goes through ``ArrayImpl._value``;
  ``jax.transfer_guard`` does not fire on the CPU backend);
- the loop runs ``train.TrainStep`` itself: its checkpoint equals, bit for
  bit, the bare step applied to the same synthetic batches;
- a non-finite loss inside a log interval stops at the log step with the first
  bad step named, and the checkpoint is the last good state;
- TensorFlow is never imported.

Runs in a subprocess (this file executed as a script is the worker), so the
``sys.modules`` check sees a fresh process.
"""
import json
import os
import subprocess
import sys
import time
import traceback

import jax
import numpy as np
import pytest
from jax._src import array

from dino_jax import checkpoint, schedules, sharding, train, trainer
from dino_jax.config_defaults import base_config
from dino_jax.data import synthetic
from dino_jax.trainer import DevicePrefetcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    c = base_config()
    m = c.model
    m.arch, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.img_size = "custom", 4, 16, 1, 2, 16
    m.drop_path_rate, m.out_dim, m.head_hidden_dim, m.head_bottleneck_dim = 0.1, 32, 24, 8
    d = c.data
    d.source, d.synthetic_num_examples = "synthetic", 8 * 100
    d.global_crop_size, d.local_crop_size, d.num_local_crops = 16, 8, 2
    c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 12, 4, 1000
    c.warmup_epochs, c.freeze_last_layer, c.lr = 0.0, 0, 0.002
    for k, v in overrides.items():
        c[k] = v
    return c


def _worker(tmp):
    # Identical programs (the loop's step and the bare one, both NaN-run steps) compile once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    out = {}
    # 1. Count device-to-host reads and waits inside and outside the sync-free stretches:
    # a stretch opens at each on_sync call (the loop's start and every sync point but the
    # last) and closes at the loop's next jax.device_get, the sync point's one fetch.
    counts = {"inside": 0, "outside": 0, "stretches": 0}
    where = {"in": False}
    value = array.ArrayImpl._value
    block = array.ArrayImpl.block_until_ready
    device_get = jax.device_get

    def counted_value(self):
        counts["inside" if where["in"] else "outside"] += 1
        if where["in"] and os.environ.get("DEBUG_LOOP_TEST"):
            traceback.print_stack()
        return value.fget(self)

    def counted_block(self):
        counts["inside" if where["in"] else "outside"] += 1
        return block(self)

    def counted_device_get(x):
        if where["in"]:
            counts["stretches"] += 1
            where["in"] = False
        return device_get(x)

    config = _config()

    def on_sync(step, checkpointer):  # noqa: ARG001
        where["in"] = step < config.total_steps

    array.ArrayImpl._value = property(counted_value)
    array.ArrayImpl.block_until_ready = counted_block
    # Control: the counter sees an implicit read (float) and an explicit one (device_get).
    x = jax.numpy.ones(())
    where["in"] = True
    float(x)
    device_get(x + 1)
    where["in"] = False
    out["control_inside"], counts["inside"] = counts["inside"], 0
    jax.device_get = counted_device_get
    summary = trainer.train_and_evaluate(config, os.path.join(tmp, "loop"), on_sync=on_sync)
    out["counts"], out["summary"] = dict(counts), summary
    array.ArrayImpl._value, array.ArrayImpl.block_until_ready = value, block
    jax.device_get = device_get

    # 2. The bare step on the same batches gives the loop's checkpoint bit for bit.
    mesh = sharding.make_mesh(1)
    state = train.create_train_state(config, jax.random.PRNGKey(int(config.seed)), mesh=mesh)
    data = synthetic.SyntheticIterator(config.data, config.batch_size, config.seed, mesh)
    sched = schedules.build_schedules(config, data.steps_per_epoch)
    step = train.TrainStep(config, sched, mesh=mesh, state_sharding=jax.tree.map(lambda a: a.sharding, state))
    acc = step.new_accumulator()
    for _ in range(config.total_steps):
        state, _, acc = step(state, next(data), acc)
    ck = checkpoint.TrainCheckpointer(os.path.join(tmp, "loop"), async_save=False)
    out["saved_steps"] = ck.all_steps()
    tree, meta = ck.restore(ck.latest_step())
    ck.close()
    ref = jax.tree.map(np.asarray, checkpoint.state_to_tree(state))
    out["equal_to_bare_step"] = all(np.array_equal(a, b) for a, b in
                                    zip(jax.tree.leaves(ref), jax.tree.leaves(tree)))
    out["data_meta"] = meta["data"]

    # 3. Non-finite loss inside a log interval (log every 5 steps, no periodic checkpoint).
    bad_dir = os.path.join(tmp, "nan")
    try:
        # Only the lr differs (a schedule value): the same step program, compiled once.
        trainer.train_and_evaluate(_config(lr=1e30, log_every_steps=5), bad_dir)
        out["nan_error"] = None
    except trainer.TrainingError as e:
        out["nan_error"] = str(e)
    ck = checkpoint.TrainCheckpointer(bad_dir, async_save=False)
    out["nan_saved_steps"] = ck.all_steps()
    tree, _ = ck.restore(ck.latest_step())
    ck.close()
    out["nan_state_step"] = int(tree["step"])
    out["nan_state_finite"] = all(bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(tree)
                                  if np.asarray(a).dtype.kind == "f")
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(out))


def test_loop_waits_only_at_sync_points_runs_the_bare_step_and_never_imports_tf(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["control_inside"] == 2  # the counter sees both kinds of read
    counts = out["counts"]
    # 12 steps, sync points at 4, 8, 12: three sync-free stretches with no read or wait;
    # outside them the accumulator fetches (and the final save) do read.
    assert counts["stretches"] == 3 and counts["inside"] == 0, counts
    assert counts["outside"] > 0, counts
    assert out["summary"]["step"] == 12 and out["summary"]["images_per_second"] > 0
    assert out["saved_steps"] == [12]
    assert out["equal_to_bare_step"]
    assert out["data_meta"] == {"position": 12 * 8, "skipped": 0}
    err = out["nan_error"]
    assert err and "non-finite loss" in err, out
    first_bad = int(err.split(" at step ")[1].split(":")[0])
    assert first_bad % 5 != 0  # the case under test: the bad step is not a log step
    assert f"last good state (step {first_bad - 1})" in err
    assert out["nan_saved_steps"] == [first_bad - 1] and out["nan_state_step"] == first_bad - 1
    assert out["nan_state_finite"]
    assert not out["tensorflow_imported"]


class _Counting:
    """An iterator of integers that fails at ``fail_at``; counts what was taken."""

    def __init__(self, fail_at=None):
        self.taken, self.fail_at = 0, fail_at

    def __next__(self):
        if self.taken == self.fail_at:
            raise ValueError(f"bad batch {self.taken}")
        self.taken += 1
        return self.taken

    def get_state(self):
        return {"position": self.taken}


def _wait_for(cond, timeout=30.0):
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        time.sleep(0.01)
    return cond()


def test_device_prefetcher_keeps_two_batches_ahead_and_hands_on_errors():
    it = _Counting()
    p = DevicePrefetcher(it, lambda b: ("on device", b), depth=2)
    try:
        # Before the loop asks: 2 batches queued on the devices, a third taken and waiting.
        assert _wait_for(lambda: it.taken == 3) and (time.sleep(0.2) or it.taken == 3)
        assert p.next() == (("on device", 1), {"position": 1})
        assert _wait_for(lambda: it.taken == 4)  # the next one is on its way at once
    finally:
        p.close()
    p = DevicePrefetcher(_Counting(fail_at=1), lambda b: b, depth=2)
    try:
        assert p.next() == (1, {"position": 1})
        with pytest.raises(ValueError, match="bad batch 1"):
            p.next()
    finally:
        p.close()


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    _worker(sys.argv[1])

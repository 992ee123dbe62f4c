"""Training checkpoints (save/restore/keep policy/half-written) and export."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dino_jax import checkpoint, convert, export, train
from dino_jax.config_defaults import base_config
from dino_jax.models import vit


def tiny_config():
    c = base_config()
    c.model.arch = "custom"
    c.model.patch_size = 4
    c.model.embed_dim = 16
    c.model.depth = 1
    c.model.num_heads = 2
    c.model.img_size = 16
    c.model.out_dim = 32
    c.model.head_hidden_dim = 16
    c.model.head_bottleneck_dim = 8
    return c


def _state(seed=0):
    c = tiny_config()
    return c, train.create_train_state(c, jax.random.PRNGKey(seed))


def _meta(c, step):
    backbone, _ = train.build_models(c)
    return {"model_config": vit.model_config(backbone), "data": {"step": step}}


def test_save_restore_exact_and_keep_policy(tmp_path):
    c, state = _state()
    ck = checkpoint.TrainCheckpointer(str(tmp_path), keep=2, keep_every=4)
    states = {}
    for step in range(1, 7):
        s = state.replace(step=jnp.int32(step), center=state.center + step)
        states[step] = s
        assert ck.save(step, checkpoint.state_to_tree(s), _meta(c, step))
    assert not ck.save(6, checkpoint.state_to_tree(states[6]), _meta(c, 6))  # no double save
    ck.wait()
    assert ck.all_steps() == [4, 5, 6]  # last 2, plus every multiple of 4
    tree, meta = ck.restore(6, checkpoint.state_to_tree(state))
    restored = checkpoint.tree_to_state(state, tree)
    ck.close()
    assert meta["data"] == {"step": 6}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[6])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(restored) is type(state)


def test_half_written_checkpoint_is_never_restored(tmp_path):
    c, state = _state()
    ck = checkpoint.TrainCheckpointer(str(tmp_path))
    ck.save(3, checkpoint.state_to_tree(state), _meta(c, 3))
    ck.close()
    ckdir = tmp_path / checkpoint.CHECKPOINTS
    # What a save killed mid-way leaves: Orbax's temporary folder, never renamed.
    shutil.copytree(ckdir / "3", ckdir / "9.orbax-checkpoint-tmp-1234")
    (ckdir / "9.orbax-checkpoint-tmp-1234" / "state").rename(ckdir / "9.orbax-checkpoint-tmp-1234" / "x")
    ck = checkpoint.TrainCheckpointer(str(tmp_path))
    assert ck.latest_step() == 3
    ck.close()
    params, cfg = checkpoint.load_teacher_backbone_from_workdir(str(tmp_path))
    assert cfg["embed_dim"] == 16


def _damage(step_dir, how):
    """What a damaged disk leaves: every array data file truncated, or a file gone."""
    if how == "truncate":
        for d, _, names in os.walk(step_dir / "state"):
            if os.path.basename(d) == "d":
                for n in names:
                    with open(os.path.join(d, n), "r+b") as f:
                        f.truncate(8)
    else:
        (step_dir / "meta" / "metadata").unlink()


def test_damaged_steps_are_set_aside_and_the_newest_readable_one_resumed(tmp_path):
    c, state = _state()
    ck = checkpoint.TrainCheckpointer(str(tmp_path), keep=5, async_save=False)
    states = {}
    for step in (2, 4, 6):
        states[step] = state.replace(step=jnp.int32(step), center=state.center + step)
        ck.save(step, checkpoint.state_to_tree(states[step]), _meta(c, step))
    ck.close()
    ckdir = tmp_path / checkpoint.CHECKPOINTS
    _damage(ckdir / "6", "truncate")
    _damage(ckdir / "4", "delete")
    lines = []
    ck = checkpoint.TrainCheckpointer(str(tmp_path), keep=5)
    assert ck.latest_readable_step(log=lines.append) == 2
    assert len(lines) == 2 and all("\n" not in ln for ln in lines)
    assert lines[0].startswith(f"checkpoint step 6 in {ckdir} is unreadable (OUT_OF_RANGE")
    assert lines[0].endswith("moved to 6.unreadable-OUT_OF_RANGE")
    assert lines[1].startswith("checkpoint step 4 in ") and "moved to 4.unreadable-" in lines[1]
    assert ck.all_steps() == [2] and ck.latest_step() == 2
    kept = sorted(p.name for p in ckdir.iterdir())
    assert kept[0] == "2" and kept[1].startswith("4.unreadable-") and kept[2] == "6.unreadable-OUT_OF_RANGE"
    assert (ckdir / kept[2] / "state").is_dir()  # set aside, never deleted
    tree, meta = ck.restore(2, checkpoint.state_to_tree(state))  # served from the probe's read
    restored = checkpoint.tree_to_state(state, tree)
    assert meta["data"] == {"step": 2}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[2])):
        assert isinstance(a, jax.Array) and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # New saves go on beside the set-aside folders; a second damage gets its own name.
    ck.save(6, checkpoint.state_to_tree(states[6]), _meta(c, 6))
    ck.close()
    _damage(ckdir / "6", "truncate")
    _damage(ckdir / "2", "truncate")
    lines = []
    ck = checkpoint.TrainCheckpointer(str(tmp_path))
    assert ck.latest_readable_step(log=lines.append) is None
    ck.close()
    assert lines[-1] == f"no readable checkpoint left in {ckdir} (steps 6, 2 set aside as *.unreadable-*): " \
                        "starting from step 0"
    assert (ckdir / "6.unreadable-OUT_OF_RANGE.2").is_dir() and (ckdir / "2.unreadable-OUT_OF_RANGE").is_dir()


_QUIET_SET_ASIDE_SCRIPT = """
import gc, pathlib, sys, time
sys.path.insert(0, sys.argv[2])
import jax.numpy as jnp
from dino_jax import checkpoint
import test_checkpoint as t
c, state = t._state()
ck = checkpoint.TrainCheckpointer(sys.argv[1], keep=5, async_save=False)
for step in (2, 6):
    ck.save(step, checkpoint.state_to_tree(state.replace(step=jnp.int32(step))), t._meta(c, step))
ck.close()
for _ in range(3):  # damaged again after each set-aside: three restores that fail mid-way
    t._damage(pathlib.Path(sys.argv[1]) / checkpoint.CHECKPOINTS / "6", "truncate")
    ck = checkpoint.TrainCheckpointer(sys.argv[1], keep=5)
    assert ck.latest_readable_step(log=print) == 2
    ck.close()
    gc.collect()
    (pathlib.Path(sys.argv[1]) / checkpoint.CHECKPOINTS / "2").rename(
        pathlib.Path(sys.argv[1]) / checkpoint.CHECKPOINTS / "6")
    ck = checkpoint.TrainCheckpointer(sys.argv[1], keep=5, async_save=False)
    ck.save(2, checkpoint.state_to_tree(state.replace(step=jnp.int32(2))), t._meta(c, 2))
    ck.close()
time.sleep(1)
gc.collect()
print("done")
"""


def test_a_damaged_step_is_reported_in_one_line_without_tracebacks_after_it(tmp_path):
    """A restore that fails mid-way leaves TensorStore reads of the damaged step running;
    when they ended, asyncio printed each as a traceback ("exception was never
    retrieved", or "Event loop is closed" through sys.unraisablehook): 70-500 of them
    per damaged step here (stderr of a separate process; pytest would otherwise
    collect them). Now stderr holds none."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    proc = subprocess.run([sys.executable, "-c", _QUIET_SET_ASIDE_SCRIPT, str(tmp_path),
                           os.path.dirname(__file__)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("done"), proc.stderr[-3000:]
    assert proc.stdout.count("is unreadable (OUT_OF_RANGE") == 3, proc.stdout
    for noise in ("Traceback", "Event loop is closed", "exception was never retrieved"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_export_orbax_plain_restore_and_torch(tmp_path):
    c, state = _state(seed=3)
    ck = checkpoint.TrainCheckpointer(str(tmp_path / "run"))
    ck.save(5, checkpoint.state_to_tree(state), _meta(c, 5))
    ck.close()
    out = str(tmp_path / "exported")
    assert export.main(["--workdir", str(tmp_path / "run"), "--output", out]) == 0
    # Plain Orbax, no dino_jax classes: nested dicts of arrays.
    tree = ocp.StandardCheckpointer().restore(os.path.join(out, "params"))
    assert set(tree) == {"backbone"}
    np.testing.assert_array_equal(tree["backbone"]["pos_embed"], state.teacher["backbone"]["pos_embed"])
    with open(os.path.join(out, "model_config.json")) as f:
        cfg = json.load(f)["model"]
    model, params = checkpoint.load_backbone(out)
    x = jnp.ones((2, 16, 16, 3))
    backbone, _ = train.build_models(c)
    np.testing.assert_allclose(model.apply({"params": params}, x),
                               backbone.apply({"params": state.teacher["backbone"]}, x), rtol=1e-6)
    assert cfg["patch_size"] == 4
    # Exporting again refuses to overwrite.
    assert export.main(["--workdir", str(tmp_path / "run"), "--output", out]) == 1
    pytest.importorskip("torch", reason="the torch export needs the torch extra")
    import torch

    pth = str(tmp_path / "teacher.pth")
    assert export.main(["--workdir", str(tmp_path / "run"), "--output", pth, "--format", "torch"]) == 0
    sd = torch.load(pth)
    want = convert.flax_to_torch_backbone(jax.tree.map(np.asarray, state.teacher["backbone"]))
    assert sorted(sd) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(sd[k].numpy(), want[k])


def test_export_errors_are_one_line(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a training workdir" in err and len(err.splitlines()) == 1
    os.makedirs(tmp_path / "empty" / checkpoint.CHECKPOINTS)
    assert export.main(["--workdir", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load_backbone(str(tmp_path / "missing"))

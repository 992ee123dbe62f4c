"""Warm start (``config.init_from``) from official-layout .pth files written by the
converter, a params dir and a training workdir; architecture mismatch in one line.

Tiny dims (width 16, 1 block, K = 64); no training here except the end-to-end
test, which also checks that resuming the run's own checkpoint wins over
``init_from``. Values are compared exactly (the conversions only transpose).
"""
import io
import os

import jax
import numpy as np
import pytest

from dino_jax import checkpoint, convert, train, trainer, warm_start
from dino_jax.config_defaults import base_config

pytest.importorskip("torch")  # .pth files; the 'test' extra installs it

TINY_MODEL = dict(arch="custom", patch_size=4, embed_dim=16, depth=1, num_heads=2, img_size=16,
                  drop_path_rate=0.0, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                  norm_last_layer=False, dtype="float32")


def tiny_config(**model):
    c = base_config()
    c.update(dict(model={**TINY_MODEL, **model}, batch_size=8))
    return c


_STATES = {}


def fresh_state(config, seed=0):
    """A fresh TrainState of ``config`` (cached: each one costs an XLA compile)."""
    key = (config.model.to_json(), seed)  # the state depends on the model (and optimiser) only
    if key not in _STATES:
        _STATES[key] = train.create_train_state(config, jax.random.PRNGKey(seed))
    return _STATES[key]


def random_nets(config, seeds):
    """Student-params trees (numpy) of ``config``'s model for several seeds (one compile)."""
    backbone, head = train.build_models(config)
    init = jax.jit(lambda key: train.init_student_params(backbone, head, key))
    return [np_tree(init(jax.random.PRNGKey(s))) for s in seeds]


def model_cfgs(config):
    return trainer.model_configs(config, *train.build_models(config))


def np_tree(t):
    return jax.tree.map(np.asarray, t)


def assert_tree_equal(a, b):
    a, b = np_tree(a), np_tree(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def official_full_checkpoint(path, student, teacher, center):
    """The layout of the official main_dino.py save_dict: a DDP student ('module.'),
    a plain teacher, both MultiCropWrapper ('backbone.', 'head.'), dino_loss.center."""
    def net(params, prefix):
        sd = convert.flax_to_torch_backbone(params["backbone"], prefix=prefix + "backbone.")
        sd.update(convert.flax_to_torch_head(params["head"], prefix=prefix + "head."))
        return sd

    convert.write_pth({"student": net(student, "module."), "teacher": net(teacher, ""),
                       "dino_loss": {"center": np.asarray(center)}, "epoch": np.float32(3)}, path)


@pytest.fixture(scope="module")
def nets():
    """Distinct student / teacher params and center, as a trained run would have."""
    config = tiny_config()
    student, teacher = random_nets(config, (1, 2))
    center = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    return config, student, teacher, center


def test_official_full_checkpoint_loads_student_teacher_heads_and_center(nets, tmp_path):
    config, student, teacher, center = nets
    path = str(tmp_path / "checkpoint.pth")
    official_full_checkpoint(path, student, teacher, center)
    state0 = fresh_state(config)
    config.init_from = path
    state, msg = warm_start.warm_start(state0, config, *model_cfgs(config))
    assert_tree_equal(state.student, student)
    assert_tree_equal(state.teacher, teacher)
    np.testing.assert_array_equal(np.asarray(state.center), center)
    assert int(state.step) == 0
    assert_tree_equal(state.opt_state, state0.opt_state)  # a new run: fresh AdamW moments
    assert "official training checkpoint" in msg and "teacher head" in msg and "center" in msg
    assert "\n" not in msg


def test_official_backbone_file_gets_a_fresh_head(nets, tmp_path):
    config, student, _, _ = nets
    pdir = str(tmp_path / "params")
    checkpoint.save_params_dir(pdir, {"backbone": student["backbone"]}, *model_cfgs(config)[:1])
    path = str(tmp_path / "dino_tiny_pretrain.pth")
    assert convert.main(["jax2torch", "--input", pdir, "--output", path]) == 0  # the release layout
    state0 = fresh_state(config)
    config.init_from = path
    state, msg = warm_start.warm_start(state0, config, *model_cfgs(config))
    assert_tree_equal(state.student["backbone"], student["backbone"])
    assert_tree_equal(state.teacher["backbone"], student["backbone"])  # teacher = student
    assert_tree_equal(state.student["head"], state0.student["head"])   # fresh head ...
    assert_tree_equal(state.teacher["head"], state0.student["head"])   # ... copied to the teacher
    assert not np.any(np.asarray(state.center))
    assert "loaded student backbone" in msg and "initialised head" in msg


def test_params_dir_and_training_workdir(nets, tmp_path):
    config, student, teacher, center = nets
    model_cfg, head_cfg = model_cfgs(config)
    pdir = str(tmp_path / "params")
    checkpoint.save_params_dir(pdir, student, model_cfg, head_cfg)
    config.init_from = pdir
    state, msg = warm_start.warm_start(fresh_state(config), config, model_cfg, head_cfg)
    assert_tree_equal(state.student, student)
    assert_tree_equal(state.teacher, student)
    assert "dino_jax params dir" in msg

    # Another run's workdir: its latest checkpoint's student, teacher and center.
    other = fresh_state(config).replace(student=student, teacher=teacher, center=center)
    ck = checkpoint.TrainCheckpointer(str(tmp_path / "run"), async_save=False)
    ck.save(7, checkpoint.state_to_tree(other), {"model_config": model_cfg, "head_config": head_cfg})
    ck.close()
    config.init_from = str(tmp_path / "run")
    state, msg = warm_start.warm_start(fresh_state(config), config, model_cfg, head_cfg)
    assert_tree_equal(state.student, student)
    assert_tree_equal(state.teacher, teacher)
    np.testing.assert_array_equal(np.asarray(state.center), center)
    assert int(state.step) == 0 and "(step 7)" in msg


def test_architecture_mismatch_is_one_line(nets, tmp_path):
    _, student, teacher, center = nets
    path = str(tmp_path / "checkpoint.pth")
    official_full_checkpoint(path, student, teacher, center)
    for model, expect in ((dict(embed_dim=32, num_heads=2), "embed_dim=16"),
                          (dict(depth=2), "depth=1"), (dict(patch_size=8), "patch_size=4"),
                          (dict(out_dim=128), "out_dim=64")):
        config = tiny_config(**model)
        config.init_from = path
        with pytest.raises(warm_start.WarmStartError) as e:  # refused before the state is used
            warm_start.warm_start(None, config, *model_cfgs(config))
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    config = tiny_config()
    config.init_from = str(tmp_path / "missing.pth")
    with pytest.raises(warm_start.WarmStartError, match="does not exist"):
        warm_start.warm_start(None, config, *model_cfgs(config))


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs Debian's dataset-fashion-mnist")
def test_training_starts_from_init_from_and_resume_wins_over_it(nets, tmp_path, monkeypatch):
    """A real run (3 steps) warm-started from an official full checkpoint: the first log
    lines say so. Its latest checkpoint (step 3) is then damaged; the rerun (to step 2)
    names it in its first line, sets it aside, and resumes the run's own step 2, not
    ``init_from``. Both runs' ``evals.knn.random_init`` baseline is the loaded teacher (the
    weights the run started from), not the discarded fresh initialisation."""
    from dino_jax.eval import knn  # noqa: PLC0415

    evaluated = []  # the backbone params every end-of-run k-NN was given
    knn_run = knn.KnnEvaluator.run

    def recording_knn(self, backbone, params):
        evaluated.append(np_tree(params))
        return knn_run(self, backbone, params)

    monkeypatch.setattr(knn.KnnEvaluator, "run", recording_knn)

    _, student, teacher, center = nets
    config = tiny_config()
    config.update(dict(
        total_steps=3, checkpoint_every_steps=1, keep_checkpoints=10, log_every_steps=1,
        freeze_last_layer=0, warmup_epochs=0.0, lr=0.002,
        evals=dict(knn=dict(every_epochs=0, eval_split="test", random_init=True, max_train_examples=64,
                            max_eval_examples=32, batch_size=32)),
        data=dict(source="fashion_mnist", path=FMNIST, train_split="train[:64]",
                  eval_image_size=16, eval_resize_ratio=1.0,
                  global_crop_size=16, local_crop_size=8, num_local_crops=2, blur_sigma=(0.1, 0.3))))
    pth = str(tmp_path / "checkpoint.pth")
    official_full_checkpoint(pth, student, teacher, center)
    config.init_from = pth
    workdir = str(tmp_path / "run")

    out = io.StringIO()
    assert trainer.train_and_evaluate(config, workdir, stream=out)["step"] == 3
    lines = out.getvalue().splitlines()
    assert lines[1].startswith(f"warm start from {pth} (official training checkpoint): loaded "), lines[:3]
    assert len(evaluated) == 2  # the trained teacher, then the starting one
    assert_tree_equal(evaluated[1], teacher["backbone"])
    assert any("top-1 of the starting teacher (init_from)" in line for line in lines)

    # The run started from the loaded teacher and center: after 1 step the teacher is the
    # EMA (momentum 0.996) of the loaded one, and the center 0.9 x the loaded one + 0.1 x mean.
    ck = checkpoint.TrainCheckpointer(workdir, async_save=False)
    tree1, _ = ck.restore(1)
    tree2, _ = ck.restore(2)
    ck.close()
    t_pos = np.asarray(tree1["teacher"]["backbone"]["pos_embed"])
    s0_pos, t0_pos = student["backbone"]["pos_embed"], teacher["backbone"]["pos_embed"]
    assert np.abs(t_pos - t0_pos).max() < 0.05 * np.abs(t0_pos - s0_pos).max()
    assert np.corrcoef(np.asarray(tree1["center"]).ravel(), center.ravel())[0, 1] > 0.8

    step3 = os.path.join(workdir, "checkpoints", "3")
    for d, _, names in os.walk(os.path.join(step3, "state")):
        for n in names:
            if os.path.basename(d) == "d":
                with open(os.path.join(d, n), "r+b") as f:
                    f.truncate(8)
    config.total_steps = 2  # the resumed step is the last: no step to compile here
    out = io.StringIO()
    summary = trainer.train_and_evaluate(config, workdir, stream=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("checkpoint step 3 in ") and "moved to 3.unreadable-" in lines[0], lines[:3]
    assert not any(line.startswith("warm start") for line in lines)
    assert any(line.startswith("resumed from") and line.split()[2].endswith("/2") for line in lines)
    assert summary["step"] == 2
    assert len(evaluated) == 4 and "knn_top1_random" in summary
    assert_tree_equal(evaluated[3], teacher["backbone"])  # resumed: the same baseline

    # init_from gone: the resume still runs (resume wins), only the baseline is skipped.
    os.remove(pth)
    out = io.StringIO()
    summary = trainer.train_and_evaluate(config, workdir, stream=out)
    assert summary["step"] == 2 and "knn_top1_random" not in summary and len(evaluated) == 5
    assert any(line.startswith(f"evals.knn.random_init: no baseline (init_from {pth} does not exist)")
               for line in out.getvalue().splitlines())
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3.unreadable-OUT_OF_RANGE"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3.unreadable-OUT_OF_RANGE", "state"))
    ck = checkpoint.TrainCheckpointer(workdir, async_save=False)
    final, _ = ck.restore(2)
    ck.close()
    assert_tree_equal(final, tree2)  # the run's own step 2, untouched by init_from

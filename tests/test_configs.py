"""Configs: one source of defaults, the recipe docstrings, model.dtype 'auto', the
single-GPU recipe, and the collapse line of the training log."""
import glob
import importlib.util
import io
import os
import re

import jax
import jax.numpy as jnp
import pytest

from dino_jax import schedules, train
from dino_jax.config_defaults import base_config
from dino_jax.metrics_log import TrainLogger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# The official README's ImageNet results (k-NN, linear) of each recipe's run.
OFFICIAL = {"vit_s16": ("69.3% k-NN", "74.0% linear"), "vit_s16_1gpu": ("69.3% k-NN", "74.0% linear"),
            "vit_s8": ("78.3% k-NN", "79.7% linear"), "vit_b16": ("76.1% k-NN", "78.2% linear"),
            "vit_b8": ("77.4% k-NN", "80.1% linear")}


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flat_keys(c, prefix=""):
    out = set()
    for k, v in c.items():
        out |= flat_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out


def test_every_default_has_a_comment_and_configs_add_no_fields():
    src = open(os.path.join(REPO, "dino_jax", "config_defaults.py")).read()
    fields = re.findall(r"^    (c\.[\w.]+) = (.*)$", src, re.M)
    uncommented = [f for f, rhs in fields if "#" not in rhs and "ConfigDict(" not in rhs]
    assert not uncommented, uncommented
    base = flat_keys(base_config())
    assert {"adam_b1", "adam_b2", "adam_eps", "evals.knn.random_init", "init_from"} <= base
    # stop_on_nonfinite is read by the loop (False: skip non-finite steps instead of stopping).
    loop = [os.path.join(REPO, "dino_jax", f) for f in ("main.py", "trainer.py")]
    assert any("config.stop_on_nonfinite" in open(p).read() for p in loop if os.path.exists(p))
    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        extra = flat_keys(load(path).get_config()) - base
        assert not extra, (path, extra)


def test_old_evaluation_fields_are_refused_with_the_new_name():
    """The flat knn_* fields and the top-level evaluation blocks moved under ``evals``: a
    config or a command line naming an old one gets one line naming the new one."""
    from dino_jax.config_defaults import RENAMED, check_renamed

    base = flat_keys(base_config())
    for old, new in RENAMED.items():
        assert old not in base and any(k == new or k.startswith(new + ".") for k in base), (old, new)
    check_renamed(base_config(), ["--config.evals.knn.k=10", "--config.batch_size=8"])
    with pytest.raises(ValueError, match=r"^config field 'knn_k' is now 'evals.knn.k'$"):
        check_renamed(None, ["--config.knn_k=10"])
    with pytest.raises(ValueError, match=r"^config field 'retrieval' is now 'evals.retrieval'$"):
        check_renamed(None, ["--config.retrieval.imsize=512"])
    c = base_config()
    c.data.knn_train_split = "train"
    with pytest.raises(ValueError, match=r"^config field 'data.knn_train_split' is now 'evals.knn.train_split'$"):
        check_renamed(c)
    with pytest.raises(ValueError, match="block per evaluator"):
        check_renamed(None, ["--config.evals=knn,retrieval"])
    for path in CONFIGS:
        check_renamed(load(path).get_config())


def test_training_program_refuses_an_old_field_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dino_jax.main", "--config=configs/quickstart.py",
                        f"--workdir={tmp_path}", "--config.knn_random_init=true"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and not os.listdir(tmp_path)
    assert r.stderr.strip() == "error: config field 'knn_random_init' is now 'evals.knn.random_init'"


def test_code_reads_config_fields_directly():
    """No fallback defaults beside config_defaults.py: no ``config.get(...)``-style reads."""
    pat = re.compile(r"\b(config|data_cfg|config\.model|config\.data|m|d)\.get\(\s*[\"'](\w+)")
    base = flat_keys(base_config())
    names = {k.split(".")[-1] for k in base}
    hits = []
    for path in glob.glob(os.path.join(REPO, "dino_jax", "**", "*.py"), recursive=True):
        for i, line in enumerate(open(path), 1):
            for m in pat.finditer(line):
                if m.group(2) in names:
                    hits.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
    assert not hits, hits


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_recipe_docstrings_give_command_device_and_official_result(path):
    name = os.path.basename(path)[:-3]
    mod = load(path)
    doc = mod.__doc__
    assert f"python -m dino_jax.main --config=configs/{name}.py --workdir=" in doc.replace("\\\n", "")
    c = mod.get_config()
    if name in ("quickstart", "fmnist_nano"):   # CPU recipes compared with a baseline / the official code
        assert c.model.dtype == "float32" and c.evals.knn.random_init  # the exact reference + its baseline
        if name == "quickstart":
            return
    assert "Sized for" in doc and "Official result" in doc
    for number in OFFICIAL.get(name, ()):
        assert number in doc, (name, number)
    if name != "fmnist_nano":
        assert c.model.dtype == "auto" and not c.evals.knn.random_init


def test_dtype_auto_follows_the_backend(monkeypatch):
    c = base_config()
    assert train.compute_dtype(c) == jnp.float32
    c.model.dtype = "auto"
    assert train.compute_dtype(c) == jnp.float32  # tests run on CPU
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert train.compute_dtype(c) == jnp.bfloat16
        c.model.dtype = "float32"
        assert train.compute_dtype(c) == jnp.float32  # explicit float32 stays exact everywhere
        c.model.dtype = "auto"
    c.model.dtype = "fp8"
    with pytest.raises(ValueError, match="auto"):
        train.compute_dtype(c)


def test_single_gpu_recipe_follows_the_official_small_batch_advice():
    one = load(os.path.join(REPO, "configs", "vit_s16_1gpu.py")).get_config()
    eight = load(os.path.join(REPO, "configs", "vit_s16.py")).get_config()
    assert one.batch_size <= 256 and one.momentum_teacher == 0.9995
    assert eight.momentum_teacher == 0.996
    assert schedules.scaled_lr(one.lr, one.batch_size) == pytest.approx(0.0005 * one.batch_size / 256)
    changed = {k for k in one.keys() if one[k] != eight[k]}
    assert changed == {"batch_size", "momentum_teacher"}


def test_collapse_is_reported_in_one_line_per_epoch(tmp_path):
    out = io.StringIO()
    log = TrainLogger(str(tmp_path), total_steps=30, steps_per_epoch=10, global_batch=8, tensorboard=False,
                      stream=out)
    log.start(0)
    ok = dict(loss=5.0, kl=0.5, teacher_entropy=1.0, batch_entropy=3.0, collapse=0.0)
    bad = dict(loss=0.01, kl=0.001, teacher_entropy=0.01, batch_entropy=0.0, collapse=1.0)
    for step in range(1, 31):
        log.step_metrics(step, bad if step in (3, 4, 5, 14) else ok, log_now=False)
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["collapse at step 3", "collapse at step 14"]
    for needle in ("teacher_temp", "momentum_teacher", "freeze_last_layer", "KL 0.001"):
        assert needle in lines[0]

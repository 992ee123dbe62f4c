"""Weighted k-NN (dino_jax.eval.knn) against a brute-force NumPy re-statement of the
official knn_classifier, on real Fashion-MNIST pixels; and the k-NN of a tiny
random model end to end."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.data.sources import read_fashion_mnist
from dino_jax.config_defaults import base_config
from dino_jax.eval import knn
from dino_jax.models import vit

FMNIST = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST),
                                reason="needs Debian's dataset-fashion-mnist (installed by .ci/run)")


def brute_force(train_f, train_l, test_f, test_l, k, T, num_classes):
    sims = test_f @ train_f.T                                     # (n_test, n_train)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, idx, axis=1)
    votes = np.zeros((len(test_f), num_classes))
    for c in range(num_classes):
        votes[:, c] = (np.exp(top / T) * (train_l[idx] == c)).sum(1)
    pred = np.argsort(-votes, axis=1, kind="stable")
    top1 = 100.0 * np.mean(pred[:, 0] == test_l)
    top5 = 100.0 * np.mean((pred[:, :min(5, k)] == test_l[:, None]).any(1))
    return top1, top5


def test_raw_pixel_knn_equals_brute_force():
    tr_x, tr_y = read_fashion_mnist(FMNIST, "train")
    te_x, te_y = read_fashion_mnist(FMNIST, "test")
    tr = tr_x[:2000].reshape(2000, -1).astype(np.float32)
    te = te_x[:500].reshape(500, -1).astype(np.float32)
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    # Small chunks force several test chunks and several bank chunks (the running top-k merge).
    got = knn.knn_classify(tr, tr_y[:2000], te, te_y[:500], ks=(10, 20, 100, 200), temperature=0.07,
                           num_classes=10, test_chunk=128, train_chunk=300)
    for k in (10, 20, 100, 200):
        want = brute_force(tr.astype(np.float64), tr_y[:2000], te.astype(np.float64), te_y[:500], k, 0.07, 10)
        assert got[k] == pytest.approx(want, abs=1e-9), k
    assert got[20][0] > 70  # raw pixels do classify Fashion-MNIST well


def test_tiny_random_model_knn_end_to_end():
    model = vit.VisionTransformer(patch_size=7, embed_dim=16, depth=1, num_heads=2, img_size=28)
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 28, 28, 3)))["params"]
    cfg = base_config().data
    cfg.update(dict(source="fashion_mnist", path=FMNIST, eval_image_size=28, eval_resize_ratio=1.0))
    from dino_jax import sharding

    res = knn.knn_evaluate(model, params, cfg, "train", "test", k=20, batch_size=100,
                           mesh=sharding.make_mesh(1), max_train_examples=500, max_eval_examples=130,
                           ks=(10, 20))
    assert res["num_train"] == 500 and res["num_test"] == 130  # padded last batch excluded
    assert 10 < res["knn_top1"] <= 100 and res["knn_top5"] >= res["knn_top1"]
    assert set(res["per_k"]) == {10, 20}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert knn.main(["--checkpoint", str(tmp_path / "missing"), "--image_size", "28"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: no such checkpoint: {tmp_path / 'missing'}"
    from dino_jax import checkpoint

    model = vit.VisionTransformer(patch_size=7, embed_dim=16, depth=1, num_heads=2, img_size=28)
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 28, 28, 3)))["params"]
    out = str(tmp_path / "tiny")
    checkpoint.save_params_dir(out, {"backbone": params}, vit.model_config(model))
    assert knn.main(["--checkpoint", out, "--eval_split", "validation", "--image_size", "28",
                     "--resize_ratio", "1.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown Fashion-MNIST split 'validation'") and "\n" not in err


def test_periodic_knn_builds_its_feature_function_once():
    """Two periodic k-NN evaluations of one backbone (as in a training run) share one
    jitted feature function, compiled once; the numbers are those of knn_evaluate."""
    from dino_jax import sharding
    from dino_jax.eval import features

    model = vit.VisionTransformer(patch_size=7, embed_dim=16, depth=1, num_heads=2, img_size=28)
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 28, 28, 3)))["params"]
    c = base_config()
    c.data.update(dict(source="fashion_mnist", path=FMNIST, eval_image_size=28, eval_resize_ratio=1.0))
    c.evals.knn.update(dict(every_epochs=1, train_split="train[:64]", eval_split="test[:32]", k=5, batch_size=16))
    mesh = sharding.make_mesh(1)
    ev = knn.KnnEvaluator(c.evals.knn, c.data, mesh=mesh)
    first = ev.run(model, params)
    fn = features.feature_fn(model, "cls", normalize=True, mesh=mesh)
    compiled = fn._cache_size()
    again = ev.run(model, jax.tree.map(lambda x: x + 0, params))  # new arrays, same shapes
    assert features.feature_fn(model, "cls", normalize=True, mesh=mesh) is fn
    assert fn._cache_size() == compiled >= 1  # no new compile for the second evaluation
    assert again == first
    want = knn.knn_evaluate(model, params, c.data, "train[:64]", "test[:32]", k=5, batch_size=16, mesh=mesh)
    assert first == {"knn_top1": want["knn_top1"], "knn_top5": want["knn_top5"]}


def test_evaluation_programs_turn_on_the_persistent_compilation_cache(tmp_path):
    """Every evaluation program's parser sets JAX's persistent compilation cache: the flag's
    directory, $DINO_JAX_COMPILATION_CACHE by default, the user's cache folder without it,
    none for ''."""
    import subprocess
    import sys

    code = ("import sys, jax; from dino_jax.eval import common; "
            "common.tool_parser('p', 'd').parse_args(['--checkpoint', 'c'] + sys.argv[1:]); "
            "print(jax.config.jax_compilation_cache_dir)")

    def cache_dir(args, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("DINO_JAX_COMPILATION_CACHE", "XDG_CACHE_HOME")}
        r = subprocess.run([sys.executable, "-c", code] + args, env=base | env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    assert cache_dir(["--compilation_cache_dir", str(tmp_path / "a")]) == str(tmp_path / "a")
    assert cache_dir([], DINO_JAX_COMPILATION_CACHE=str(tmp_path / "b")) == str(tmp_path / "b")
    assert cache_dir([], XDG_CACHE_HOME=str(tmp_path)) == str(tmp_path / "dino_jax" / "jax_compilation_cache")
    assert cache_dir([], DINO_JAX_COMPILATION_CACHE="") == "None"

"""Retrieval, copy detection and video segmentation (dino_jax.eval.*) against numbers
from the official evaluation code (tests/fixtures/official/make_eval_fixtures.py ran
it on the tiny datasets in ``<fixture>_data/``), the DAVIS J/F measures against
their definitions, and the tools' one-line errors on bad layouts.

Tolerances: features 1e-4 (max|a-e|/max|e|, float32, as the other parity tests);
mAP / mP@k from the same ranking exactly (==); masks pixel-identical except for a
bounded fraction (see test_video_segmentation_matches_official)."""
import io
import json
import os
import pickle
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax import checkpoint, convert
from dino_jax.eval import copy_detection, retrieval, video_segmentation
from dino_jax.models import vit
from official_fixtures import cases, fixture_dir, group, load, max_rel_err

FEATURE_TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(meta, arrays):
    params = convert.torch_to_flax_backbone(group(arrays, "state_dict/"), num_heads=meta["num_heads"])
    model = vit.VisionTransformer(patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
                                  num_heads=meta["num_heads"], mlp_ratio=meta["mlp_ratio"], img_size=meta["img_size"])
    return model, params


def _params_dir(tmp_path, model, params):
    out = str(tmp_path / "ckpt")
    checkpoint.save_params_dir(out, {"backbone": params}, vit.model_config(model))
    return out


def _data(meta):
    return os.path.join(fixture_dir("eval_suite"), meta["data"])


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------
# Retrieval.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", cases("eval_suite"))
def test_compute_map_equals_official(name):
    meta, arrays = load(name, "eval_suite")
    ranks = arrays["map/ranks"]
    for proto in ("medium", "hard"):
        gnd = retrieval.protocol_gnd([{k: np.array(v, int) for k, v in g.items()} for g in meta["map_gnd"]], proto)
        m, aps, pr, prs = retrieval.compute_map(ranks, gnd, retrieval.KAPPAS)
        assert m == arrays[f"map/{proto}/map"]
        np.testing.assert_array_equal(aps, arrays[f"map/{proto}/aps"])    # NaN where no positive, as official
        np.testing.assert_array_equal(pr, arrays[f"map/{proto}/pr"])
        np.testing.assert_array_equal(prs, arrays[f"map/{proto}/prs"])


@pytest.mark.parametrize("name", cases("eval_suite"))
def test_retrieval_matches_official(name, tmp_path, capsys):
    meta, arrays = load(name, "eval_suite")
    model, params = _model(meta, arrays)
    cfg = retrieval.read_dataset(_data(meta), meta["retrieval"]["dataset"])
    imsize = meta["retrieval"]["imsize"]
    for tag, ms in (("single", False), ("multiscale", True)):
        for split, paths in (("train", cfg["db_paths"]), ("query", cfg["query_paths"])):
            got = retrieval.image_features(model, params, [retrieval.thumbnail(p, imsize) for p in paths], ms,
                                           batch_size=1)    # one compiled shape per image size
            assert max_rel_err(got, _l2n(arrays[f"retrieval/{tag}/raw_{split}"])) < FEATURE_TOL, (tag, split)
        # The metric on the official features: the official ranking and numbers, exactly.
        ranks = retrieval.rank_database(_l2n(arrays[f"retrieval/{tag}/raw_train"]),
                                        _l2n(arrays[f"retrieval/{tag}/raw_query"]))
        np.testing.assert_array_equal(ranks, arrays[f"retrieval/{tag}/ranks"])
        res = retrieval.scores(ranks, cfg["gnd"])
        for proto in ("medium", "hard"):
            assert res[f"map_{proto}"] == 100.0 * arrays[f"retrieval/{tag}/{proto}/map"]
            assert [res[f"mp@{k}_{proto}"] for k in retrieval.KAPPAS] == list(100.0 * arrays[f"retrieval/{tag}/{proto}/pr"])
    # The CLI end to end (its own features rank as the official ones here).
    ckpt = _params_dir(tmp_path, model, params)
    assert retrieval.main(["--checkpoint", ckpt, "--data_path", _data(meta), "--dataset", "roxford5k",
                           "--imsize", str(imsize), "--multiscale", "--batch_size", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["roxford5k_map_medium"] == pytest.approx(100 * arrays["retrieval/multiscale/medium/map"], abs=1e-9)
    assert out["roxford5k_map_hard"] == pytest.approx(100 * arrays["retrieval/multiscale/hard/map"], abs=1e-9)


def test_retrieval_layout_errors(tmp_path, capsys):
    ckpt_model = vit.VisionTransformer(patch_size=8, embed_dim=16, depth=1, num_heads=2, img_size=32)
    import jax.numpy as jnp

    params = ckpt_model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    ckpt = _params_dir(tmp_path, ckpt_model, params)
    root = tmp_path / "data" / "rparis6k"
    (root / "jpg").mkdir(parents=True)
    args = ["--checkpoint", ckpt, "--data_path", str(tmp_path / "data"), "--dataset", "rparis6k", "--imsize", "32"]
    assert retrieval.main(args) == 1
    assert "gnd_rparis6k.pkl" in _one_error_line(capsys)
    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "gnd": []}, f)
    assert retrieval.main(args) == 1
    assert "gnd_rparis6k.pkl" in _one_error_line(capsys)           # no qimlist: not the revisited layout
    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a", "b"], "qimlist": ["q"],
                     "gnd": [{"easy": [0], "hard": [], "junk": []}]}, f)
    assert retrieval.main(args) == 1
    assert os.path.join("jpg", "a.jpg") in _one_error_line(capsys)  # missing image
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "jpg" / "a.jpg")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "jpg" / "q.jpg")
    (root / "jpg" / "b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert retrieval.main(args) == 1
    assert "b.jpg" in _one_error_line(capsys)                       # unreadable image


# --------------------------------------------------------------------------
# Copy detection.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", cases("eval_suite"))
def test_copy_detection_matches_official(name, tmp_path, capsys):
    meta, arrays = load(name, "eval_suite")
    model, params = _model(meta, arrays)
    cdm = meta["copy_detection"]
    data = _data(meta)
    blocks = copy_detection.read_layout(os.path.join(data, "copydays"))
    assert list(blocks) == cdm["blocks"]
    queries = np.concatenate([copy_detection.gem_features(model, params, blocks[b], cdm["imsize"]) for b in blocks])
    assert max_rel_err(queries, arrays["copy_detection/queries_raw"]) < FEATURE_TOL
    wl = copy_detection.other_files(os.path.join(data, cdm["whitening"]))
    whit = copy_detection.gem_features(model, params, wl, cdm["imsize"])
    assert max_rel_err(whit, arrays["copy_detection/whitening_raw"]) < FEATURE_TOL
    # Search and scores on the official features: the official neighbours and mAP, exactly.
    w = copy_detection.pca_whitening(arrays["copy_detection/whitening_raw"].astype(np.float64))
    ids = copy_detection.search(arrays["copy_detection/queries_raw"], arrays["copy_detection/database_raw"], w)
    np.testing.assert_array_equal(ids, arrays["copy_detection/indices"])
    j0 = 0
    for b, files in blocks.items():
        got = copy_detection.block_map(ids[j0:j0 + len(files)], copy_detection.positives_of(b, blocks))
        assert got == arrays[f"copy_detection/map/{b}"], b
        j0 += len(files)
    # The CLI end to end.
    ckpt = _params_dir(tmp_path, model, params)
    assert copy_detection.main(["--checkpoint", ckpt, "--data_path", os.path.join(data, "copydays"),
                                "--whitening_path", os.path.join(data, cdm["whitening"]),
                                "--distractors_path", os.path.join(data, cdm["distractors"]),
                                "--imsize", str(cdm["imsize"])]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for b in blocks:
        assert out[f"copydays_{b.replace('/', '_')}_map"] == pytest.approx(100 * arrays[f"copy_detection/map/{b}"],
                                                                           abs=1e-9), b


def test_copy_detection_layout_errors(tmp_path, capsys):
    model = vit.VisionTransformer(patch_size=8, embed_dim=16, depth=1, num_heads=2, img_size=32)
    import jax.numpy as jnp

    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    ckpt = _params_dir(tmp_path, model, params)
    cd = tmp_path / "copydays"
    args = ["--checkpoint", ckpt, "--data_path", str(cd), "--imsize", "32"]
    (cd / "original").mkdir(parents=True)
    assert copy_detection.main(args) == 1
    assert "strong" in _one_error_line(capsys)
    (cd / "strong").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(cd / "original" / "100000.jpg")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(cd / "strong" / "999901.jpg")
    assert copy_detection.main(args) == 1
    assert "999901.jpg" in _one_error_line(capsys)                  # a strong attack without its original
    os.remove(cd / "strong" / "999901.jpg")
    (cd / "strong" / "100001.jpg").write_bytes(b"broken")
    assert copy_detection.main(args) == 1
    assert "100001.jpg" in _one_error_line(capsys)


# --------------------------------------------------------------------------
# Video segmentation.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", cases("eval_suite"))
def test_video_segmentation_matches_official(name, tmp_path, capsys):
    """Masks written by the official label propagation (random official ViT, moving
    shapes) against ours. The soft labels agree to float rounding; a pixel can only
    differ where two objects' normalised scores tie to within that rounding, so the
    differing fraction is bounded by 0.5% of the pixels (measured: see the assert)."""
    meta, arrays = load(name, "eval_suite")
    model, params = _model(meta, arrays)
    vs = meta["video_segmentation"]
    ckpt = _params_dir(tmp_path, model, params)
    out = tmp_path / "masks"
    assert video_segmentation.main([
        "--checkpoint", ckpt, "--data_path", os.path.join(_data(meta), "davis"), "--output_dir", str(out),
        "--n_last_frames", str(vs["n_last_frames"]), "--size_mask_neighborhood", str(vs["size_mask_neighborhood"]),
        "--topk", str(vs["topk"]), "--scale_size", str(vs["scale_size"])]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    official = group(arrays, "video_segmentation/masks/")
    diff = total = 0
    for frame, want in sorted(official.items()):
        with Image.open(out / vs["video"] / f"{frame}.png") as im:
            assert im.mode == "P"
            got = np.asarray(im)
        assert got.shape == want.shape
        diff += int((got != want).sum())
        total += want.size
    assert diff / total <= 0.005, f"{diff} of {total} pixels differ"
    # J&F of the official masks equals ours (same masks up to that fraction).
    davis = os.path.join(_data(meta), "davis")
    shutil.copytree(os.path.join(davis, "Annotations", "480p", vs["video"]), tmp_path / "gt")
    off_dir = tmp_path / "official" / vs["video"]
    off_dir.mkdir(parents=True)
    for frame, m in official.items():
        Image.fromarray(m).save(off_dir / f"{frame}.png")
    videos = video_segmentation.read_davis(davis)
    ref = video_segmentation.jf_scores(davis, str(tmp_path / "official"), videos)
    for k in ("davis_j_mean", "davis_f_mean", "davis_jf_mean"):
        assert res[k] == pytest.approx(ref[k], abs=0.5), k
        assert 0 <= res[k] <= 100


def _brute_dilate(mask, r):
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    out = np.zeros_like(mask)
    for y, x in zip(ys, xs):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    return out


def test_davis_measures_follow_their_definitions():
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(13, 17)) < 0.1
    for r in (1, 2, 3):
        np.testing.assert_array_equal(video_segmentation.dilate_disk(m, r), _brute_dilate(m, r))
    gt = np.zeros((40, 60), bool)
    gt[10:20, 10:30] = True
    pred = np.zeros_like(gt)
    pred[12:22, 10:30] = True                                   # shifted down by 2
    assert video_segmentation.region_iou(gt, pred) == pytest.approx(160 / 240)
    assert video_segmentation.region_iou(gt, np.zeros_like(gt)) == 0.0
    assert video_segmentation.region_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    # bound_pix = ceil(0.008 * |(40, 60)|) = 1: a 2-pixel shift leaves only the side edges matched.
    b_gt, b_pred = video_segmentation.seg2bmap(gt), video_segmentation.seg2bmap(pred)
    assert b_gt.sum() > 0 and not b_gt[:9].any() and not b_gt[21:].any()   # only around the rectangle
    p = (b_pred & _brute_dilate(b_gt, 1)).sum() / b_pred.sum()
    rec = (b_gt & _brute_dilate(b_pred, 1)).sum() / b_gt.sum()
    assert 0 < p < 1 and 0 < rec < 1
    assert video_segmentation.boundary_f(gt, pred) == pytest.approx(2 * p * rec / (p + rec))
    assert video_segmentation.boundary_f(gt, gt) == 1.0
    assert video_segmentation.boundary_f(gt, np.zeros_like(gt)) == 0.0
    # A large tolerance (bound_th >= 1 is in pixels) matches a small shift completely.
    assert video_segmentation.boundary_f(gt, pred, bound_th=3) == 1.0


def test_video_segmentation_layout_errors(tmp_path, capsys):
    model = vit.VisionTransformer(patch_size=8, embed_dim=16, depth=1, num_heads=2, img_size=32)
    import jax.numpy as jnp

    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    ckpt = _params_dir(tmp_path, model, params)
    d = tmp_path / "DAVIS"
    args = ["--checkpoint", ckpt, "--data_path", str(d), "--output_dir", str(tmp_path / "o"), "--scale_size", "64"]
    assert video_segmentation.main(args) == 1
    assert os.path.join("ImageSets", "2017", "val.txt") in _one_error_line(capsys)
    (d / "ImageSets" / "2017").mkdir(parents=True)
    (d / "ImageSets" / "2017" / "val.txt").write_text("cars\n")
    assert video_segmentation.main(args) == 1
    assert os.path.join("JPEGImages", "480p", "cars") in _one_error_line(capsys)
    (d / "JPEGImages" / "480p" / "cars").mkdir(parents=True)
    for t in range(2):
        Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(d / "JPEGImages" / "480p" / "cars" / f"{t:05d}.jpg")
    (d / "Annotations" / "480p" / "cars").mkdir(parents=True)
    assert video_segmentation.main(args) == 1
    assert os.path.join("Annotations", "480p", "cars", "00000.png") in _one_error_line(capsys)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(d / "Annotations" / "480p" / "cars" / "00000.png")
    assert video_segmentation.main(args) == 1
    assert "not an indexed" in _one_error_line(capsys)               # RGB, not a palette PNG


# --------------------------------------------------------------------------
# Periodic evaluation during training, and export --step.
# --------------------------------------------------------------------------
def test_training_runs_config_evals_each_epoch_and_export_step(tmp_path, capsys):
    """2 epochs of 2 steps with ``config.evals.knn`` every epoch: the k-NN numbers of
    epoch 0 land in log.txt and the progress stream; ``export --step 2`` writes that
    checkpoint's teacher backbone (the state key is 'teacher')."""
    import importlib.util

    from dino_jax import export, trainer

    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(REPO, "configs", "quickstart.py"))
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    c = qs.get_config()
    c.model.update(dict(patch_size=7, embed_dim=16, depth=1, num_heads=2, out_dim=64, head_hidden_dim=32,
                        head_bottleneck_dim=16, drop_path_rate=0.0))
    c.data.update(dict(num_local_crops=2, local_crop_size=14, shuffle_buffer=64, train_split="train[:16]"))
    c.update(dict(batch_size=8, total_steps=4, checkpoint_every_steps=2, log_every_steps=1, freeze_last_layer=0,
                  warmup_epochs=0.0))
    c.evals.knn.update(dict(every_epochs=1, eval_split="test[:16]", max_train_examples=16, batch_size=8, k=3,
                            random_init=False))
    workdir = str(tmp_path / "run")
    stream = io.StringIO()
    summary = trainer.train_and_evaluate(c, workdir, stream=stream)
    with open(os.path.join(workdir, "log.txt")) as f:
        lines = [json.loads(x) for x in f]
    assert lines[0]["epoch"] == 0 and 0 <= lines[0]["knn_top1"] <= 100 and lines[0]["knn_top5"] >= lines[0]["knn_top1"]
    assert "knn: knn_top1" in stream.getvalue()
    assert "knn_top1_trained" in summary and summary["step"] == 4

    out = str(tmp_path / "teacher2")
    assert export.main(["--workdir", workdir, "--output", out, "--step", "2"]) == 0
    params, cfg, _ = checkpoint.load_params_dir(out)
    ck = checkpoint.TrainCheckpointer(workdir, async_save=False)
    try:
        steps = ck.all_steps()
        tree, _ = ck.restore(2)
    finally:
        ck.close()
    assert 2 in steps and cfg["embed_dim"] == 16

    want = jax.tree.map(np.asarray, tree["teacher"]["backbone"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params["backbone"]), want)
    capsys.readouterr()
    assert export.main(["--workdir", workdir, "--output", str(tmp_path / "t3"), "--step", "3"]) == 1
    assert "no checkpoint at step 3" in _one_error_line(capsys)


@pytest.mark.parametrize("name", cases("eval_suite"))
def test_periodic_evaluators_from_config(name):
    """config.evals builds the evaluators of the blocks turned on; each runs when due and
    returns named numbers (here retrieval on the fixture set: the official mAP); an old
    flat field or an unknown block is one clear error."""
    from dino_jax import config_defaults
    from dino_jax.eval import periodic

    meta, arrays = load(name, "eval_suite")
    model, params = _model(meta, arrays)
    c = config_defaults.base_config()
    c.evals.retrieval.update(dict(data_path=_data(meta), dataset=meta["retrieval"]["dataset"],
                                  imsize=meta["retrieval"]["imsize"], every_epochs=2))
    evaluators = periodic.build(c)
    assert list(evaluators) == ["retrieval"]  # k-NN and the rest are off (-1) by default
    assert periodic.run_due(evaluators, model, params, epochs_done=1) == {}
    res = periodic.run_due(evaluators, model, params, epochs_done=2)
    assert res["roxford5k_map_medium"] == pytest.approx(100 * arrays["retrieval/single/medium/map"], abs=1e-9)
    assert res["roxford5k_map_hard"] == pytest.approx(100 * arrays["retrieval/single/hard/map"], abs=1e-9)
    assert all(isinstance(v, float) for v in res.values())
    assert periodic.run_due(evaluators, model, params, epochs_done=None) == res  # the end of training
    c.evals.retrieval.every_epochs = -1
    assert periodic.build(c) == {}
    c.evals.linear_probe = dict(every_epochs=1)
    with pytest.raises(periodic.EvalError, match="unknown evaluator 'linear_probe'"):
        periodic.build(c)
    c = config_defaults.base_config()
    c.knn_k = 10
    with pytest.raises(ValueError, match="^config field 'knn_k' is now 'evals.knn.k'$"):
        periodic.build(c)


_TWO_PROCESS_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from dino_jax import config_defaults, sharding
from dino_jax.eval import base, periodic
from dino_jax.models import vit

ran = []
run = base.FunctionEvaluator.run
base.FunctionEvaluator.run = lambda self, b, p: ran.append(self.name) or run(self, b, p)
cfg = json.loads(sys.argv[3])
model = vit.VisionTransformer(**cfg["model"])
params = {}
with np.load(cfg["params"]) as d:
    for k in d.files:
        node = params
        *head, leaf = k.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[leaf] = d[k]
mesh = sharding.make_mesh(1)
params = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding.replicated(mesh), np.asarray(x)),
                      params)
c = config_defaults.base_config()
c.data.update(cfg["data"])
c.evals.knn.update(cfg["knn"])
c.evals.retrieval.update(cfg["retrieval"])
evaluators = periodic.build(c, mesh)
res = periodic.run_due(evaluators, model, params, epochs_done=1)
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "ran": ran,
                              "res": res}), flush=True)
"""


@pytest.mark.parametrize("name", cases("eval_suite"))
def test_two_processes_run_one_periodic_evaluation(name, tmp_path):
    """Two CPU processes (one device each, one global mesh) run one periodic evaluation:
    k-NN splits its images between them and both get the numbers of a single-process
    k-NN of the same images; retrieval runs on process 0 alone (the other waits and
    receives its numbers, the official mAP), so nothing is computed or written twice."""
    import socket
    import subprocess
    import sys

    from dino_jax import config_defaults, sharding
    from dino_jax.eval import knn

    fmnist = "/usr/share/datasets/fashion-mnist"
    meta, arrays = load(name, "eval_suite")
    model, params = _model(meta, arrays)
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            walk(v, f"{prefix}{k}/") if hasattr(v, "items") else flat.__setitem__(prefix + k, np.asarray(v))
    walk(params, "")
    np.savez(tmp_path / "params.npz", **flat)
    cfg = {"model": dict(patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
                         num_heads=meta["num_heads"], mlp_ratio=meta["mlp_ratio"], img_size=meta["img_size"]),
           "params": str(tmp_path / "params.npz"),
           "data": dict(source="fashion_mnist", path=fmnist, eval_image_size=4 * meta["patch_size"],
                        eval_resize_ratio=1.0),
           "knn": dict(every_epochs=1, train_split="train[:48]", eval_split="test[:24]", k=5, batch_size=8),
           "retrieval": dict(every_epochs=1, data_path=_data(meta), dataset=meta["retrieval"]["dataset"],
                             imsize=meta["retrieval"]["imsize"])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_CHILD, f"127.0.0.1:{port}", str(i),
                               json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [json.loads(next(ln for ln in o.splitlines() if ln.startswith("RESULT "))[7:]) for o in outs]
    assert [g["process"] for g in got] == [0, 1] and got[0]["devices"] == 2
    assert got[0]["ran"] == ["retrieval"] and got[1]["ran"] == []       # retrieval on process 0 alone
    assert got[0]["res"] == got[1]["res"]
    res = got[0]["res"]
    assert res["roxford5k_map_medium"] == pytest.approx(100 * arrays["retrieval/single/medium/map"], abs=1e-9)
    c = config_defaults.base_config()
    c.data.update(cfg["data"])
    c.evals.knn.update(cfg["knn"])
    one = knn.KnnEvaluator(c.evals.knn, c.data, mesh=sharding.make_mesh(1)).run(model, params)
    assert res["knn_top1"] == pytest.approx(one["knn_top1"], abs=1e-9)
    assert res["knn_top5"] == pytest.approx(one["knn_top5"], abs=1e-9)


def test_linear_probe_runs_periodically_from_one_source(monkeypatch):
    """evals.linear builds the linear probe as a periodic evaluator: 3 epochs read one
    training source (re-shuffled per epoch, built once), and the validation top-1/top-5 and
    loss scored on the device equal NumPy's on the same classifier and features."""
    from dino_jax import config_defaults, sharding
    from dino_jax.data import pipeline
    from dino_jax.eval import linear, periodic

    model = vit.VisionTransformer(patch_size=7, embed_dim=16, depth=1, num_heads=2, img_size=28)
    params = model.init({"params": jax.random.key(0)}, np.zeros((1, 28, 28, 3), np.float32))["params"]
    c = config_defaults.base_config()
    c.data.update(dict(source="fashion_mnist", path="/usr/share/datasets/fashion-mnist", eval_image_size=28,
                       eval_resize_ratio=1.0))
    c.evals.linear.update(dict(every_epochs=2, train_split="train[:120]", eval_split="test[:50]", n_last_blocks=1,
                               epochs=3, batch_size=40, lr=0.5))
    made = []
    create = pipeline.create_supervised_train_iterator
    monkeypatch.setattr(pipeline, "create_supervised_train_iterator",
                        lambda *a, **k: made.append(a) or create(*a, **k))
    evaluators = periodic.build(c, sharding.make_mesh(1))
    assert list(evaluators) == ["linear"]
    assert periodic.run_due(evaluators, model, params, epochs_done=1) == {}
    res = periodic.run_due(evaluators, model, params, epochs_done=2)
    assert len(made) == 1 and evaluators["linear"].last["epochs_run"] == 3
    assert set(res) == {"linear_top1", "linear_top5", "linear_best_top1"}
    assert res["linear_best_top1"] >= res["linear_top1"]

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(37, 6)).astype(np.float32)
    labels = rng.integers(0, 7, 37)
    lin = {"weight": rng.normal(size=(7, 6)).astype(np.float32), "bias": np.zeros(7, np.float32)}
    lin["weight"][3] = lin["weight"][4]  # tied logits: the lower class first, as a stable sort
    got = linear.evaluate_linear(lin, linear.ValSet(feats, labels))
    logits = (feats.astype(np.float64) @ lin["weight"].T.astype(np.float64))
    order = np.argsort(-logits, axis=1, kind="stable")
    z = logits - logits.max(1, keepdims=True)
    nll = -(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(37), labels]
    assert got["acc1"] == pytest.approx(100 * np.mean(order[:, 0] == labels), abs=1e-9)
    assert got["acc5"] == pytest.approx(100 * np.mean((order[:, :5] == labels[:, None]).any(1)), abs=1e-9)
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-5)

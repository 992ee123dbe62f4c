"""gs:// everywhere, checked against a local GCS emulator (the ``gcs_emulator`` fixture),
and runs that resume on another host count.

Every training run is a real subprocess with the tiny dims of test_main.py, reading an
unlabeled image folder (32 images, 4 steps an epoch). The run that must die is this
file executed as a script: it parses the program's flags, sets up jax.distributed like
``dino_jax.main`` and SIGKILLs itself right after a step (``on_sync``).

What the emulator does not serve, and so is not checked here: gcsfs's bucket-type
lookup (the Storage Control gRPC API; see the fixture), and reading ``gs://`` through
TensorFlow's own GCS client (``tf.io.gfile`` / ``tf.data.TFRecordDataset``, which has
no endpoint setting): the TFDS records of ``data.tfds_data_dir`` on ``gs://`` are read
that way, so on real GCS only.
"""
import io
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dino_jax import checkpoint, export, extract, metrics_log, paths, torch_weights
from official_fixtures import nu_by_param_path, state_rel_err
from test_data import _tiny_tfds
from test_main import communicate_all, final_state, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, BATCH, STEPS = 32, 8, 6

TINY = [
    f"--config={REPO}/configs/quickstart.py",
    "--config.model.patch_size=7", "--config.model.embed_dim=16", "--config.model.depth=1",
    "--config.model.num_heads=2", "--config.model.out_dim=64", "--config.model.head_hidden_dim=32",
    "--config.model.head_bottleneck_dim=16", "--config.model.drop_path_rate=0.0",
    "--config.data.source=image_folder", "--config.data.train_split=train",
    "--config.data.local_crop_size=14",
    "--config.data.num_local_crops=2", "--config.evals.knn.every_epochs=-1",
    f"--config.batch_size={BATCH}", f"--config.total_steps={STEPS}", "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=10", "--config.log_every_steps=1",
    "--config.freeze_last_layer=0", "--config.warmup_epochs=0.0", "--config.lr=0.002",
]


def _images(n=NUM_IMAGES, size=24):
    """PNG bytes of ``n`` random RGB images (fixed seed)."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _cmd(workdir, data, *extra, kill_at=0):
    head = [os.path.abspath(__file__), str(kill_at)] if kill_at else ["-m", "dino_jax.main"]
    return [sys.executable, *head, f"--workdir={workdir}", *TINY, f"--config.data.path={data}", *extra]


def _env(emulator):
    return {**os.environ, **emulator, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO}


def run(emulator, workdir, data, *extra, kill_at=0, cwd):
    """One process; ``cwd`` is a scratch folder, so a path mistaken for a local one
    would land there, not in the repository."""
    return subprocess.run(_cmd(workdir, data, *extra, kill_at=kill_at), cwd=cwd, env=_env(emulator),
                          capture_output=True, text=True, timeout=600)


def run_two(emulator, workdir, data, *extra, kill_at=0, cwd):
    """Two jax.distributed CPU processes (one device each) on one workdir: their outputs."""
    port = free_port()
    procs = [subprocess.Popen(_cmd(workdir, data, f"--coordinator_address=127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={i}", *extra, kill_at=kill_at),
                              cwd=cwd, env=_env(emulator), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return communicate_all(procs)


def assert_same_run(ref, got, exact):
    """``got`` ends where ``ref`` does: bit for bit (same host count), or within the
    two-process test's tolerance (another host count: the gradient all-reduce sums in
    another order)."""
    adam = nu_by_param_path(ref)
    lr_sum = STEPS * 0.002 * BATCH / 256  # TINY pins the peak lr 0.002
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
        if exact or a.dtype.kind != "f":
            assert np.array_equal(a, b), f"{jax.tree_util.keystr(path)} differs"
        else:  # the tolerance and its reason: test_main.test_two_processes_match_one_process
            err = state_rel_err(path, b, a, embed_dim=16, adam=adam, lr_sum=lr_sum)
            assert err < 1e-4, f"{jax.tree_util.keystr(path)}: {err}"


@pytest.fixture(scope="module")
def bucket(gcs_emulator):
    """gs://dino-test with the images under images/train/, and the same images on disk."""
    from google.cloud import storage  # noqa: PLC0415

    storage.Client().create_bucket("dino-test")
    for i, data in enumerate(_images()):
        paths.write_bytes(f"gs://dino-test/images/train/{i:03d}.png", data)
    return "gs://dino-test"


@pytest.fixture(scope="module")
def reference(gcs_emulator, bucket, tmp_path_factory):
    """An unbroken 1-process run on local disk (the same images, copied down)."""
    root = tmp_path_factory.mktemp("local")
    (root / "images" / "train").mkdir(parents=True)
    for i, data in enumerate(_images()):
        (root / "images" / "train" / f"{i:03d}.png").write_bytes(data)
    r = run(gcs_emulator, root / "run", root / "images", cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return final_state(str(root / "run"))[1]


def _steps_logged(workdir):
    return [r["step"] for r in metrics_log.read_metrics(workdir)]


def test_gs_workdir_and_data_kill_resume_export_and_set_aside(gcs_emulator, bucket, reference, tmp_path):
    """A run with its workdir and its images in the bucket writes checkpoints, metrics.jsonl,
    log.txt and TensorBoard events there; SIGKILLed after step 4 and rerun, it ends bit for
    bit where the unbroken local run ends; export writes a params dir and a .pth to gs://,
    and extract reads that params dir and the images from gs:// and writes there; a
    damaged newest step in the bucket is set aside (copied, then deleted) and the one
    before it restored."""
    workdir, data = f"{bucket}/run", f"{bucket}/images"
    r = run(gcs_emulator, workdir, data, kill_at=4, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    assert paths.listdir(f"{workdir}/checkpoints") == ["2", "4"]
    assert _steps_logged(workdir) == [1, 2, 3, 4]  # flushed with each checkpoint
    r = run(gcs_emulator, workdir, data, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/4" in r.stdout
    assert os.listdir(tmp_path) == []  # nothing written to local disk
    step, got, meta = final_state(workdir)
    assert step == STEPS and meta["data"] == {"position": STEPS * BATCH, "skipped": 0}
    assert_same_run(reference, got, exact=True)
    assert _steps_logged(workdir) == list(range(1, STEPS + 1))
    epochs = [json.loads(x)["epoch"] for x in paths.read_text(f"{workdir}/log.txt").splitlines()]
    assert epochs == [0, 1]
    events = paths.listdir(f"{workdir}/tensorboard")
    assert len(events) == 2 and all(n.startswith("events.out.tfevents") for n in events)  # one per run
    assert all(len(paths.read_bytes(f"{workdir}/tensorboard/{n}")) > 100 for n in events)

    teacher = got["teacher"]["backbone"]
    export.export(workdir, f"{bucket}/export/params", "orbax")
    params, model_cfg, _ = checkpoint.load_params_dir(f"{bucket}/export/params")
    assert model_cfg["embed_dim"] == 16
    np.testing.assert_array_equal(params["backbone"]["pos_embed"], teacher["pos_embed"])
    export.export(workdir, f"{bucket}/export/teacher.pth", "torch")
    sd = torch_weights.read_state_dict(f"{bucket}/export/teacher.pth")
    np.testing.assert_array_equal(sd["pos_embed"], teacher["pos_embed"])
    # An evaluation tool end to end on gs://: checkpoint, image folder and output.
    assert extract.main(["--checkpoint", f"{bucket}/export/params", "--input", f"{data}/train",
                         "--image_size", "28", "--output", f"{bucket}/features.npz"]) == 0
    with np.load(paths.readable(f"{bucket}/features.npz")) as feats:
        assert feats["cls"].shape == (NUM_IMAGES, 16) and np.isfinite(feats["cls"]).all()
        assert list(feats["paths"][:2]) == ["000.png", "001.png"]

    step_dir = f"{workdir}/checkpoints/{STEPS}"  # damage: every array data file cut to 8 bytes
    damaged = [paths.join(d, n) for d, names in paths.walk_files(f"{step_dir}/state") if d.endswith("/d")
               for n in names]
    assert damaged
    for f in damaged:
        paths.write_bytes(f, paths.read_bytes(f)[:8])
    lines = []
    ck = checkpoint.TrainCheckpointer(workdir, async_save=False)
    try:
        assert ck.latest_readable_step(log=lines.append) == 4
    finally:
        ck.close()
    assert len(lines) == 1 and f"checkpoint step {STEPS} in {workdir}/checkpoints is unreadable" in lines[0]
    names = paths.listdir(f"{workdir}/checkpoints")
    aside = [n for n in names if n.startswith(f"{STEPS}.unreadable-")]
    assert str(STEPS) not in names and len(aside) == 1, names
    assert paths.exists(f"{workdir}/checkpoints/{aside[0]}/commit_success.txt")  # a whole copy


def test_a_gs_run_moves_from_one_process_to_two_and_back(gcs_emulator, bucket, reference, tmp_path):
    """One gs:// workdir, three host counts: 1 process killed after step 2, resumed by 2
    processes (both restore that one checkpoint; one copy of each log: every step logged
    once, one TensorBoard file per run) killed after step 4, resumed by 1 process. It
    ends where the unbroken 1-process run ends, within the two-process tolerance (the
    data position used to be saved per host: a 2-process run resumed by 1 ended 0.33
    relative away)."""
    workdir, data = f"{bucket}/hosts", f"{bucket}/images"
    r = run(gcs_emulator, workdir, data, kill_at=2, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    outs = run_two(gcs_emulator, workdir, data, kill_at=4, cwd=tmp_path)
    for rc, out in outs:
        assert rc == -signal.SIGKILL, out[-3000:]
    assert "2 process(es), 2 device(s)" in outs[0][1] and f"resumed from {workdir}/checkpoints/2" in outs[0][1]
    assert paths.listdir(f"{workdir}/checkpoints") == ["2", "4"]
    assert [json.loads(x)["step"] for x in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()] == [1, 2, 3, 4]
    assert len(paths.listdir(f"{workdir}/tensorboard")) == 2
    r = run(gcs_emulator, workdir, data, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 process(es)" in r.stdout and f"resumed from {workdir}/checkpoints/4" in r.stdout
    assert os.listdir(tmp_path) == []
    step, got, meta = final_state(workdir)
    assert step == STEPS and meta["data"]["position"] == STEPS * BATCH
    assert_same_run(reference, got, exact=False)
    assert _steps_logged(workdir) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("source", ["image_folder", "tfds_array_record"])
def test_data_position_resumes_the_same_global_batches_on_another_host_count(tmp_path, source):
    """The data state a checkpoint keeps is host-count free, for an image folder and an
    array_record TFDS dataset: after 2 steps on 2 hosts, 1 host reads next exactly the
    global batch an unbroken 1-host run reads at step 3, and 2 hosts resuming a 1-host
    run read its halves. A host count that cannot divide the global batch is refused
    in one line."""
    from dino_jax import config_defaults  # noqa: PLC0415
    from dino_jax.data import pipeline  # noqa: PLC0415
    from dino_jax.data.sources import DataError  # noqa: PLC0415

    cfg = config_defaults.base_config().data
    cfg.update(train_split="train", global_crop_size=16, local_crop_size=8, num_local_crops=2)
    if source == "image_folder":
        (tmp_path / "train").mkdir()
        for i, data in enumerate(_images()):
            (tmp_path / "train" / f"{i:03d}.png").write_bytes(data)
        cfg.update(source="image_folder", path=str(tmp_path))
    else:
        cfg.update(source="tfds", tfds_name=_tiny_tfds(tmp_path, "array_record"), tfds_data_dir=str(tmp_path))

    def it(hosts, h=0, state=None):
        return pipeline.create_train_iterator(cfg, BATCH, 0, process_index=h, process_count=hosts, state=state)

    unbroken = it(1)
    want = [next(unbroken)["global_crops"] for _ in range(4)]
    two = [it(2, h) for h in range(2)]
    for _ in range(2):
        [next(t) for t in two]
    state = two[0].get_state()
    assert state == {"position": 2 * BATCH, "skipped": 0}
    np.testing.assert_array_equal(next(it(1, state=state))["global_crops"], want[2])
    one = it(1)
    [next(one) for _ in range(3)]
    halves = [next(it(2, h, state=one.get_state()))["global_crops"] for h in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), want[3])
    with pytest.raises(DataError, match="global batch 8 is not divisible by the 3 hosts"):
        it(3, state=state)


def test_image_list_and_init_from_on_gs(gcs_emulator, bucket):
    """An image list in the bucket (paths relative to its folder) is read through the path
    layer, images included; a params dir written to gs:// is what ``init_from`` reads."""
    import ml_collections  # noqa: PLC0415

    from dino_jax import warm_start  # noqa: PLC0415
    from dino_jax.data.sources import make_source  # noqa: PLC0415

    paths.write_text(f"{bucket}/images/train/list.txt", "# two images\n003.png\n\n005.png\n")
    src = make_source(ml_collections.ConfigDict({"source": "image_folder",
                                                 "path": f"{bucket}/images/train/list.txt"}), "train")
    assert src.num_examples == 2 and src.describe(1) == f"{bucket}/images/train/005.png"
    image, label = src.load(1)
    from PIL import Image  # noqa: PLC0415

    np.testing.assert_array_equal(image.numpy(), np.asarray(Image.open(io.BytesIO(_images()[5]))))
    assert int(label) == -1
    backbone = {"pos_embed": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    checkpoint.save_params_dir(f"{bucket}/init", {"backbone": backbone}, {"arch": "vit_test"})
    init = warm_start.read_init_weights(f"{bucket}/init", num_heads=1)
    assert init.kind == "dino_jax params dir"
    np.testing.assert_array_equal(init.student["backbone"]["pos_embed"], backbone["pos_embed"])


def test_missing_or_unauthorised_bucket_is_one_line(gcs_emulator, tmp_path):
    """A missing bucket, and a server that answers 403 to everything (what GCS answers
    without permission): one error line each, no traceback, nothing written."""
    r = run(gcs_emulator, "gs://no-such-bucket/run", "gs://no-such-bucket/images", cwd=tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr[-3000:]
    assert err[0].startswith("error: bucket gs://no-such-bucket does not exist"), err
    forbidden = _forbidden_server()
    try:
        env = {**gcs_emulator, "STORAGE_EMULATOR_HOST": forbidden.url, "TENSORSTORE_GCS_HTTP_URL": forbidden.url}
        r = run(env, "gs://dino-test/run403", "gs://dino-test/images", cwd=tmp_path)
    finally:
        forbidden.shutdown()
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr[-3000:]
    assert err[0].startswith("error: access denied to bucket gs://dino-test"), err
    assert os.listdir(tmp_path) == []


def _forbidden_server():
    """An HTTP server on 127.0.0.1 answering every request with GCS's 403 JSON error."""
    import http.server  # noqa: PLC0415
    import threading  # noqa: PLC0415

    body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.get access",
                                 "errors": [{"reason": "forbidden"}]}}).encode()

    class Forbidden(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _kill_worker(kill_at, argv):
    """This file as a script: ``dino_jax.main``'s flags, jax.distributed set up as main
    does, and a SIGKILL of this process right after step ``kill_at`` once the saves in
    flight are complete (every process of the run does the same)."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from dino_jax import trainer  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "number of processes")
    flags.DEFINE_integer("process_id", None, "index of this process")
    flags.FLAGS(argv)
    f = flags.FLAGS
    trainer.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)

    def on_sync(step, checkpointer):
        if step == kill_at:
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.train_and_evaluate(f.config, f.workdir, on_sync=on_sync)


if __name__ == "__main__":
    _kill_worker(int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]])

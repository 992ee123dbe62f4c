"""The notebooks in colabs/: committed without outputs and as colabs/make_notebooks.py
generates them, and each executed top to bottom (nbclient, a python3 kernel on this
interpreter) with tiny parameters injected after its ``parameters`` cell. Any cell
error fails the test.

quickstart.ipynb runs first (a module fixture); attention_maps.ipynb then loads its
checkpoint (the offline fallback), features_and_retrieval.ipynb falls back to a tiny
random-init ViT and, when the official code is at hand ($OFFICIAL_DINO_DIR, a checkout of facebookresearch/dino) and
torch imports, compares with the official PyTorch model.
"""
import json
import math
import os
import re
import sys
import time

import pytest

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ["quickstart.ipynb", "attention_maps.ipynb", "features_and_retrieval.ipynb"]
FMNIST = "/usr/share/datasets/fashion-mnist"
OFFICIAL_DIR = os.environ.get("OFFICIAL_DINO_DIR", "")
CELL_TIMEOUT_S = 300

# The quickstart config with the tiny model of tests/test_main.py: 8 steps of batch 8.
QUICKSTART_TINY = {
    "model.patch_size": 7, "model.embed_dim": 16, "model.depth": 1, "model.num_heads": 2,
    "model.out_dim": 64, "model.head_hidden_dim": 32, "model.head_bottleneck_dim": 16,
    "data.num_local_crops": 2, "data.local_crop_size": 14, "data.shuffle_buffer": 256,
    "log_every_steps": 2, "checkpoint_every_steps": 100, "evals.knn.batch_size": 100,
    "warmup_epochs": 0.0, "freeze_last_layer": 0,
}
TINY_VIT = {"arch": "custom", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}


def read(name):
    return nbformat.read(os.path.join(COLABS, name), as_version=4)


def execute(name, params: dict, cwd):
    """Run the notebook with ``params`` injected after its 'parameters' cell; returns the
    executed notebook and the wall time."""
    nb = read(name)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    t0 = time.time()
    client.execute(env=env)  # raises CellExecutionError on any cell error
    return nb, time.time() - t0


def text_output(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "text/plain" in o.get("data", {}):
                out.append(o.data["text/plain"])
    return "\n".join(out)


def count_figures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs_and_is_generated(name):
    nb = read(name)
    nbformat.validate(nb)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name} cell {i} has outputs"
    assert "google.colab" in nb.cells[0].source and "REPO_URL =" in nb.cells[0].source  # the install cell
    import subprocess  # noqa: PLC0415

    r = subprocess.run([sys.executable, os.path.join(COLABS, "make_notebooks.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    # The notebook would download Fashion-MNIST when it is missing (Colab); tests stay offline.
    assert os.path.isdir(FMNIST), f"{FMNIST} missing: apt-get install dataset-fashion-mnist (.ci/run does)"
    tmp = tmp_path_factory.mktemp("quickstart_nb")
    workdir = str(tmp / "run")
    nb, seconds = execute("quickstart.ipynb", {
        "TOTAL_STEPS": 8, "BATCH_SIZE": 8, "WORKDIR": workdir, "KNN_TRAIN_EXAMPLES": 300,
        "KNN_TEST_EXAMPLES": 100, "PCA_EXAMPLES": 200, "NUM_ATTENTION_IMAGES": 2,
        "CONFIG_OVERRIDES": QUICKSTART_TINY}, tmp)
    return nb, seconds, workdir


def test_quickstart_notebook(quickstart):
    nb, _, workdir = quickstart
    text = text_output(nb)
    summary = json.loads(re.search(r'^\{"step": 8, .*\}$', text, re.M).group(0))
    assert summary["total_steps"] == 8
    assert 0 <= summary["knn_top1_random"] <= 100 and 0 <= summary["knn_top1_trained"] <= 100
    assert f"trained {summary['knn_top1_trained']:.2f}% vs random init {summary['knn_top1_random']:.2f}%" in text
    # The loss/lr/entropy plot reads metrics.jsonl: one record per 2 steps, the logged metrics.
    from dino_jax import metrics_log  # noqa: PLC0415

    records = metrics_log.read_metrics(workdir)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    lrs = [r["lr"] for r in records]  # no warm-up: cosine from 0.004 * 8 / 256 down, decreasing
    assert lrs[0] <= 0.004 * 8 / 256 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert all(math.isfinite(r["loss"]) and 0 <= r["teacher_entropy"] <= math.log(64) + 1e-4 for r in records)
    assert "4 logged steps" in text
    assert count_figures(nb) == 4  # metrics, k-NN bars, PCA, attention


def test_attention_maps_notebook_on_the_quickstart_checkpoint(quickstart, tmp_path):
    _, _, workdir = quickstart
    nb, _ = execute("attention_maps.ipynb", {
        "PTH_PATH": str(tmp_path / "absent.pth"), "CONVERTED_DIR": str(tmp_path / "absent"), "DOWNLOAD": False,
        "QUICKSTART_WORKDIR": workdir, "IMAGE_SIZE": 56, "PHOTOS": ["astronaut", "coffee", "chelsea"]}, tmp_path)
    text = text_output(nb)
    assert f"the teacher of the quickstart run in {workdir}" in text
    # 56 px with the quickstart's patch 7: 8x8 patches; each head's mask keeps >= 60% of its mass.
    for name in ("astronaut", "coffee", "chelsea"):
        m = re.search(rf"^{name}: \d+x\d+ -> 56x56, 8x8 patches; masks keep .* \(([\d.]+)-([\d.]+)% of the mass\)",
                      text, re.M)
        assert m and 60.0 <= float(m.group(1)) <= float(m.group(2)) <= 100.0, text
    assert count_figures(nb) == 3


def test_features_and_retrieval_notebook(tmp_path):
    official = OFFICIAL_DIR if os.path.isfile(os.path.join(OFFICIAL_DIR, "vision_transformer.py")) else ""
    nb, _ = execute("features_and_retrieval.ipynb", {
        "PTH_PATH": str(tmp_path / "absent.pth"), "CONVERTED_DIR": str(tmp_path / "absent"), "DOWNLOAD": False,
        "QUICKSTART_WORKDIR": str(tmp_path / "no_run"), "RANDOM_INIT": TINY_VIT, "IMAGE_SIZE": 48, "BATCH_SIZE": 8,
        "PHOTOS": ["astronaut", "coffee", "chelsea"], "OFFICIAL_DINO_DIR": official}, tmp_path)
    text = text_output(nb)
    assert "RANDOMLY INITIALISED backbone" in text
    assert re.search(r"^features \(12, 32\) of 12 images", text, re.M)  # 3 photos x 4 copies, width 32
    assert re.search(r"^\d+ of 12 retrieved images are copies", text, re.M)  # 3 queries x top 4
    # DINOv2 section: a random ViT-S/14 with 4 registers in the hub layout, converted; 3 photos at 224 px.
    assert "RANDOMLY INITIALISED dino_jax model of configs/dinov2_vits14_reg.py" in text
    assert "dino_jax.convert torch2jax --input dinov2_vits14_reg4_random.npz" in text
    assert re.search(r"^CLS \(3, 384\) registers \(3, 4, 384\) patches \(3, 256, 384\)$", text, re.M), text
    assert re.search(r"^CLS attention on the 4 registers", text, re.M)
    dinov2_figures = 2  # the patch-feature PCA, the register model's attention maps
    try:
        import torch  # noqa: F401, PLC0415
        have_torch = True
    except ImportError:
        have_torch = False
    if official and have_torch:
        # Same weights in the official model: features agree to float32 rounding (tolerance 1e-4).
        m = re.search(r"^max \|dino_jax - official\| over 384 feature values: (\S+)$", text, re.M)
        assert m and float(m.group(1)) < 1e-4, text
        assert count_figures(nb) == 2 + dinov2_figures
    else:
        assert "comparison with the official PyTorch model skipped" in text
        assert count_figures(nb) == 1 + dinov2_figures

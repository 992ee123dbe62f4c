"""Writes colabs/*.ipynb from the cell sources below (the notebooks are generated:
edit this file, then run ``python colabs/make_notebooks.py``; ``--check`` exits 1
when a committed notebook differs from what this file generates).

The notebooks are committed without outputs or execution counts. Each has one
cell tagged ``parameters`` (the papermill convention); tests/test_notebooks.py
executes every notebook with small values injected after it.
"""
from __future__ import annotations

import argparse
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
# Placeholder owner: on Colab, set REPO_URL in the first cell to the repository the notebook was
# opened from (colabs/README.md says how to open the notebooks in Colab).
REPO_URL = "https://github.com/OWNER/dino_jax"


def setup_cell(title: str) -> str:
    return f'''# dino_jax — {title}. Set-up: on Colab this clones and installs dino_jax (and the JAX
# build for the runtime's accelerator); where dino_jax is already importable it installs nothing.
REPO_URL = "{REPO_URL}"  # <- set OWNER: the dino_jax repository to install
REPO_DIR = "/content/dino_jax"  # where Colab clones it (configs/ lives there)

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB and importlib.util.find_spec("dino_jax") is None:
    if not os.path.isdir(REPO_DIR):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, REPO_DIR], check=True)
    if "COLAB_TPU_ADDR" in os.environ or "TPU_ACCELERATOR_TYPE" in os.environ or os.path.exists("/dev/accel0"):
        accelerator_jax = ["jax[tpu]"]  # TPU runtime (TPU VM: /dev/accel*)
    elif shutil.which("nvidia-smi"):
        accelerator_jax = ["jax[cuda12]"]  # GPU runtime
    else:
        accelerator_jax = []  # CPU runtime: the plain jax wheel
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{{REPO_DIR}}[notebooks]", *accelerator_jax],
                   check=True)
    sys.path.insert(0, REPO_DIR)

from dino_jax import runtime  # noqa: E402

runtime.set_xla_cpu_defaults()  # faster XLA:CPU steps (no effect on GPU/TPU); before `import jax`
import jax  # noqa: E402
import dino_jax  # noqa: E402

if not (IN_COLAB and os.path.isdir(REPO_DIR)):  # a checkout or an install: configs/ sits beside the package
    REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(dino_jax.__file__)))
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: text bars
print(f"jax {{jax.__version__}}, backend {{jax.default_backend()}}, devices {{jax.devices()}}")'''


# The backbone of attention_maps.ipynb and features_and_retrieval.ipynb, first found of: the
# released ViT-S/8 converted by dino_jax.convert (downloaded on Colab), quickstart.ipynb's run,
# a random init (with a printed note).
BACKBONE_PARAMETERS = """WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
PTH_PATH = "dino_deitsmall8_pretrain.pth"  # the released ViT-S/8 backbone (teacher), 86 MB
CONVERTED_DIR = "dino_vits8"               # params dir written by dino_jax.convert
DOWNLOAD = None                            # None: download on Colab only; True/False to force
QUICKSTART_WORKDIR = "/tmp/dino_quickstart_nb"  # offline fallback: quickstart.ipynb's run
RANDOM_INIT = {"arch": "vit_small", "patch_size": 8}  # last fallback (any dino_jax model config)
"""
BACKBONE_CELL = """import urllib.request

import numpy as np
from tqdm.auto import tqdm

from dino_jax import checkpoint
from dino_jax.models import vit

if DOWNLOAD is None:
    DOWNLOAD = IN_COLAB
if DOWNLOAD and not os.path.exists(PTH_PATH) and not checkpoint.is_params_dir(CONVERTED_DIR):
    with tqdm(unit="B", unit_scale=True, desc=os.path.basename(PTH_PATH)) as bar:
        def hook(blocks, block_size, total):
            bar.total = total
            bar.update(blocks * block_size - bar.n)
        urllib.request.urlretrieve(WEIGHTS_URL, PTH_PATH + ".part", reporthook=hook)
    os.replace(PTH_PATH + ".part", PTH_PATH)
if os.path.exists(PTH_PATH) and not checkpoint.is_params_dir(CONVERTED_DIR):
    cmd = [sys.executable, "-m", "dino_jax.convert", "torch2jax", "--input", PTH_PATH, "--output", CONVERTED_DIR]
    print("$ python", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)

if checkpoint.is_params_dir(CONVERTED_DIR):
    model, params = checkpoint.load_backbone(CONVERTED_DIR)
    print(f"backbone: {CONVERTED_DIR} (converted from {PTH_PATH})")
elif os.path.isdir(os.path.join(QUICKSTART_WORKDIR, "checkpoints")):
    model, params = checkpoint.load_backbone(QUICKSTART_WORKDIR)
    print(f"backbone: the teacher of the quickstart run in {QUICKSTART_WORKDIR} (no {PTH_PATH}: offline). "
          "It was trained on 28 px Fashion-MNIST and has seen no photographs.")
else:
    model = vit.build_backbone(RANDOM_INIT)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, model.img_size, model.img_size, 3), np.float32))["params"]
    print(f"NOTE: no {PTH_PATH} (download it from {WEIGHTS_URL}) and no quickstart run in {QUICKSTART_WORKDIR}: "
          "using a RANDOMLY INITIALISED backbone, whose attention shows no objects.")
print(vit.model_config(model))"""

# --------------------------------------------------------------------------
# quickstart.ipynb
# --------------------------------------------------------------------------
QUICKSTART = [
    ("code", setup_cell("quickstart: DINO on Fashion-MNIST")),
    ("markdown", """# DINO quickstart: a small ViT on Fashion-MNIST

Trains `configs/quickstart.py` (a 3-block ViT, patch 4, on 28 px Fashion-MNIST; 2342 steps,
~10 minutes on 2 CPU cores, up to a third more in a notebook kernel, which runs without the
tcmalloc that `python -m dino_jax.main` preloads) for `TOTAL_STEPS` steps, then:
the loss, learning rate and teacher entropy of the run; weighted k-NN accuracy of the
trained teacher against the same model at random init; a 2-D PCA of the features coloured
by class; and the last block's CLS attention on a few test images.
`attention_maps.ipynb` and `features_and_retrieval.ipynb` can reuse the run in `WORKDIR`."""),
    ("parameters", """# Parameters (tests/test_notebooks.py injects tiny values after this cell).
TOTAL_STEPS = 2342          # the quickstart's 2.5 epochs: +12 k-NN points in ~10 min on 2 CPU cores. Shorter
                            # runs gain little: 1000 steps gave +0.8 (the last layer is frozen for the 1st epoch)
BATCH_SIZE = 64
WORKDIR = "/tmp/dino_quickstart_nb"  # checkpoints, log.txt, metrics.jsonl, TensorBoard events
FRESH_RUN = True            # delete WORKDIR first; False resumes (or re-evaluates) the run in it
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
KNN_TRAIN_EXAMPLES = 10000  # k-NN feature bank (train split) ...
KNN_TEST_EXAMPLES = 2000    # ... and test images classified
PCA_EXAMPLES = 2000         # test images in the PCA plot
NUM_ATTENTION_IMAGES = 4    # test images whose attention maps are drawn
CONFIG_OVERRIDES = {}       # any other config field, e.g. {"model.depth": 2, "lr": 0.002}"""),
    ("markdown", """## Data
Fashion-MNIST's four IDX files: Debian's `dataset-fashion-mnist` offline; where they are
missing (Colab) they are downloaded from the dataset's GitHub repository."""),
    ("code", """import urllib.request

from tqdm.auto import tqdm

FMNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
FMNIST_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
if not all(os.path.exists(os.path.join(FASHION_MNIST_DIR, f)) for f in FMNIST_FILES):
    FASHION_MNIST_DIR = os.path.expanduser("~/data/fashion-mnist")
    os.makedirs(FASHION_MNIST_DIR, exist_ok=True)
    for f in tqdm(FMNIST_FILES, desc="downloading Fashion-MNIST"):
        if not os.path.exists(os.path.join(FASHION_MNIST_DIR, f)):
            urllib.request.urlretrieve(FMNIST_URL + f, os.path.join(FASHION_MNIST_DIR, f))
print("Fashion-MNIST:", FASHION_MNIST_DIR, sorted(os.listdir(FASHION_MNIST_DIR)))"""),
    ("markdown", "## The config: `configs/quickstart.py`, shortened"),
    ("code", """import importlib.util

config_path = os.path.join(REPO_DIR, "configs", "quickstart.py")
spec = importlib.util.spec_from_file_location("quickstart_config", config_path)
config_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_module)
config = config_module.get_config()
config.total_steps = TOTAL_STEPS
config.batch_size = BATCH_SIZE
config.data.path = FASHION_MNIST_DIR
config.evals.knn.max_train_examples = KNN_TRAIN_EXAMPLES
config.evals.knn.max_eval_examples = KNN_TEST_EXAMPLES
config.update_from_flattened_dict(CONFIG_OVERRIDES)
print(f"{config_path}: {config.total_steps} steps of batch {config.batch_size}, ViT {config.model.depth} blocks "
      f"x {config.model.embed_dim} wide, patch {config.model.patch_size}, {config.model.img_size} px")"""),
    ("markdown", """## Train
`dino_jax.trainer.train_and_evaluate` is what `python -m dino_jax.main --config=configs/quickstart.py`
runs: it trains, checkpoints into `WORKDIR`, and ends with the k-NN of the trained and of the
random-init teacher. Its log lines drive the progress bar."""),
    ("code", """import json
import re

from absl import logging as absl_logging

from dino_jax import trainer

absl_logging.set_verbosity(absl_logging.WARNING)


class ProgressBarStream:
    \"\"\"The training log as a progress bar: 'step N/M ...' lines move the bar, other lines print.\"\"\"

    def __init__(self, total):
        self.bar = tqdm(total=total, desc="training", unit="step")

    def write(self, text):
        for line in text.splitlines():
            m = re.match(r"step (\\d+)/\\d+\\s+epoch [\\d.]+\\s+(.*)", line)
            if m:
                self.bar.update(int(m.group(1)) - self.bar.n)
                self.bar.set_postfix_str(m.group(2)[:60], refresh=False)
            elif line.strip():
                self.bar.write(line)

    def flush(self):
        pass


if FRESH_RUN and os.path.isdir(WORKDIR):
    shutil.rmtree(WORKDIR)
stream = ProgressBarStream(config.total_steps)
summary = trainer.train_and_evaluate(config, WORKDIR, stream=stream)
stream.bar.close()
print(json.dumps(summary))"""),
    ("markdown", """## Loss, learning rate and teacher entropy
From `WORKDIR/metrics.jsonl` (one JSON line per logging step; the same scalars go to
TensorBoard under `WORKDIR/tensorboard`, and `log.txt` has the official per-epoch averages).
A teacher entropy that stays at log K means collapse to uniform, 0 collapse to one prototype."""),
    ("code", """import matplotlib.pyplot as plt
import numpy as np

from dino_jax import metrics_log

records = metrics_log.read_metrics(WORKDIR)
steps = [r["step"] for r in records]
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
for ax, key, title in zip(axes, ["loss", "lr", "teacher_entropy"],
                          ["DINO loss", "learning rate", f"teacher entropy (log K = {np.log(config.model.out_dim):.2f})"]):
    ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
plt.tight_layout()
plt.show()
print(f"{len(records)} logged steps; last: loss {records[-1]['loss']:.4f}, "
      f"teacher entropy {records[-1]['teacher_entropy']:.3f}")"""),
    ("markdown", "## k-NN: trained teacher vs. random init"),
    ("code", """labels = ["random-init teacher", "trained teacher"]
top1 = [summary["knn_top1_random"], summary["knn_top1_trained"]]
fig, ax = plt.subplots(figsize=(5, 3))
bars = ax.bar(labels, top1, color=["gray", "tab:blue"])
ax.bar_label(bars, fmt="%.1f%%")
ax.set_ylabel(f"k-NN top-1 (k={config.evals.knn.k}), %")
ax.set_ylim(0, 100)
plt.show()
print(f"trained {top1[1]:.2f}% vs random init {top1[0]:.2f}% ({top1[1] - top1[0]:+.2f} points)")"""),
    ("markdown", """## PCA of the features
L2-normalised CLS features of test images, projected on their first two principal components."""),
    ("code", """from dino_jax import checkpoint
from dino_jax.data import pipeline
from dino_jax.eval import common, features

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
model, trained_params = checkpoint.load_backbone(WORKDIR)
size = config.data.eval_image_size
random_params = model.init(jax.random.PRNGKey(config.seed), np.zeros((1, size, size, 3), np.float32))["params"]
feature_fn = features.feature_fn(model, "cls", normalize=True)
fig, axes = plt.subplots(1, 2, figsize=(13, 5))
for ax, (name, params) in zip(axes, tqdm([("trained teacher", trained_params), ("random init", random_params)],
                                         desc="features")):
    it = pipeline.create_eval_iterator(config.data, "test", 500, max_examples=PCA_EXAMPLES)
    feats, labels = common.iterator_features(feature_fn, params, it)
    centred = feats - feats.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=4)
    ax.set_title(f"{name}\\nPCA of {len(feats)} test features "
                 f"({100 * (s[:2] ** 2).sum() / (s ** 2).sum():.0f}% of the variance)")
cbar = fig.colorbar(sc, ax=axes, ticks=range(10))
cbar.ax.set_yticklabels(CLASSES)
plt.show()"""),
    ("markdown", """## Attention maps
The last block's attention of the CLS token to each patch, one map per head, for a few test
images (`dino_jax.eval.attention`; each patch drawn as a square)."""),
    ("code", """from dino_jax.data import sources
from dino_jax.eval import attention as dino_attention

test_images, test_labels = sources.read_fashion_mnist(FASHION_MNIST_DIR, "test")
n_heads = model.num_heads
fig, axes = plt.subplots(NUM_ATTENTION_IMAGES, n_heads + 1, figsize=(2 * (n_heads + 1), 2 * NUM_ATTENTION_IMAGES),
                         squeeze=False)
for row in range(NUM_ATTENTION_IMAGES):
    image = np.repeat(test_images[row][..., None], 3, axis=-1)  # grayscale -> RGB, as in training
    maps = dino_attention.upsample(dino_attention.cls_attention(model, trained_params, image), model.patch_size)
    axes[row, 0].imshow(image)
    axes[row, 0].set_title(CLASSES[test_labels[row]], fontsize=9)
    for h in range(n_heads):
        axes[row, h + 1].imshow(maps[h], cmap="viridis")
        axes[row, h + 1].set_title(f"head {h}", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
]


# --------------------------------------------------------------------------
# attention_maps.ipynb
# --------------------------------------------------------------------------
ATTENTION = [
    ("code", setup_cell("attention maps of a DINO ViT")),
    ("markdown", """# Attention maps of a DINO ViT

Per-head self-attention of the CLS token in the last block, the masks that keep 60% of each
head's attention mass, and overlays, on real photographs (scikit-image's bundled samples).

The backbone, first found of: the released ViT-S/8 (`WEIGHTS_URL`, downloaded on Colab or
put at `PTH_PATH` yourself) converted with `python -m dino_jax.convert torch2jax`; the
checkpoint of `quickstart.ipynb` (offline; trained on 28 px Fashion-MNIST, so its maps of
photographs are coarse); a randomly initialised ViT (with a note: its maps show no objects)."""),
    ("parameters", """# Parameters (tests/test_notebooks.py injects tiny values after this cell).
""" + BACKBONE_PARAMETERS + """IMAGE_SIZE = 480                           # official visualize_attention.py default: 480 x 480
THRESHOLD = 0.6                            # masks keep this fraction of each head's attention mass
PHOTOS = ["astronaut", "coffee", "chelsea"]  # scikit-image sample photographs"""),
    ("markdown", "## The backbone"),
    ("code", BACKBONE_CELL),
    ("markdown", """## Photographs
The image is resized to `IMAGE_SIZE` x `IMAGE_SIZE` (bilinear) and cropped to a multiple of the
patch size, as the official `visualize_attention.py` does."""),
    ("code", """import matplotlib.pyplot as plt
from skimage import data as skimage_data

from dino_jax.eval import attention as dino_attention

photos = {name: getattr(skimage_data, name)() for name in PHOTOS}
results = {}
for name, photo in tqdm(photos.items(), desc="attention"):
    image = dino_attention.prepare_image(photo, (IMAGE_SIZE, IMAGE_SIZE), model.patch_size)
    attention = dino_attention.cls_attention(model, params, image)  # (heads, h, w)
    heads, h, w = attention.shape
    masks = dino_attention.threshold_masks(attention.reshape(heads, -1), THRESHOLD).reshape(heads, h, w)
    results[name] = (image, attention, masks)
    kept = [100 * attention[j][masks[j]].sum() / attention[j].sum() for j in range(heads)]
    print(f"{name}: {photo.shape[1]}x{photo.shape[0]} -> {image.shape[1]}x{image.shape[0]}, {h}x{w} patches; "
          f"masks keep {', '.join(f'{m.sum()}' for m in masks)} patches "
          f"({min(kept):.1f}-{max(kept):.1f}% of the mass)")"""),
    ("markdown", """## Per-head attention, 60%-mass masks and overlays
Rows: the attention map of each head (min-max scaled), the mask of the most attended patches
holding `THRESHOLD` of the head's attention, and the photo with the mask tinted."""),
    ("code", """p = model.patch_size
for name, (image, attention, masks) in results.items():
    heads = attention.shape[0]
    maps = dino_attention.upsample(attention, p)
    up_masks = dino_attention.upsample(masks, p)
    fig, axes = plt.subplots(3, heads + 1, figsize=(2.2 * (heads + 1), 6.8), squeeze=False)
    for row in range(3):
        axes[row, 0].imshow(image)
    axes[0, 0].set_title(name)
    for j in range(heads):
        axes[0, j + 1].imshow(maps[j], cmap="viridis")
        axes[0, j + 1].set_title(f"head {j}")
        axes[1, j + 1].imshow(up_masks[j], cmap="gray", vmin=0, vmax=1)
        axes[1, j + 1].set_title(f"{THRESHOLD:.0%} mass")
        axes[2, j + 1].imshow(image)
        axes[2, j + 1].imshow(np.ma.masked_where(~up_masks[j], up_masks[j]), cmap="autumn", alpha=0.5)
    for ax in axes.flat:
        ax.axis("off")
    plt.tight_layout()
    plt.show()"""),
    ("markdown", """The command line writes the same maps as PNG files (and `attention.npz`):
`python -m dino_jax.visualize_attention --checkpoint DIR --image photo.jpg --output attn/`."""),
]


# --------------------------------------------------------------------------
# features_and_retrieval.ipynb
# --------------------------------------------------------------------------
FEATURES = [
    ("code", setup_cell("features and retrieval")),
    ("markdown", """# Features of an image folder, nearest-neighbour retrieval, and the official model

CLS features of every image in a folder with the Python API of `dino_jax.eval.features` (what
`python -m dino_jax.extract --checkpoint DIR --input FOLDER --output F.npz` writes), cosine
nearest neighbours shown as thumbnails, and — when PyTorch is installed and the official
code is at hand — the same features from the official PyTorch model, side by side.

The backbone, first found of: the released ViT-S/8 (downloaded on Colab) converted with
`python -m dino_jax.convert torch2jax`; the checkpoint of `quickstart.ipynb`; a randomly
initialised ViT (with a note). The folder defaults to a few scikit-image photographs plus a flipped and two cropped copies
of each: a good backbone retrieves the copies of a photo first."""),
    ("parameters", """# Parameters (tests/test_notebooks.py injects tiny values after this cell).
""" + BACKBONE_PARAMETERS + """IMAGE_DIR = ""             # a folder of images; "" = scikit-image photos and their copies in a temp folder
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
IMAGE_SIZE = 224           # evaluation transform: resize (256/224 of it) and centre crop
BATCH_SIZE = 8
TOP_K = 4                  # neighbours shown per query
OFFICIAL_DINO_DIR = ""     # a checkout of facebookresearch/dino (its vision_transformer.py); on Colab
                           # torch.hub fetches it when this is empty
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
DINOV2_PTH = "dinov2_vits14_reg4_pretrain.pth"  # DINOv2's released ViT-S/14 with 4 registers
DINOV2_DIR = ""            # a checkout of facebookresearch/dinov2: offline, a random model from its code
DINOV2_IMAGE_SIZE = 224    # a multiple of the patch size 14; 448 draws finer maps"""),
    ("markdown", "## The backbone"),
    ("code", BACKBONE_CELL),
    ("markdown", "## An image folder"),
    ("code", """import tempfile

from PIL import Image
from skimage import data as skimage_data

if not IMAGE_DIR:
    IMAGE_DIR = tempfile.mkdtemp(prefix="dino_photos_")
    for name in PHOTOS:
        photo = getattr(skimage_data, name)()
        h, w = photo.shape[:2]
        copies = {"original": photo, "flipped": photo[:, ::-1],
                  "crop-centre": photo[h // 8: h - h // 8, w // 8: w - w // 8],
                  "crop-left": photo[: 3 * h // 4, : 3 * w // 4]}
        for kind, image in copies.items():
            Image.fromarray(np.ascontiguousarray(image)).save(os.path.join(IMAGE_DIR, f"{name}-{kind}.png"))
print(IMAGE_DIR, len(os.listdir(IMAGE_DIR)), "files")"""),
    ("markdown", """## CLS features with the Python API
`features.load_inputs` reads the folder and applies the evaluation transform;
`features.extract` batches images of one size through the jitted backbone (one call on
the folder: `features.extract_features(model, params, IMAGE_DIR, image_size=IMAGE_SIZE)`)."""),
    ("code", """from dino_jax.eval import features as dino_features

inputs = dino_features.load_inputs(IMAGE_DIR, model.patch_size, image_size=IMAGE_SIZE)
bar = tqdm(total=len(inputs), desc="features", unit="img")
features = []
for start in range(0, len(inputs), BATCH_SIZE):  # one extract call per batch: the bar moves per batch
    idx = list(range(start, min(start + BATCH_SIZE, len(inputs))))
    chunk = dino_features.Inputs(len(idx), [inputs.sizes[i] for i in idx], lambda j, idx=idx: inputs.get(idx[j]))
    features.append(dino_features.extract(model, params, chunk, batch_size=BATCH_SIZE)[0])
    bar.update(len(idx))
bar.close()
features = np.concatenate(features)
paths = inputs.paths
print(f"features {features.shape} of {len(paths)} images from {IMAGE_DIR}")"""),
    ("markdown", """## Nearest-neighbour retrieval
Cosine similarity of L2-normalised features; each original photo queries the folder."""),
    ("code", """import matplotlib.pyplot as plt

normed = features / np.linalg.norm(features, axis=1, keepdims=True)
similarity = normed @ normed.T
photo_of = [os.path.basename(p).split("-")[0] for p in paths]
queries = [i for i, p in enumerate(paths) if "original" in p] or list(range(min(4, len(paths))))
k = min(TOP_K, len(paths) - 1)
fig, axes = plt.subplots(len(queries), k + 1, figsize=(2.2 * (k + 1), 2.3 * len(queries)), squeeze=False)
hits = 0
for row, q in enumerate(queries):
    order = [i for i in np.argsort(-similarity[q], kind="stable") if i != q][:k]
    axes[row, 0].imshow(Image.open(os.path.join(IMAGE_DIR, paths[q])))
    axes[row, 0].set_title(f"query: {os.path.basename(paths[q])}", fontsize=8)
    for col, i in enumerate(order):
        same = photo_of[i] == photo_of[q]
        hits += same
        axes[row, col + 1].imshow(Image.open(os.path.join(IMAGE_DIR, paths[i])))
        axes[row, col + 1].set_title(f"{os.path.basename(paths[i])}\\ncos {similarity[q, i]:.3f}", fontsize=8,
                                     color="green" if same else "red")
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()
print(f"{hits} of {len(queries) * k} retrieved images are copies of the query's photo")"""),
    ("markdown", """## The official PyTorch model, side by side
The same weights (`dino_jax.convert.flax_to_torch_backbone`: the official state-dict layout)
loaded into the official `VisionTransformer` with `strict=True`, fed the same preprocessed
images. Needs torch and the official code: `OFFICIAL_DINO_DIR` (a checkout of
facebookresearch/dino) or, on Colab, `torch.hub`."""),
    ("code", """from functools import partial

from dino_jax import convert


def official_vit_class():
    \"\"\"(the official VisionTransformer class, where it came from) or (None, why not).\"\"\"
    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed"
    if OFFICIAL_DINO_DIR:
        if not os.path.isfile(os.path.join(OFFICIAL_DINO_DIR, "vision_transformer.py")):
            return None, f"{OFFICIAL_DINO_DIR} has no vision_transformer.py"
        sys.path.insert(0, OFFICIAL_DINO_DIR)
        import vision_transformer  # the official module (imports the official utils.py beside it)
        return vision_transformer.VisionTransformer, f"{OFFICIAL_DINO_DIR}/vision_transformer.py"
    if IN_COLAB:
        import torch
        hub_model = torch.hub.load("facebookresearch/dino:main", "dino_vits8", pretrained=False)
        return type(hub_model), "torch.hub facebookresearch/dino:main"
    return None, "no official code: set OFFICIAL_DINO_DIR to a checkout of facebookresearch/dino"


VisionTransformer, origin = official_vit_class()
if VisionTransformer is None:
    print(f"comparison with the official PyTorch model skipped: {origin}")
else:
    import torch

    cfg = vit.model_config(model)
    official = VisionTransformer(
        img_size=[cfg["img_size"]], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"],
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg["layer_norm_eps"]))
    state_dict = convert.flax_to_torch_backbone(params)
    official.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    official.eval()
    torch_features = []
    with torch.no_grad():
        for start in tqdm(range(0, len(inputs), BATCH_SIZE), desc="official model"):
            x = np.stack([inputs.get(i) for i in range(start, min(start + BATCH_SIZE, len(inputs)))])
            torch_features.append(official(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy())
    torch_features = np.concatenate(torch_features)
    max_diff = float(np.abs(features - torch_features).max())
    print(f"official model from {origin}")
    print(f"{'image':<28} {'dino_jax CLS[:4]':<40} official PyTorch CLS[:4]")
    for i, p in enumerate(paths):
        print(f"{os.path.basename(p):<28} {np.array2string(features[i, :4], precision=4):<40} "
              f"{np.array2string(torch_features[i, :4], precision=4)}")
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(torch_features.ravel(), features.ravel(), s=2)
    ax.set_xlabel("official PyTorch feature")
    ax.set_ylabel("dino_jax feature")
    plt.show()
    print(f"max |dino_jax - official| over {features.size} feature values: {max_diff:.3g}")"""),
    ("markdown", """## DINOv2: patch-feature PCA and the attention of a register model
A DINOv2 ViT-S/14 with 4 registers (`configs/dinov2_vits14_reg.py`; docs/dinov2.md), converted
from a dinov2 hub state dict with `python -m dino_jax.convert torch2jax`. The state dict is,
first found of: the released `dinov2_vits14_reg4_pretrain.pth` (downloaded on Colab); a
randomly initialised `dinov2_vits14_reg` built by dinov2's own code (`DINOV2_DIR`, or
`torch.hub` on Colab); a randomly initialised dino_jax model of the same config written in
the hub layout. A random model shows no objects: the plots then only show what the API returns."""),
    ("code", """import jax
from dino_jax import checkpoint, convert
from dino_jax.models import vit

if DOWNLOAD and not os.path.exists(DINOV2_PTH):
    urllib.request.urlretrieve(DINOV2_URL, DINOV2_PTH + ".part")
    os.replace(DINOV2_PTH + ".part", DINOV2_PTH)
source, DINOV2_CONVERTED = DINOV2_PTH, "dinov2_vits14_reg"
if not os.path.exists(DINOV2_PTH):
    DINOV2_CONVERTED = "dinov2_vits14_reg_random"
if not os.path.exists(DINOV2_PTH) and not checkpoint.is_params_dir(DINOV2_CONVERTED):
    source = "dinov2_vits14_reg4_random.pth"
    hub_model = None
    if importlib.util.find_spec("torch") is not None and (DINOV2_DIR or IN_COLAB):
        import torch
        os.environ.setdefault("XFORMERS_DISABLED", "1")  # dinov2's plain PyTorch attention
        if DINOV2_DIR:
            sys.path.insert(0, DINOV2_DIR)
            from dinov2.hub.backbones import dinov2_vits14_reg
            hub_model = dinov2_vits14_reg(pretrained=False)
        else:
            hub_model = torch.hub.load("facebookresearch/dinov2", "dinov2_vits14_reg", pretrained=False)
    if hub_model is not None:
        convert.write_pth({k: v.numpy() for k, v in hub_model.state_dict().items()}, source)
        print(f"NOTE: no {DINOV2_PTH}: a RANDOMLY INITIALISED dinov2_vits14_reg from dinov2's code")
    else:  # the fields of configs/dinov2_vits14_reg.py, written with the hub's names (.npz: no torch)
        source = "dinov2_vits14_reg4_random.npz"
        hub_cfg = dict(vit.ARCHS["vit_small"], patch_size=14, img_size=518, num_register_tokens=4,
                       layerscale_init=1.0, interpolate_offset=0.0, interpolate_antialias=True, mask_token=True)
        random_model = vit.VisionTransformer(**hub_cfg)
        random_params = random_model.init(jax.random.PRNGKey(0), np.zeros((1, 518, 518, 3), np.float32))["params"]
        np.savez(source, **convert.flax_to_torch_backbone(jax.tree.map(np.asarray, random_params)))
        print(f"NOTE: no {DINOV2_PTH} and no dinov2 code (DINOV2_DIR): a RANDOMLY INITIALISED "
              "dino_jax model of configs/dinov2_vits14_reg.py, written with the hub's tensor names")
if not checkpoint.is_params_dir(DINOV2_CONVERTED):
    cmd = [sys.executable, "-m", "dino_jax.convert", "torch2jax", "--input", source, "--output", DINOV2_CONVERTED]
    print("$ python", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)
d2_model, d2_params = checkpoint.load_backbone(DINOV2_CONVERTED)
print(vit.model_config(d2_model))"""),
    ("markdown", """`forward_features` returns what dinov2's does: the normalised CLS token, the register
tokens and the patch tokens. The first three principal components of the patch tokens of
all photos, mapped to RGB, show which parts of the images the features group together."""),
    ("code", """originals = [i for i, p in enumerate(paths) if "original" in p] or list(range(min(4, len(paths))))
d2_inputs = dino_features.load_inputs(IMAGE_DIR, d2_model.patch_size, image_size=DINOV2_IMAGE_SIZE)
d2_images = np.stack([d2_inputs.get(d2_inputs.paths.index(paths[i])) for i in originals])
d2_forward = jax.jit(lambda p, x: d2_model.apply({"params": p}, x, return_attention=True,
                                                 method="forward_features"))
d2_out = jax.tree.map(np.asarray, d2_forward(d2_params, d2_images))
patch = d2_out["x_norm_patchtokens"]                    # (B, N, D)
gh, gw = d2_images.shape[1] // d2_model.patch_size, d2_images.shape[2] // d2_model.patch_size
flat = patch.reshape(-1, patch.shape[-1])
flat = flat - flat.mean(0)
_, _, components = np.linalg.svd(flat, full_matrices=False)
rgb = flat @ components[:3].T
rgb = (rgb - rgb.min(0)) / (rgb.max(0) - rgb.min(0) + 1e-8)
rgb = rgb.reshape(len(originals), gh, gw, 3)
print("CLS", d2_out["x_norm_clstoken"].shape, "registers", d2_out["x_norm_regtokens"].shape,
      "patches", patch.shape)
fig, axes = plt.subplots(2, len(originals), figsize=(3 * len(originals), 6), squeeze=False)
for col, i in enumerate(originals):
    axes[0, col].imshow(Image.open(os.path.join(IMAGE_DIR, paths[i])).convert("RGB"))
    axes[0, col].set_title(os.path.basename(paths[i]), fontsize=8)
    axes[1, col].imshow(rgb[col], interpolation="nearest")
    axes[1, col].set_title("patch PCA (3 components)", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
    ("markdown", """The last block's attention of the register model (dinov2's own model cannot return it:
its attention runs inside xFormers or `scaled_dot_product_attention`). `cls_attention` is the
CLS query's weights on the patches, per head; the rest of each row goes to the CLS token
itself and to the registers."""),
    ("code", """att = d2_out["attention"]                               # (B, heads, 1+R+N, 1+R+N)
cls_att = d2_out["cls_attention"].reshape(len(originals), -1, gh, gw)
r = d2_model.num_register_tokens
on_registers = att[:, :, 0, 1:1 + r].sum(-1)               # (B, heads)
print(f"CLS attention on the {r} registers, mean over images, per head:", np.round(on_registers.mean(0), 3))
heads = cls_att.shape[1]
fig, axes = plt.subplots(len(originals), heads + 1, figsize=(2 * (heads + 1), 2.1 * len(originals)), squeeze=False)
for row, i in enumerate(originals):
    axes[row, 0].imshow(Image.open(os.path.join(IMAGE_DIR, paths[i])).convert("RGB"))
    for h in range(heads):
        axes[row, h + 1].imshow(cls_att[row, h], cmap="inferno", interpolation="nearest")
        axes[row, h + 1].set_title(f"head {h}", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "attention_maps.ipynb": ATTENTION,
             "features_and_retrieval.ipynb": FEATURES}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for kind, source in cells:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes nothing
        cell["id"] = f"cell-{i}"
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a committed notebook differs from the generated one")
    a = ap.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = os.path.join(HERE, name)
        text = nbformat.writes(build(cells)) + "\n"
        if a.check:
            if not os.path.exists(path) or open(path).read() != text:
                stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path}")
    if stale:
        print(f"error: {', '.join(stale)} differ from colabs/make_notebooks.py: run python colabs/make_notebooks.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Input-pipeline throughput of the ImageNet DINO recipe (2x224 + 10x96 crops).

    python benchmarks/make_photo_folder.py --out /tmp/photos400 --num_images 400
    python benchmarks/input_pipeline.py --data /tmp/photos400 --num_images 384 --repeats 3 \
        --torch_python TORCH_VENV/bin/python [--device_augment]

Reads an ImageFolder (``--data``; default: a temporary folder of real photographs
made by ``make_photo_folder.py``, the ``bench`` extra), decodes each image once and
produces all crops with dino_jax's tf.data pipeline, on 1 core and on all cores.
When torchvision is importable (in this interpreter or ``--torch_python``), the
official ``DataAugmentationDINO`` (re-stated with torchvision/PIL transforms) in a
``DataLoader`` is measured too, on the same files and cores; every measurement is
repeated ``--repeats`` times, interleaved, and the table shows the median.

Per-stage table: CPU milliseconds per image on one core (``time.process_time`` of
the process, so it is less sensitive to other load than wall time) of decode, crop
+ resize, colour ops (flip, jitter, grayscale), blur, solarize + normalise and
batching, for dino_jax (cumulative tf.data variants, differences) and the official
transforms (timed one by one, 0 workers).

``--device_augment`` also measures the host side of ``data.device_augment=True``
(decode + crop/resize to uint8 + decisions) and reports the JAX photometric
augmentation's cost as a share of the ViT-S/16 train step (XLA cost analysis of
both, compiled on this machine's default backend from shapes only).

Prints tables; the last line is a JSON object (``images_per_second``, all cores,
and the other measured numbers). Exits 0; 1 with one ``error:`` line on bad input.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The official DataAugmentationDINO re-stated with torchvision transforms (run in a
# subprocess so a separate interpreter with torchvision can be used).
TORCHVISION_SCRIPT = r'''
import sys, time, random, torch
from PIL import ImageFilter, ImageOps, Image
from torchvision import datasets, transforms
root, n, workers, nlocal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)

class Blur:
    def __init__(self, p): self.p = p
    def __call__(self, img):
        if random.random() > self.p: return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

class Solarize:
    def __init__(self, p): self.p = p
    def __call__(self, img): return ImageOps.solarize(img) if random.random() < self.p else img

jitter = transforms.Compose([transforms.RandomHorizontalFlip(p=0.5),
    transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
    transforms.RandomGrayscale(p=0.2)])
norm = transforms.Compose([transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
bic = transforms.InterpolationMode.BICUBIC
g1 = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bic), jitter, Blur(1.0), norm])
g2 = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bic), jitter, Blur(0.1), Solarize(0.2), norm])
lo = transforms.Compose([transforms.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bic), jitter, Blur(0.5), norm])

def multi_crop(img):
    return [g1(img), g2(img)] + [lo(img) for _ in range(nlocal)]

ds = datasets.ImageFolder(root, transform=multi_crop)
sub = torch.utils.data.Subset(ds, list(range(min(n, len(ds)))))
dl = torch.utils.data.DataLoader(sub, batch_size=32, num_workers=workers, drop_last=False,
                                 persistent_workers=False, prefetch_factor=4 if workers else None)
it = iter(dl); seen = 0
first = next(it); seen += len(first[1]); t0 = time.time(); count = 0
for crops, _ in it:
    count += len(crops[0])
print(count / (time.time() - t0))
'''


def make_photos(root: str, n: int, seed: int = 0) -> None:
    """ImageNet-sized JPEGs (500x375 / 375x500, quality 90, ~90 KB like ImageNet's):
    1/f colour noise over 7 octaves, hard-edged discs, sensor noise -- detail a JPEG
    decoder has to work for, as in photos (smooth synthetic images decode 2x faster)."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "synthetic"), exist_ok=True)
    for i in range(n):
        h, w = (375, 500) if i % 3 else (500, 375)
        img = np.zeros((h, w, 3), np.float32)
        for octave in range(7):
            gh, gw = max(2, h * 2 ** octave // 128), max(2, w * 2 ** octave // 128)
            grid = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
            layer = np.stack([np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BICUBIC))
                              for c in range(3)], -1)
            img += layer * (40.0 / (1 + octave) ** 0.4)
        img += rng.uniform(60, 190, 3)
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(6):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[disc] = img[disc] * 0.5 + rng.uniform(0, 255, 3) * 0.5
        img += rng.normal(0, 9, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            os.path.join(root, "synthetic", f"{i:05d}.jpg"), quality=90)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# dino_jax's per-stage costs: cumulative variants of the per-image work (each image
# decoded, then crops cut/resized, coloured, ...), one map call at a time, CPU time.
STAGES_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, REPO)
from dino_jax.data.tfutil import tf
from dino_jax.config_defaults import base_config
from dino_jax.data import augment, pipeline, sources
root, n, nlocal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parent, split = os.path.dirname(root), os.path.basename(root)
dcfg = base_config().data
dcfg.update(dict(source="image_folder", path=parent, train_split=split,
    global_crop_size=224, local_crop_size=96, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
    num_local_crops=nlocal, num_parallel_calls=1, prefetch=2, device_augment=False))
src = sources.make_source(dcfg, split)
cfg = augment.MultiCropConfig.from_data_config(dcfg)
count = src.num_examples
def crops(until):
    def fn(i):
        image, _ = src.load(i % count)
        if until == "decode":
            return image[0, 0]
        return augment.multi_crop(image, tf.stack([tf.constant(0, tf.int64), i]), cfg, until=until)
    return fn
out = {}
for until in ("decode", "resize", "device", "colour", "no_blur", "all"):
    it = iter(tf.data.Dataset.range(10 ** 9).map(crops(until)).prefetch(1))
    for _ in range(6):
        next(it)
    c0 = time.process_time()
    for _ in range(n):
        next(it)
    out[until] = (time.process_time() - c0) * 1e3 / n
it = pipeline.TrainIterator(dcfg, 32, 0, process_index=0, process_count=1)
next(it)
c0, done = time.process_time(), 0
while done < n:
    done += len(next(it)["global_crops"])
out["iterator"] = (time.process_time() - c0) * 1e3 / done
print(repr(out))
"""

# The official transforms timed one by one (0 workers, one thread): CPU ms per image.
TORCHVISION_STAGES_SCRIPT = r"""
import sys, time, random, torch
from PIL import ImageFilter, ImageOps, Image
from torchvision import datasets, transforms
from torch.utils.data import default_collate
root, n, nlocal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
bic = transforms.InterpolationMode.BICUBIC
rrc = {"g": transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bic),
       "l": transforms.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bic)}
colour = transforms.Compose([transforms.RandomHorizontalFlip(p=0.5),
    transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
    transforms.RandomGrayscale(p=0.2)])
norm = transforms.Compose([transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def blur(img, p):
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))) if random.random() < p else img
ds = datasets.ImageFolder(root)
t = dict(decode=0.0, crop_resize=0.0, colour=0.0, blur=0.0, solarize_normalise=0.0, batching=0.0)
clock = time.process_time
examples = []
for k in range(n + 4):
    if k == 4:
        t = dict.fromkeys(t, 0.0)
    c = clock(); img = ds.loader(ds.samples[k % len(ds)][0]); t["decode"] += clock() - c
    out = []
    for kind, bp, sp in [("g", 1.0, 0.0), ("g", 0.1, 0.2)] + [("l", 0.5, 0.0)] * nlocal:
        c = clock(); x = rrc[kind](img); c2 = clock(); t["crop_resize"] += c2 - c
        x = colour(x); c3 = clock(); t["colour"] += c3 - c2
        x = blur(x, bp); c4 = clock(); t["blur"] += c4 - c3
        if random.random() < sp:
            x = ImageOps.solarize(x)
        out.append(norm(x)); t["solarize_normalise"] += clock() - c4
    examples.append((out, 0))
    if len(examples) == 32:
        c = clock(); default_collate(examples); t["batching"] += clock() - c; examples = []
print(repr({k: v * 1e3 / n for k, v in t.items()}))
"""


def _run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["failed"])[-1])
    return out.stdout.strip().splitlines()[-1]


def _one_core_env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}


def measure_tfdata(class_root: str, n: int, threads: int, num_local: int, device_augment: bool = False) -> float:
    """Images/s of dino_jax's pipeline on the ImageFolder ``class_root`` (class sub-folders);
    ``device_augment``: its host side only (uint8 crops + decisions)."""
    parent, split = os.path.dirname(os.path.abspath(class_root)), os.path.basename(os.path.abspath(class_root))
    code = rf"""
import os, sys, time
sys.path.insert(0, {REPO!r})
from dino_jax.data.tfutil import tf
from dino_jax.config_defaults import base_config
from dino_jax.data import pipeline
cfg = base_config().data
cfg.update(dict(source="image_folder", path={parent!r}, train_split={split!r},
    global_crop_size=224, local_crop_size=96, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
    num_local_crops={num_local}, num_parallel_calls={1 if threads == 1 else -1}, prefetch=2,
    device_augment={bool(device_augment)}))
it = pipeline.TrainIterator(cfg, 32, 0, process_index=0, process_count=1)
next(it); next(it)  # warm-up: XLA compilation of the colour stages, thread start
t0 = time.time(); count = 0
while count < {n}:
    b = next(it); count += len(b["global_crops"])
print(count / (time.time() - t0))
"""
    if threads == 1:
        return float(_run(["taskset", "-c", "0", sys.executable, "-c", code], _one_core_env()))
    return float(_run([sys.executable, "-c", code], {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}))


def measure_stages(class_root: str, n: int, num_local: int) -> dict:
    """dino_jax's CPU ms per image on one core, per stage (see STAGES_SCRIPT)."""
    code = STAGES_SCRIPT.replace("REPO", repr(REPO))
    c = ast.literal_eval(_run(["taskset", "-c", "0", sys.executable, "-c", code, class_root, str(n),
                               str(num_local)], _one_core_env()))
    return {"decode": c["decode"], "crop_resize": c["resize"] - c["decode"], "colour": c["colour"] - c["resize"],
            "blur": c["all"] - c["no_blur"], "solarize_normalise": c["no_blur"] - c["colour"],
            "batching": c["iterator"] - c["all"], "total": c["iterator"],
            "device_host_side": c["device"] + c["iterator"] - c["all"]}


def measure_torchvision_stages(python: str, root: str, n: int, num_local: int) -> dict:
    t = ast.literal_eval(_run(["taskset", "-c", "0", python, "-c", TORCHVISION_STAGES_SCRIPT, root, str(n),
                               str(num_local)]))
    t["total"] = sum(t.values())
    return t


def measure_torchvision(python: str, root: str, n: int, workers: int, cores: str, num_local: int):
    cmd = ["taskset", "-c", cores, python, "-c", TORCHVISION_SCRIPT, root, str(n), str(workers), str(num_local)]
    try:
        return float(_run(cmd)), None
    except RuntimeError as e:
        return None, str(e)


def has_torchvision(python: str) -> bool:
    r = subprocess.run([python, "-c", "import torchvision"], capture_output=True)
    return r.returncode == 0


def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def device_cost_share(batch_size: int, num_local: int) -> dict:
    """XLA cost analysis (flops, bytes accessed) of the JAX photometric augmentation of a
    ViT-S/16 batch against the whole ViT-S/16 train step (configs/vit_s16.py), both
    compiled from ShapeDtypeStructs on the default backend; nothing is executed."""
    import importlib.util  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from dino_jax import schedules, train  # noqa: PLC0415
    from dino_jax.data import device_augment  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("vit_s16", os.path.join(REPO, "configs", "vit_s16.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.batch_size, config.data.num_local_crops = batch_size, num_local
    b, g, lsz = batch_size, config.data.global_crop_size, config.data.local_crop_size
    sds = jax.ShapeDtypeStruct

    def aug(n):
        return {"flip": sds((b, n), bool), "jitter": sds((b, n), bool), "gray": sds((b, n), bool),
                "blur": sds((b, n), bool), "solarize": sds((b, n), bool), "factors": sds((b, n, 4), jnp.float32),
                "order": sds((b, n, 4), jnp.int32), "sigma": sds((b, n), jnp.float32)}

    dev_batch = {"global_crops": sds((b, 2, g, g, 3), jnp.uint8), "local_crops": sds((b, num_local, lsz, lsz, 3),
                 jnp.uint8), "global_aug": aug(2), "local_aug": aug(num_local)}
    batch = {"global_crops": sds((b, 2, g, g, 3), jnp.float32),
             "local_crops": sds((b, num_local, lsz, lsz, 3), jnp.float32)}
    models = train.build_models(config)
    state = jax.eval_shape(lambda: train.create_train_state(config, models=models))
    sched = jax.tree.map(lambda x: sds(np.shape(x), np.asarray(x).dtype),
                         schedules.device_schedules(schedules.build_schedules(config, 1000)))

    def cost(fn, *args):
        c = jax.jit(fn).lower(*args).compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return float(c.get("flops", float("nan"))), float(c.get("bytes accessed", float("nan")))

    af, ab = cost(lambda x: device_augment.apply(config, x), dev_batch)
    sf, sb = cost(train.make_train_step_fn(config, models), state, batch, sched)
    return {"backend": jax.default_backend(), "batch": b, "aug_gflops": af / 1e9, "aug_gbytes": ab / 1e9,
            "step_gflops": sf / 1e9, "step_gbytes": sb / 1e9, "flops_share": af / sf, "bytes_share": ab / sb}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="ImageFolder root (with a train/ split or class folders); default: photographs made "
                         "by benchmarks/make_photo_folder.py in a temporary folder")
    ap.add_argument("--num_images", type=int, default=384,
                    help="images timed per measurement (a few hundred: with ~100 the pipeline's "
                         "ramp-up is part of it); the folder should hold at least this many")
    ap.add_argument("--num_local_crops", type=int, default=10, help="local crops (ImageNet recipe: 10)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements of each pipeline, interleaved; the tables show the median "
                         "(shared cloud cores drift by tens of percent between runs)")
    ap.add_argument("--torch_python", default=sys.executable,
                    help="interpreter with torch+torchvision for the official-recipe comparison")
    ap.add_argument("--device_augment", action="store_true",
                    help="also measure the host side of data.device_augment and the device side's "
                         "share of the ViT-S/16 step (XLA cost analysis)")
    ap.add_argument("--cost_batch", type=int, default=64,
                    help="batch size of the ViT-S/16 step in the cost analysis (--device_augment)")
    ap.add_argument("--no_stages", action="store_true", help="skip the per-stage table")
    a = ap.parse_args()
    if a.num_images < 1 or a.repeats < 1 or a.cost_batch < 1:
        sys.exit("error: --num_images, --repeats and --cost_batch must be >= 1")
    if a.data is not None and not os.path.isdir(a.data):
        sys.exit(f"error: --data {a.data} is not a directory")
    cores = os.cpu_count() or 1
    tmp = None
    root = a.data
    if root is None:
        tmp = tempfile.mkdtemp(prefix="dino_bench_")
        root = tmp
        try:
            from make_photo_folder import make_photo_folder  # noqa: PLC0415

            print(f"writing {a.num_images + 32} JPEG photographs to {root} ...", flush=True)
            make_photo_folder(root, a.num_images + 32)
        except ImportError:
            print(f"scikit-image/scikit-learn missing (the 'bench' extra): generating "
                  f"{a.num_images + 32} synthetic JPEGs in {root} ...", flush=True)
            make_photos(os.path.join(root, "train"), a.num_images + 32)
    train_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(train_root) for f in fs]
    if not files:
        sys.exit(f"error: no images under {train_root}")
    with_tv = has_torchvision(a.torch_python)
    note = "" if with_tv else "torchvision not importable: pass --torch_python of an env with torch+torchvision"
    keys = ["ours_1", "ours_all"] + (["dev_1", "dev_all"] if a.device_augment else []) + ["tv_1", "tv_all"]
    runs = {k: [] for k in keys}
    stages, tv_stages = [], []
    for r in range(a.repeats):
        print(f"repeat {r + 1}/{a.repeats} ...", flush=True)
        runs["ours_1"].append(measure_tfdata(train_root, a.num_images, 1, a.num_local_crops))
        if with_tv:
            v, err1 = measure_torchvision(a.torch_python, train_root, a.num_images, 1, "0", a.num_local_crops)
            runs["tv_1"].append(v)
        runs["ours_all"].append(measure_tfdata(train_root, a.num_images, cores, a.num_local_crops))
        if with_tv:
            v, err2 = measure_torchvision(a.torch_python, train_root, a.num_images, cores,
                                          f"0-{cores - 1}", a.num_local_crops)
            runs["tv_all"].append(v)
            note = err1 or err2 or note
        if a.device_augment:
            runs["dev_1"].append(measure_tfdata(train_root, a.num_images, 1, a.num_local_crops, True))
            runs["dev_all"].append(measure_tfdata(train_root, a.num_images, cores, a.num_local_crops, True))
        if not a.no_stages:
            stages.append(measure_stages(train_root, min(a.num_images, 64), a.num_local_crops))
            if with_tv:
                tv_stages.append(measure_torchvision_stages(a.torch_python, train_root, min(a.num_images, 64),
                                                            a.num_local_crops))
        print("  " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v and v[-1] is not None), flush=True)
    med = {k: _median(v) for k, v in runs.items()}
    kb = np.mean([os.path.getsize(f) for f in files]) / 1024
    f = lambda v: f"{v:.1f}" if v is not None else "n/a"  # noqa: E731
    ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "n/a"  # noqa: E731
    print(f"\n2x224 + {a.num_local_crops}x96 crops per image, {a.num_images} images from {len(files)} files "
          f"(JPEG mean {kb:.0f} KB), {cores} cores, median of {a.repeats} interleaved runs")
    print(f"{'pipeline (img/s)':<44} {'1 core':>8} {f'{cores} cores':>9} {'vs official':>16}")
    rows = [("dino_jax tf.data (all on the host)", "ours")]
    if a.device_augment:
        rows.append(("dino_jax device_augment: host side", "dev"))
    for name, k in rows:
        print(f"{name:<44} {f(med[k + '_1']):>8} {f(med[k + '_all']):>9} "
              f"{ratio(med[k + '_1'], med['tv_1']) + ' / ' + ratio(med[k + '_all'], med['tv_all']):>16}")
    if with_tv:
        print(f"{'official torchvision/PIL DataLoader':<44} {f(med['tv_1']):>8} {f(med['tv_all']):>9}")
    result = {"images_per_second": med["ours_all"], "images_per_second_1core": med["ours_1"], "cores": cores}
    if with_tv:
        result.update(torchvision_images_per_second=med["tv_all"], torchvision_images_per_second_1core=med["tv_1"])
    if a.device_augment:
        result.update(device_augment_host_images_per_second=med["dev_all"],
                      device_augment_host_images_per_second_1core=med["dev_1"])
    if stages:
        names = ["decode", "crop_resize", "colour", "blur", "solarize_normalise", "batching", "total"]
        # The repeat with the median total (stage-wise medians of differences can mix repeats).
        mid = lambda runs: sorted(runs, key=lambda r: r["total"])[len(runs) // 2]  # noqa: E731
        ours = mid(stages)
        tv = mid(tv_stages) if tv_stages else {}
        print(f"\nper stage, CPU ms per image on one core (the repeat with the median total of {a.repeats})")
        print(f"{'stage':<22} {'dino_jax':>9} {'official':>9}")
        for k in names:
            print(f"{k.replace('_', ' + ' if k == 'solarize_normalise' else ' '):<22} {ours[k]:>9.2f} "
                  f"{tv[k] if tv else float('nan'):>9.2f}")
        print(f"{'device_augment host':<22} {ours['device_host_side']:>9.2f}")
        result["stages_ms_per_image"] = {k: round(v, 3) for k, v in ours.items()}
        if tv:
            result["torchvision_stages_ms_per_image"] = {k: round(v, 3) for k, v in tv.items()}
    if a.device_augment:
        share = device_cost_share(a.cost_batch, a.num_local_crops)
        print(f"\ndevice side (XLA cost analysis, ViT-S/16 batch {a.cost_batch}, {share['backend']}): "
              f"augmentation {share['aug_gflops']:.2f} GFLOP, {share['aug_gbytes']:.2f} GB accessed; "
              f"train step {share['step_gflops']:.0f} GFLOP, {share['step_gbytes']:.1f} GB; "
              f"share {100 * share['flops_share']:.2f}% of flops, {100 * share['bytes_share']:.2f}% of bytes")
        result["device_cost"] = share
    if note:
        print(note)
    if tmp:
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()

"""Times each evaluation program against the official DINO one on the same CPU,
back to back, on synthetic data of real size that this script makes.

    python benchmarks/eval_speed.py --official_dir DINO --official_python PY [--scale real|small]
        [--sections davis,retrieval,copy_detection,extraction,linear] [--workdir W] [--threads N]

Sections (``--scale real``; ``small`` shrinks every count for a quick check):

  davis           2 videos of 854x480, 10 frames each, ViT-S/16 (``eval.video_segmentation``
                  vs ``eval_video_segmentation.py``); agreement: share of mask pixels that differ
  retrieval       50 database images of 1024x768 and 5 queries in the revisited Oxford layout
                  (``gnd_roxford5k.pkl``), at ``--imsize 512 --multiscale`` and ``--imsize 224``
                  (``eval.retrieval`` vs ``eval_image_retrieval.py``); agreement: mAP M and H
  copy_detection  Copydays-sized images (512x384 here; the release is larger): 50 originals,
                  75 strong attacks, a jpegqual and a crops block, 100 distractors and 100
                  whitening images (``eval.copy_detection`` vs ``eval_copy_detection.py``); mAP
  extraction      an ImageFolder of 1,000 JPEGs of 500x375 at ``--image_size 224``
                  (``dino_jax.extract`` vs the official ``eval_knn.extract_features``);
                  agreement: the smallest cosine between the two sides' features
  linear          3 epochs of the linear probe over an ImageFolder of 2,000 training and
                  500 validation images, 10 classes, batch 128 (``eval.linear`` vs
                  ``eval_linear.py``); top-1 of each side

Both sides use the same random ViT-S/16 weights: the official model is built and
saved by ``--official_python``, then converted with ``dino_jax.convert torch2jax``.
The official scripts run unchanged through ``official_eval_shim.py`` (beside this
file: CPU instead of CUDA, a one-process gloo group). Each program is a subprocess;
its wall-clock seconds, CPU seconds (user + sys, its children included) and peak
RSS come from ``wait4``. ``ratio`` is official seconds / dino_jax seconds (above 1:
dino_jax is faster). Prints a table; the last line is JSON.
"""
import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from dino_jax.eval.video_segmentation import davis_palette

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTIONS = ("davis", "retrieval", "copy_detection", "extraction", "linear")
# Counts per scale: (real, small).
SIZES = {
    "davis_videos": (2, 1), "davis_frames": (10, 4),
    "retrieval_db": (50, 8), "retrieval_q": (5, 2),
    "copy_originals": (50, 6), "copy_strong": (75, 8), "copy_distractors": (100, 16), "copy_whitening": (100, 8),
    "extract_images": (1000, 48),
    "linear_train": (2000, 256), "linear_val": (500, 40), "linear_epochs": (3, 1),
}


# --------------------------------------------------------------------------
# Synthetic data.
# --------------------------------------------------------------------------
def synthetic_image(rng, h, w):
    """uint8 RGB: a smooth colour gradient with a few random rectangles and disks."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([(xx * rng.uniform(0.2, 1) + yy * rng.uniform(-0.5, 0.5) + rng.uniform(0, 255)) % 256
                    for _ in range(3)], -1)
    for _ in range(6):
        c = rng.integers(0, 256, 3)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        if rng.uniform() < 0.5:
            img[y0:y0 + rng.integers(h // 16, h // 3), x0:x0 + rng.integers(w // 16, w // 3)] = c
        else:
            r = rng.integers(min(h, w) // 20, min(h, w) // 5)
            img[(yy - y0) ** 2 + (xx - x0) ** 2 <= r * r] = c
    return img.astype(np.uint8)


def save_jpg(path, img, quality=90):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=quality)


def make_davis(root, rng, n_videos, n_frames, h=480, w=854):
    """DAVIS-2017 layout: frames with two disks moving over a textured background, and
    indexed-PNG annotations of every frame (1 and 2 the disks)."""
    from PIL import Image

    names = [f"video{v}" for v in range(n_videos)]
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    yy, xx = np.mgrid[0:h, 0:w]
    for v in names:
        bg = synthetic_image(rng, h, w)
        objs = [(rng.uniform(100, h - 100), rng.uniform(100, w - 100), rng.uniform(40, 90),
                 rng.uniform(-12, 12), rng.uniform(-12, 12), rng.integers(0, 256, 3)) for _ in range(2)]
        for t in range(n_frames):
            img, seg = bg.copy(), np.zeros((h, w), np.uint8)
            for k, (y, x, r, dy, dx, c) in enumerate(objs):
                m = (yy - (y + dy * t)) ** 2 + (xx - (x + dx * t)) ** 2 <= r * r
                img[m] = c
                seg[m] = k + 1
            save_jpg(os.path.join(root, "JPEGImages", "480p", v, f"{t:05d}.jpg"), img)
            p = os.path.join(root, "Annotations", "480p", v, f"{t:05d}.png")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            im = Image.fromarray(seg, "P")
            im.putpalette(davis_palette().ravel().tolist())
            im.save(p)


def make_retrieval(root, rng, n_db, n_q):
    """Revisited Oxford layout: roxford5k/jpg/*.jpg (1024x768) and gnd_roxford5k.pkl; each
    query is an edited copy of a few database images (easy), some hard and junk."""
    d = os.path.join(root, "roxford5k")
    imlist = [f"db_{i:04d}" for i in range(n_db)]
    qimlist = [f"q_{i:03d}" for i in range(n_q)]
    db = []
    for n in imlist:
        db.append(synthetic_image(rng, 768, 1024))
        save_jpg(os.path.join(d, "jpg", n + ".jpg"), db[-1])
    gnd = []
    for i, n in enumerate(qimlist):
        src = db[i % n_db]
        q = np.clip(src.astype(np.int16) + rng.integers(-20, 20, src.shape), 0, 255).astype(np.uint8)
        save_jpg(os.path.join(d, "jpg", n + ".jpg"), q)
        others = rng.permutation([j for j in range(n_db) if j != i % n_db])
        gnd.append({"easy": np.array([i % n_db] + list(others[:2])), "hard": np.array(others[2:4]),
                    "junk": np.array(others[4:5]), "bbx": np.array([0.0, 0.0, 1024.0, 768.0])})
    with open(os.path.join(d, "gnd_roxford5k.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def make_copydays(root, rng, n_orig, n_strong, n_dis, n_whit, h=384, w=512):
    """Copydays layout (original, strong, jpegqual/50, crops/50) plus distractor and
    whitening folders."""
    from PIL import Image

    cd = os.path.join(root, "copydays")
    origs = []
    for i in range(n_orig):
        origs.append(synthetic_image(rng, h, w))
        save_jpg(os.path.join(cd, "original", f"{200000 + i * 100}.jpg"), origs[-1])
        save_jpg(os.path.join(cd, "jpegqual", "50", f"{200000 + i * 100}.jpg"), origs[-1], quality=50)
        c = origs[-1][h // 4:3 * h // 4, w // 4:3 * w // 4]
        save_jpg(os.path.join(cd, "crops", "50", f"{200000 + i * 100}.jpg"), c)
    for j in range(n_strong):
        i = j % n_orig
        s = np.asarray(Image.fromarray(origs[i]).rotate(rng.uniform(-20, 20)).resize((w // 2, h // 2)))
        s = np.clip(s.astype(np.int16) + rng.integers(-30, 30, s.shape), 0, 255).astype(np.uint8)
        save_jpg(os.path.join(cd, "strong", f"{200000 + i * 100 + 1 + j // n_orig}.jpg"), s)
    for k in range(n_dis):
        save_jpg(os.path.join(root, "distractors", f"d{k:05d}.jpg"), synthetic_image(rng, h, w))
    for k in range(n_whit):
        save_jpg(os.path.join(root, "whitening", f"w{k:05d}.jpg"), synthetic_image(rng, h, w))


def make_image_folder(root, rng, n, classes=10, h=375, w=500):
    """ImageFolder of ``n`` JPEGs of ImageNet's typical size in ``classes`` classes, each
    class a colour cast."""
    tints = rng.integers(0, 256, (classes, 3))
    for i in range(n):
        c = i % classes
        img = (0.7 * synthetic_image(rng, h, w) + 0.3 * tints[c]).astype(np.uint8)
        save_jpg(os.path.join(root, f"class{c:02d}", f"img{i:06d}.jpg"), img)


def make_data(a, sec, work):
    """The data of one section (kept in ``work`` and reused by later runs)."""
    k = 0 if a.scale == "real" else 1
    n = {name: v[k] for name, v in SIZES.items()}
    if a.extract_images:
        n["extract_images"] = a.extract_images
    tag = f"-{n['extract_images']}" if sec == "extraction" else ""
    done = os.path.join(work, f"data-{sec}{tag}", "DONE")
    root = os.path.dirname(done)
    if os.path.exists(done):
        return root, n
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rng = np.random.default_rng(0)
    if sec == "davis":
        make_davis(root, rng, n["davis_videos"], n["davis_frames"])
    elif sec == "retrieval":
        make_retrieval(root, rng, n["retrieval_db"], n["retrieval_q"])
    elif sec == "copy_detection":
        make_copydays(root, rng, n["copy_originals"], n["copy_strong"], n["copy_distractors"], n["copy_whitening"])
    elif sec == "extraction":
        make_image_folder(os.path.join(root, "images"), rng, n["extract_images"])
    elif sec == "linear":
        make_image_folder(os.path.join(root, "train"), rng, n["linear_train"])
        make_image_folder(os.path.join(root, "val"), rng, n["linear_val"])
    open(done, "w").close()
    return root, n


# --------------------------------------------------------------------------
# Running and measuring.
# --------------------------------------------------------------------------
def run(cmd, env, log):
    """(wall s, CPU s of the process and its children, peak RSS MiB, output) of one program."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    out = open(log).read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        sys.exit(f"error: {' '.join(cmd)} exited {code} (log {log}):\n{tail}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, out


def env_for(a, official: bool):
    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
                   TF_NUM_INTRAOP_THREADS=str(a.threads), TF_NUM_INTEROP_THREADS=str(a.threads))
        if not official and a.threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    if not official:
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_weights(a, work):
    """(official .pth, dino_jax params dir) of one random ViT-S/16 (seed 0)."""
    pth = os.path.join(work, "vits16_random.pth")
    ck = os.path.join(work, "vits16_random_jax")
    if not os.path.exists(pth):
        code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import vision_transformer as v; "
                "torch.manual_seed(0); m = v.vit_small(patch_size=16, num_classes=0); "
                "torch.save({'teacher': m.state_dict()}, sys.argv[2])")
        subprocess.run([a.official_python, "-c", code, a.official_dir, pth], check=True)
    if not os.path.exists(ck):
        subprocess.run([sys.executable, "-m", "dino_jax.convert", "torch2jax", "--input", pth,
                        "--checkpoint_key", "teacher", "--output", ck], check=True, cwd=ROOT,
                       env=env_for(a, False))
    return pth, ck


def shim(a, *args):
    return [a.official_python, os.path.join(HERE, "official_eval_shim.py"), "--official_dir", a.official_dir,
            "--threads", str(a.threads)] + list(args)


def last_json(out):
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def mask_disagreement(dir_a, dir_b):
    """Share of pixels whose label differs between two folders of DAVIS masks (same names)."""
    from PIL import Image

    diff = total = 0
    for v in sorted(os.listdir(dir_a)):
        for f in sorted(os.listdir(os.path.join(dir_a, v))):
            x = np.asarray(Image.open(os.path.join(dir_a, v, f)))
            y = np.asarray(Image.open(os.path.join(dir_b, v, f)))
            diff += int((x != y).sum())
            total += x.size
    return diff / max(total, 1)


def jobs(a, sec, data, n, pth, ck, out):
    """[(program name, dino_jax command, official command, agreement(out_ours, out_official))]."""
    py = sys.executable
    ours_common = ["--checkpoint", ck]
    off_common = ["--pretrained_weights", pth, "--arch", "vit_small", "--patch_size", "16",
                  "--checkpoint_key", "teacher"]
    if sec == "davis":
        o1, o2 = os.path.join(out, "davis_ours"), os.path.join(out, "davis_official")

        def agree(_, __):
            return {"mask_pixels_differ": mask_disagreement(o1, o2)}

        return [("davis", [py, "-m", "dino_jax.eval.video_segmentation", *ours_common, "--data_path", data,
                           "--output_dir", o1],
                 shim(a, "--script", "eval_video_segmentation.py", "--", *off_common, "--data_path", data,
                      "--output_dir", o2), agree)]
    if sec == "retrieval":
        out_jobs = []
        for imsize, ms in ((512, True), (224, False)):
            def agree(o, f, ms=ms):
                m = re.search(r"mAP M: ([\d.]+), H: ([\d.]+)", f)
                j = last_json(o)
                return {"map_medium": [j.get("roxford5k_map_medium"), float(m.group(1))],
                        "map_hard": [j.get("roxford5k_map_hard"), float(m.group(2))]}

            out_jobs.append((f"retrieval_{imsize}" + ("_multiscale" if ms else ""),
                             [py, "-m", "dino_jax.eval.retrieval", *ours_common, "--data_path", data,
                              "--dataset", "roxford5k", "--imsize", str(imsize)] + (["--multiscale"] if ms else []),
                             shim(a, "--script", "eval_image_retrieval.py", "--", *off_common, "--data_path", data,
                                  "--dataset", "roxford5k", "--imsize", str(imsize), "--multiscale", str(ms),
                                  "--use_cuda", "False", "--num_workers", str(a.num_workers)), agree))
        return out_jobs
    if sec == "copy_detection":
        cd, dis, whit = (os.path.join(data, s) for s in ("copydays", "distractors", "whitening"))

        def agree(o, f):
            m = re.search(r"eval on strong mAP=([\d.]+)", f)
            return {"strong_map": [last_json(o).get("copydays_strong_map", float("nan")) / 100, float(m.group(1))]}

        return [("copy_detection",
                 [py, "-m", "dino_jax.eval.copy_detection", *ours_common, "--data_path", cd, "--distractors_path",
                  dis, "--whitening_path", whit],
                 shim(a, "--script", "eval_copy_detection.py", "--", *off_common, "--data_path", cd,
                      "--distractors_path", dis, "--whitening_path", whit, "--use_cuda", "False",
                      "--num_workers", str(a.num_workers)), agree)]
    if sec == "extraction":
        folder = os.path.join(data, "images")
        f1, f2 = os.path.join(out, "extract_ours.npz"), os.path.join(out, "extract_official.npy")

        def agree(_, __):
            x, y = np.load(f1)["cls"], np.load(f2)
            cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            return {"min_cosine": float(cos.min())}

        return [("extraction", [py, "-m", "dino_jax.extract", *ours_common, "--input", folder, "--output", f1,
                                "--image_size", "224"],
                 shim(a, "--extract", folder, "--weights", pth, "--out", f2, "--num_workers", str(a.num_workers)),
                 agree)]
    if sec == "linear":
        ep = str(n["linear_epochs"])

        def agree(o, f):
            # best validation top-1 over the epochs on each side (eval_linear.py's "Max accuracy")
            best = re.findall(r"Max accuracy so far: ([\d.]+)%", f)
            return {"best_top1": [last_json(o).get("best_acc1"), float(best[-1]) if best else None]}

        return [("linear", [py, "-m", "dino_jax.eval.linear", "--checkpoint", ck, "--source", "image_folder",
                            "--path", data, "--train_split", "train", "--eval_split", "val", "--epochs", ep,
                            "--batch_size", "128", "--num_labels", "10", "--no_resume", "--output_dir",
                            os.path.join(out, "linear_ours")],
                 shim(a, "--script", "eval_linear.py", "--", *off_common, "--data_path", data, "--epochs", ep,
                      "--batch_size_per_gpu", "128", "--num_labels", "10", "--num_workers", str(a.num_workers),
                      "--output_dir", os.path.join(out, "linear_official")), agree)]
    raise ValueError(sec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official_dir", default=os.environ.get("DINO_OFFICIAL_DIR", "dino"),
                    help="checkout of facebookresearch/dino (default: $DINO_OFFICIAL_DIR, else ./dino)")
    ap.add_argument("--official_python", default=os.environ.get("DINO_OFFICIAL_PYTHON", sys.executable),
                    help="python with torch, torchvision, opencv and tqdm for the official scripts "
                         "(default: $DINO_OFFICIAL_PYTHON, else this python)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--scale", default="real", choices=("real", "small"),
                    help="real: the sizes in this docstring; small: a few images each, for a quick check")
    ap.add_argument("--workdir", default="",
                    help="where data, weights and outputs go (kept, and the data reused); default: "
                         "eval_speed_work/ in the current directory")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for each side's numeric library (0: their defaults, all cores)")
    ap.add_argument("--num_workers", type=int, default=2,
                    help="data loader processes of the official scripts (their default 10 is for a GPU host)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="timed runs of each side, alternating dino_jax and official; the median is reported")
    ap.add_argument("--extract_images", type=int, default=0,
                    help="images in the extraction folder (0: the scale's count); compare peak RSS "
                         "at two counts to see that extraction's memory does not grow with the folder")
    a = ap.parse_args()
    sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        sys.exit(f"error: unknown section(s) {','.join(bad) or '(none)'}; choose from {','.join(SECTIONS)}")
    if not os.path.isfile(os.path.join(a.official_dir, "eval_linear.py")):
        sys.exit(f"error: --official_dir {a.official_dir} is not a checkout of facebookresearch/dino")
    if a.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    work = os.path.abspath(a.workdir or os.path.join(os.getcwd(), "eval_speed_work", a.scale))
    os.makedirs(work, exist_ok=True)
    pth, ck = make_weights(a, work)
    rows = []
    for sec in sections:
        data, n = make_data(a, sec, work)
        out = os.path.join(work, f"out-{sec}")
        for name, ours_cmd, off_cmd, agree in jobs(a, sec, data, n, pth, ck, out):
            res = {"ours": [], "official": []}
            for r in range(a.rounds):
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(os.path.join(out, "linear_official"))  # eval_linear.py writes its log there
                o = run(ours_cmd, env_for(a, False), os.path.join(work, f"{name}_ours.log"))
                f = run(off_cmd, env_for(a, True), os.path.join(work, f"{name}_official.log"))
                res["ours"].append(o)
                res["official"].append(f)
                print(f"  {name} round {r + 1}: dino_jax {o[0]:.1f}s ({o[1]:.0f} CPU s, {o[2]:.0f} MiB), "
                      f"official {f[0]:.1f}s ({f[1]:.0f} CPU s, {f[2]:.0f} MiB); {json.dumps(agree(o[3], f[3]))}",
                      flush=True)
            med = {k: sorted(v, key=lambda t: t[0])[len(v) // 2] for k, v in res.items()}
            row = {"program": name, "dino_jax_s": round(med["ours"][0], 2), "official_s": round(med["official"][0], 2),
                   "ratio": round(med["official"][0] / med["ours"][0], 2),
                   "dino_jax_cpu_s": round(med["ours"][1], 1), "official_cpu_s": round(med["official"][1], 1),
                   "dino_jax_rss_mib": round(med["ours"][2]), "official_rss_mib": round(med["official"][2]),
                   "agreement": agree(med["ours"][3], med["official"][3])}
            rows.append(row)
    print(f"{'program':28s} {'dino_jax s':>10s} {'official s':>10s} {'ratio':>6s} {'cpu s (ours/off)':>17s} "
          f"{'RSS MiB (ours/off)':>19s}  agreement")
    for r in rows:
        print(f"{r['program']:28s} {r['dino_jax_s']:10.1f} {r['official_s']:10.1f} {r['ratio']:6.2f} "
              f"{r['dino_jax_cpu_s']:8.0f}/{r['official_cpu_s']:<8.0f} {r['dino_jax_rss_mib']:9d}/"
              f"{r['official_rss_mib']:<9d}  {json.dumps(r['agreement'])}")
    print(json.dumps({"scale": a.scale, "threads": a.threads, "rounds": a.rounds, "results": rows}))


if __name__ == "__main__":
    main()

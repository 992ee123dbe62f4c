"""Learning parity over seeds: dino_jax against the official code on the same small recipe.

    python benchmarks/learning_parity.py --seeds 0 1 2 \
        --dino_dir /path/to/facebookresearch-dino --torch_python TORCH_VENV/bin/python

Runs the "nano" recipe (``configs/fmnist_nano.py``) with ``dino_jax.main`` and the
official modules through ``official_fmnist.py --subset 12800 --batch
128 --epochs 6 --lr 1e-3`` for every seed, then prints per seed and as mean ± std the
k-NN top-1 of the random-init and of the trained teacher for both, and the difference
of the means with its standard error (sqrt(s1^2/n1 + s2^2/n2)); for a variant
(``--tag``), also its paired per-seed difference from the default runs. Every finished run is
appended to ``--results`` (JSON lines) and reused when the command is run again, so a
long comparison can be stopped and continued, and variants (``--tag`` with
``--override``) share one file. Runs take ~10-15 min each on 2 CPU cores.

``--which dino_jax --config configs/quickstart.py`` gives the spread of the quickstart.
``--official_inits DIR`` saves the official run's initial weights of each seed (the anchor's
models right after ``torch.manual_seed(seed)``) as ``DIR/seed{S}.pth``; ``--tag offinit
--override 'init_from=DIR/seed{seed}.pth'`` then trains dino_jax from exactly those
weights, and the table pairs each seed with the official run of that seed.
Prints a table; the last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_ARGS = ["--subset", "12800", "--batch", "128", "--epochs", "6", "--lr", "1e-3"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds run on each side")
    ap.add_argument("--which", choices=["both", "dino_jax", "official"], default="both",
                    help="which side(s) to run; finished runs found in --results are reused either way")
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "fmnist_nano.py"),
                    help="dino_jax config (the nano recipe restates the official anchor)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --config.KEY=VALUE for the dino_jax runs (a variant; give it a --tag); "
                         "'{seed}' in VALUE becomes the run's seed (e.g. init_from=inits/seed{seed}.pth)")
    ap.add_argument("--tag", default="default",
                    help="name of the dino_jax variant (rows of the results file are keyed by side, tag, seed)")
    ap.add_argument("--dino_dir", default=None, help="checkout of facebookresearch/dino (official side)")
    ap.add_argument("--torch_python", default=sys.executable,
                    help="python with torch and torchvision for the official side")
    ap.add_argument("--official_script",
                    default=os.path.join(os.path.dirname(REPO), "shared", "tools", "official_fmnist.py"),
                    help="the official anchor script")
    ap.add_argument("--official_args", default=" ".join(OFFICIAL_ARGS),
                    help="arguments of the official anchor (the nano recipe by default)")
    ap.add_argument("--results", default="learning_parity.jsonl", help="JSON-lines file of finished runs")
    ap.add_argument("--workdir_root", default="/tmp/learning_parity", help="where dino_jax runs write")
    ap.add_argument("--list", action="store_true", help="print the table of --results without running anything")
    ap.add_argument("--official_inits", metavar="DIR", default=None,
                    help="only save the official nano run's initial weights of each seed as DIR/seed{S}.pth "
                         "(then: --tag offinit --override 'init_from=DIR/seed{seed}.pth')")
    return ap.parse_args(argv)


def load_results(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise RuntimeError("no JSON summary line in the output")


def run_dino_jax(args, seed):
    workdir = os.path.join(args.workdir_root, f"{args.tag}_seed{seed}")
    if os.path.exists(workdir):  # a fresh run every time: never resume a half-finished variant
        subprocess.run(["rm", "-rf", workdir], check=True)
    cmd = [sys.executable, "-m", "dino_jax.main", f"--config={args.config}", f"--workdir={workdir}",
           f"--config.seed={seed}", "--config.evals.knn.random_init=true"]  # the quickstart's baseline too
    overrides = [o.replace("{seed}", str(seed)) for o in args.override]
    cmd += [f"--config.{o}" for o in overrides]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dino_jax seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
    s = last_json_line(proc.stdout)
    return {"side": "dino_jax", "tag": args.tag, "seed": seed, "random": s["knn_top1_random"],
            "trained": s["knn_top1_trained"], "seconds": round(time.time() - t0, 1),
            "config": os.path.relpath(args.config, REPO), "overrides": overrides}


def run_official(args, seed):
    if not args.dino_dir:
        raise SystemExit("error: --dino_dir (a checkout of facebookresearch/dino) is needed for the official side")
    out = os.path.join(args.workdir_root, f"official_seed{seed}.json")
    os.makedirs(args.workdir_root, exist_ok=True)
    cmd = [args.torch_python, args.official_script, "--dino_dir", args.dino_dir, "--seed", str(seed),
           "--out", out] + args.official_args.split()
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"official seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(out) as f:
        s = json.load(f)
    return {"side": "official", "tag": "official", "seed": seed, "random": s["knn_random_init"],
            "trained": s["knn_trained_teacher"], "seconds": round(time.time() - t0, 1),
            "args": args.official_args}


# Run by --torch_python: the official anchor's initial student and teacher for each seed
# (built as official_fmnist.py builds them right after torch.manual_seed(seed)), saved as an
# official training checkpoint that dino_jax's init_from reads.
_OFFICIAL_INIT = r"""
import functools, os, sys, torch
script, dino_dir, out_dir = sys.argv[1:4]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
anchor = __import__(os.path.splitext(os.path.basename(script))[0])
vits, _, utils = anchor.load_official(dino_dir)
for seed in map(int, sys.argv[4:]):
    torch.manual_seed(seed)
    cfg = dict(img_size=[28], patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4, qkv_bias=True,
               norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    head_kw = dict(use_bn=False, nlayers=3, hidden_dim=512, bottleneck_dim=64)
    student = utils.MultiCropWrapper(vits.VisionTransformer(drop_path_rate=0.1, **cfg),
                                     vits.DINOHead(96, 1024, norm_last_layer=True, **head_kw))
    torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()},
                "teacher": student.state_dict(), "dino_loss": {"center": torch.zeros(1, 1024)}},
               os.path.join(out_dir, f"seed{seed}.pth"))
    print(os.path.join(out_dir, f"seed{seed}.pth"))
"""


def save_official_inits(args) -> int:
    """--official_inits DIR: DIR/seed{S}.pth, the official nano run's initial weights per seed."""
    if not args.dino_dir:
        print("error: --official_inits needs --dino_dir (a checkout of facebookresearch/dino)", file=sys.stderr)
        return 1
    os.makedirs(args.official_inits, exist_ok=True)
    proc = subprocess.run([args.torch_python, "-c", _OFFICIAL_INIT, args.official_script, args.dino_dir,
                           args.official_inits] + [str(s) for s in args.seeds], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: saving the official inits failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    print(proc.stdout.strip())
    return 0


def mean_std(xs):
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def _paired(out, key, label, variant, other, seeds):
    """Print and store in ``out[key]`` the per-seed trained differences variant - other."""
    d = [variant[s]["trained"] - other[s]["trained"] for s in seeds if s in variant and s in other]
    if not d:
        return
    md, sd = mean_std(d)
    se = sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    print(f"{'paired':>14} | {label}, trained, per seed "
          f"{', '.join(f'{x:+.2f}' for x in d)}: mean {md:+.2f} ± {se:.2f} (SE, n={len(d)})")
    out[key] = {"differences": d, "mean": md, "standard_error": se}


def summarize(rows, tag, seeds):
    """Per-seed table and mean ± std for official vs dino_jax[tag]; returns the JSON summary."""
    sides = {"official": {r["seed"]: r for r in rows if r["side"] == "official"},
             "dino_jax": {r["seed"]: r for r in rows if r["side"] == "dino_jax" and r["tag"] == tag}}
    print(f"{'seed':>6} | {'official random':>15} {'official trained':>16} | "
          f"{'dino_jax random':>15} {'dino_jax trained':>16}")
    for s in seeds:
        cells = []
        for side in ("official", "dino_jax"):
            r = sides[side].get(s)
            cells.append(f"{r['random']:>15.2f} {r['trained']:>16.2f}" if r else f"{'-':>15} {'-':>16}")
        print(f"{s:>6} | {cells[0]} | {cells[1]}")
    out = {"tag": tag}
    stats = {}
    for side in ("official", "dino_jax"):
        rs = [sides[side][s] for s in seeds if s in sides[side]]
        for key in ("random", "trained", "gain"):
            xs = [r["trained"] - r["random"] if key == "gain" else r[key] for r in rs]
            stats[side, key] = (mean_std(xs), len(xs))
    for key in ("random", "trained", "gain"):
        (mo, so), no = stats["official", key]
        (mj, sj), nj = stats["dino_jax", key]
        se = math.sqrt((so ** 2 / no if no > 1 else float("nan")) + (sj ** 2 / nj if nj > 1 else float("nan")))
        print(f"{key + ' mean±std':>14} | official {mo:6.2f} ± {so:4.2f} (n={no}) | "
              f"dino_jax {mj:6.2f} ± {sj:4.2f} (n={nj}) | dino_jax - official {mj - mo:+6.2f} ± {se:4.2f} (SE)")
        out[key] = {"official_mean": mo, "official_std": so, "dino_jax_mean": mj, "dino_jax_std": sj,
                    "difference": mj - mo, "standard_error": se, "n_official": no, "n_dino_jax": nj}
    if tag != "default":
        # Against the default on the same seeds: same init, data order and crop decisions,
        # so the per-seed differences isolate what the variant changes.
        base = {r["seed"]: r for r in rows if r["side"] == "dino_jax" and r["tag"] == "default"}
        _paired(out, "paired_vs_default", f"dino_jax[{tag}] - dino_jax[default]", sides["dino_jax"], base, seeds)
        # Against the official run of the same seed: the pairing of a variant that starts
        # from that run's own initial weights (init_from=.../seed{seed}.pth).
        _paired(out, "paired_vs_official", f"dino_jax[{tag}] - official", sides["dino_jax"],
                sides["official"], seeds)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.official_inits:
        return save_official_inits(args)
    rows = load_results(args.results)
    if not args.list:
        done = {(r["side"], r["tag"], r["seed"]) for r in rows}
        for seed in args.seeds:
            todo = []
            if args.which in ("both", "official") and ("official", "official", seed) not in done:
                todo.append(run_official)
            if args.which in ("both", "dino_jax") and ("dino_jax", args.tag, seed) not in done:
                todo.append(run_dino_jax)
            for fn in todo:
                try:
                    row = fn(args, seed)
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                print(f"{row['side']} seed {seed}: random {row['random']:.2f} trained {row['trained']:.2f} "
                      f"({row['seconds']:.0f} s)", flush=True)
                rows.append(row)
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
    summary = summarize(rows, args.tag, args.seeds)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

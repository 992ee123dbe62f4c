"""The bare CPU train step of this checkout against another checkout of dino_jax.

    git worktree add /tmp/base 8152f31            # or: git archive 8152f31 | tar -x -C /tmp/base
    taskset -c 1 python benchmarks/step_vs_commit.py --base /tmp/base --recipe nano --steps 4 --rounds 5

Each side runs in its own process with its own checkout on ``sys.path``: it builds
``benchmarks/train_step.py``'s bare step of ``--recipe`` (float32), compiles it, runs
two warm-up steps, and then the two sides take turns (base, ours, base, ours, ...)
through token files, each turn timing ``--steps`` steps by process CPU time (user +
sys), which other jobs on the host move less than wall time. Both processes inherit
this one's CPU affinity: pin it (``taskset``) for a stable figure. Prints each
side's per-round times, their medians and the speed ratio base / ours (>= 1: this
checkout is at least as fast); the last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def side(a):
    """One side: build, then time its turns; prints one JSON line of its round times."""
    sys.path.insert(0, a.repo)
    sys.path.insert(0, os.path.join(a.repo, "benchmarks"))
    import jax  # noqa: PLC0415

    import dino_jax  # noqa: PLC0415
    import train_step as tsb  # noqa: PLC0415  (that checkout's benchmarks/)

    if not os.path.abspath(dino_jax.__file__).startswith(os.path.abspath(a.repo)):
        sys.exit(f"error: dino_jax imported from {dino_jax.__file__}, not from {a.repo}")
    config = tsb.recipe_config(a.recipe)
    config.model.dtype = "float32"
    compiled, step, state, batch, _, _ = tsb.build_bare_step(config)
    acc = step.new_accumulator()
    for _ in range(2):
        state, m, acc = compiled(state, batch, step.schedule, acc)
    jax.block_until_ready(m)
    open(os.path.join(a.sync, f"ready_{a.side}"), "w").close()
    turn = os.path.join(a.sync, "turn")
    times = []
    for r in range(a.rounds):
        while not (os.path.exists(turn) and open(turn).read() == f"{r} {a.side}"):
            time.sleep(0.1)
        c0 = time.process_time()
        for _ in range(a.steps):
            state, m, acc = compiled(state, batch, step.schedule, acc)
        jax.block_until_ready(m)
        times.append((time.process_time() - c0) / a.steps)
        nxt = f"{r} ours" if a.side == "base" else f"{r + 1} base"
        with open(turn + ".tmp", "w") as f:
            f.write(nxt)
        os.replace(turn + ".tmp", turn)
    print(json.dumps({"side": a.side, "times": times, "loss": float(m["loss"])}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=False, help="checkout of dino_jax to compare against")
    ap.add_argument("--recipe", default="nano", help="benchmarks/train_step.py RECIPES name: nano | vit_s16")
    ap.add_argument("--steps", type=int, default=4, help="steps timed per turn")
    ap.add_argument("--rounds", type=int, default=5, help="turns per side")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a)
    if not a.base or not os.path.isfile(os.path.join(a.base, "benchmarks", "train_step.py")):
        sys.exit("error: --base must be a checkout of dino_jax (with benchmarks/train_step.py)")
    with tempfile.TemporaryDirectory() as sync:
        procs = {name: subprocess.Popen(
            [sys.executable, __file__, "--side", name, "--repo", repo, "--sync", sync, "--recipe", a.recipe,
             "--steps", str(a.steps), "--rounds", str(a.rounds)], stdout=subprocess.PIPE, text=True)
            for name, repo in (("base", os.path.abspath(a.base)), ("ours", REPO))}
        while not all(os.path.exists(os.path.join(sync, f"ready_{n}")) for n in procs):
            if any(p.poll() not in (None, 0) for p in procs.values()):
                sys.exit("error: a side failed before timing (see its output above)")
            time.sleep(0.5)
        with open(os.path.join(sync, "turn"), "w") as f:
            f.write("0 base")
        out = {}
        for name, p in procs.items():
            stdout, _ = p.communicate()
            if p.returncode:
                sys.exit(f"error: side {name} exited with {p.returncode}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])
    med = {n: sorted(o["times"])[len(o["times"]) // 2] for n, o in out.items()}
    for n in ("base", "ours"):
        print(f"{n:5s} median {med[n] * 1e3:8.1f} ms/step  rounds "
              f"{' '.join(f'{t * 1e3:.0f}' for t in out[n]['times'])}  loss {out[n]['loss']:.5f}")
    ratio = med["base"] / med["ours"]
    print(f"speed ratio base / ours: {ratio:.3f}")
    print(json.dumps({"recipe": a.recipe, "steps": a.steps, "rounds": a.rounds,
                      "base_ms": round(med["base"] * 1e3, 1), "ours_ms": round(med["ours"] * 1e3, 1),
                      "speed_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()

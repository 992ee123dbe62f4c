"""How much of the CPU train step is matrix products: each product of the compiled step, timed alone.

    python benchmarks/step_matmuls.py --recipe nano                 # one core
    python benchmarks/step_matmuls.py --recipe nano --threads 2 --torch_python VENV/bin/python

Compiles the real train step (``train.TrainStep``, the recipes of
benchmarks/train_step.py), times it (wall and process CPU time per step), then
reads every ``dot`` of the compiled program (XLA's own matmul thunks and those
inside loop fusions; the products inside YNNPACK fusions, e.g. ``q k^T`` with its
softmax, are left out and named in the footer), groups them by shapes and
dimension numbers, and times each group's product alone, compiled with the step's
XLA:CPU options, on ``--threads`` cores (the process is pinned to the first cores
of its affinity mask before JAX starts). ``--torch_python`` also times the same
products with torch (``torch.matmul``, same threads, as a subprocess). The sum of
the products' times is the step's matmul floor at that thread count: with one
thread it is CPU time, comparable with the step's CPU time per step.
Prints a table; the last line is a JSON object. Exits 0.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dino_jax import runtime  # noqa: E402

TORCH_TIMER = r"""
import json, sys, time, torch
a = json.loads(sys.argv[1]); torch.set_num_threads(a["threads"]); out = []
for lhs, rhs, perm_l, perm_r in a["products"]:
    x = torch.randn(*lhs).permute(*perm_l); y = torch.randn(*rhs).permute(*perm_r)
    for _ in range(3): torch.matmul(x, y)
    t = time.perf_counter(); n = 0
    while time.perf_counter() - t < a["seconds"]: torch.matmul(x, y); n += 1
    out.append((time.perf_counter() - t) / n * 1e3)
print(json.dumps(out))
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="nano", choices=["nano", "vit_s16"],
                   help="model, crops and batch (benchmarks/train_step.py's recipes)")
    p.add_argument("--threads", type=int, default=1,
                   help="cores the process is pinned to (the first of its affinity mask)")
    p.add_argument("--steps", type=int, default=5, help="train steps timed")
    p.add_argument("--seconds", type=float, default=0.3, help="time spent on each product")
    p.add_argument("--top", type=int, default=30, help="table rows (largest total first)")
    p.add_argument("--torch_python", default=None,
                   help="a Python with torch: also time each product with torch.matmul")
    return p.parse_args()


def step_dots(hlo: str):
    """[(lhs shape, rhs shape, dims dict)] for each dot of the compiled module outside
    YNNPACK fusions, and the number of dots inside them."""
    shape = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]", hlo, re.M))
    ynn_comps = set(re.findall(r"calls=%([\w.\-]+), [^\n]*__ynn_fusion", hlo))
    dots, in_ynn, comp = [], 0, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
        m = re.search(r"= f32\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\), ([^\n]*)", line)
        if not m:
            continue
        if comp in ynn_comps:
            in_ynn += 1
            continue
        dims = {k: tuple(int(v) for v in vals.split(",") if v)
                for k, vals in re.findall(r"(\w+_dims)=\{([\d,]*)\}", m.group(3))}
        lhs, rhs = (tuple(int(v) for v in shape[n].split(",") if v) for n in m.group(1, 2))
        dots.append((lhs, rhs, dims))
    return dots, in_ynn


def torch_layout(lhs, rhs, dims):
    """Permutations putting each operand in torch.matmul's (batch..., rows, contracted) /
    (batch..., contracted, cols) order, or None where the dot has several contracted or
    free axes on a side (not a plain matmul)."""
    lb, rb = dims.get("lhs_batch_dims", ()), dims.get("rhs_batch_dims", ())
    lc, rc = dims["lhs_contracting_dims"], dims["rhs_contracting_dims"]
    lf = [i for i in range(len(lhs)) if i not in lb + lc]
    rf = [i for i in range(len(rhs)) if i not in rb + rc]
    if len(lc) != 1 or len(lf) > 1 or len(rf) > 1:
        return None
    return list(lb) + lf + list(lc), list(rb) + list(rc) + rf


def main():
    a = parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    if a.threads > len(allowed):
        sys.exit(f"error: --threads {a.threads} but this process may use {len(allowed)} cores")
    os.sched_setaffinity(0, allowed[:a.threads])
    runtime.set_xla_cpu_defaults()
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from dino_jax import train  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(
        "train_step_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py"))
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    config = ts.recipe_config(a.recipe)
    config.model.dtype = "float32"
    compiled, step, state, batch, _, _ = ts.build_bare_step(config)
    acc = step.new_accumulator()
    for _ in range(2):
        state, m, acc = compiled(state, batch, step.schedule, acc)
    jax.block_until_ready(m)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(a.steps):
        state, m, acc = compiled(state, batch, step.schedule, acc)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / a.steps * 1e3
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / a.steps * 1e3

    dots, in_ynn = step_dots(compiled.as_text())
    groups = collections.Counter((lhs, rhs, tuple(sorted(dims.items()))) for lhs, rhs, dims in dots)
    opts = train.step_compiler_options("cpu")
    rows = []
    for (lhs, rhs, dims), count in groups.items():
        dd = dict(dims)
        dn = ((dd["lhs_contracting_dims"], dd["rhs_contracting_dims"]),
              (dd.get("lhs_batch_dims", ()), dd.get("rhs_batch_dims", ())))
        x, y = jax.numpy.ones(lhs, np.float32), jax.numpy.ones(rhs, np.float32)
        f = jax.jit(lambda x, y, dn=dn: jax.lax.dot_general(x, y, dn), compiler_options=opts)
        out = f(x, y).block_until_ready()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < a.seconds:
            out = f(x, y)
            n += 1
        out.block_until_ready()
        ms = (time.perf_counter() - t) / n * 1e3
        flops = 2 * out.size * int(np.prod([lhs[i] for i in dd["lhs_contracting_dims"]]))
        rows.append(dict(lhs=lhs, rhs=rhs, dims=dd, count=count, ms=ms, gflops=flops / ms / 1e6,
                         flop=flops * count))
    if a.torch_python:
        layouts = [torch_layout(r["lhs"], r["rhs"], r["dims"]) for r in rows]
        plain = [(r, lay) for r, lay in zip(rows, layouts) if lay is not None]
        arg = json.dumps({"threads": a.threads, "seconds": a.seconds,
                          "products": [(r["lhs"], r["rhs"], lay[0], lay[1]) for r, lay in plain]})
        res = subprocess.run([a.torch_python, "-c", TORCH_TIMER, arg], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"error: the torch timer failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
        for (r, _), ms in zip(plain, json.loads(res.stdout.strip().splitlines()[-1])):
            r["torch_ms"] = ms

    def form(r):
        dd = r["dims"]
        batch = f"b{len(dd.get('lhs_batch_dims', ()))} " if dd.get("lhs_batch_dims") else ""
        return f"{batch}c{dd['lhs_contracting_dims']}{dd['rhs_contracting_dims']}".replace(",)", ")")

    rows.sort(key=lambda r: -r["ms"] * r["count"])
    total = sum(r["ms"] * r["count"] for r in rows)
    torch_total = sum(r.get("torch_ms", 0.0) * r["count"] for r in rows)
    print(f"recipe {a.recipe}, {a.threads} thread(s), jax {jax.__version__}: step {wall:.1f} ms wall, "
          f"{cpu:.1f} ms CPU; {len(dots)} products in {len(rows)} shapes "
          f"(+{in_ynn} inside YNNPACK fusions, not timed)")
    hdr = f"{'count':>5} {'lhs':>20} {'rhs':>20} {'form':>14} {'ms each':>8} {'total':>8} {'GFLOP/s':>8}"
    print(hdr + (f" {'torch ms':>9} {'torch GF/s':>10}" if a.torch_python else ""))
    for r in rows[:a.top]:
        line = (f"{r['count']:5d} {str(r['lhs']):>20} {str(r['rhs']):>20} {form(r):>14} {r['ms']:8.3f} "
                f"{r['ms'] * r['count']:8.2f} {r['gflops']:8.1f}")
        if "torch_ms" in r:
            line += f" {r['torch_ms']:9.3f} {r['flop'] / r['count'] / r['torch_ms'] / 1e6:10.1f}"
        print(line)
    gflop = sum(r["flop"] for r in rows) / 1e9
    print(f"products alone: {total:.1f} ms ({gflop:.1f} GFLOP, {gflop / total * 1e3:.1f} GFLOP/s); "
          f"the step: {wall:.1f} ms wall, {cpu:.1f} ms CPU ({total / cpu:.0%} of it in products if run alone)"
          + (f"; torch.matmul on the same products: {torch_total:.1f} ms" if a.torch_python else ""))
    print(json.dumps({"recipe": a.recipe, "threads": a.threads, "step_wall_ms": round(wall, 2),
                      "step_cpu_ms": round(cpu, 2), "products_ms": round(total, 2), "products": len(dots),
                      "products_in_ynn_fusions": in_ynn, "gflop": round(gflop, 3),
                      "torch_products_ms": round(torch_total, 2) if a.torch_python else None}))


if __name__ == "__main__":
    runtime.reexec_with_tcmalloc()
    main()

"""What each CPU form of ``dino_jax/models/platform_ops.py`` earns on the whole CPU step.

    taskset -c 1 python benchmarks/cpu_forms.py --recipe nano --steps 4 --rounds 3 [--variants all_on,gelu]

Builds the bare train step (``benchmarks/train_step.py``'s ``build_bare_step``,
float32, ``model.platform_ops=cpu``) once per variant in one process: ``all_on``, then
each variant with one form (a CPU form, or one of the two every platform runs: gelu,
attention) replaced by JAX's autodiff of its plain formula (``generic`` replaces them
all), or with the bias + GELU backward's barrier removed (``recompute_barrier``). The
variants then take turns, round after round (the order reversed every other round),
each turn timing ``--steps`` steps by process CPU time. Prints the
median per variant and its ratio to ``all_on`` (> 1: the form saves that much); the
last line is a JSON object. Pin it to one core (``taskset``) for a stable figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import einops
import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import train_step as tsb  # noqa: E402  (benchmarks/ sibling)
from dino_jax import train  # noqa: E402
from dino_jax.models import head, platform_ops as ops, vit  # noqa: E402


def _plain_dot(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _autodiff_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _autodiff_attention(qkv, num_heads):
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=num_heads)
    return einops.rearrange(vit.dot_product_attention(q, k, v)[0], "b n h d -> b n (h d)")


# Each variant: (module, attribute, replacement) set while the step is traced.
VARIANTS = {
    "all_on": [],
    "linear": [(ops, "cpu_linear", _plain_dot)],
    "add_bias": [(ops, "cpu_add_bias", lambda y, b: y + b)],
    "bias_gelu": [(ops, "cpu_bias_gelu", lambda h, b: ops.gelu(h + b))],
    "recompute_barrier": [(ops, "_recompute_from", lambda h: h)],
    "gelu": [(ops, "gelu", _autodiff_gelu), (ops, "cpu_bias_gelu", lambda h, b: _autodiff_gelu(h + b))],
    "layer_norm": [(ops, "cpu_layer_norm", vit.layer_norm_formula)],
    "attention": [(ops, "attention", _autodiff_attention)],
    "weight_norm": [(ops, "cpu_weight_norm", head.weight_norm)],
    "library_options": [(train, "_cpu_library_options", lambda: ())],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="nano", choices=sorted(tsb.RECIPES),
                    help="model and crop sizes (benchmarks/train_step.py RECIPES)")
    ap.add_argument("--steps", type=int, default=4, help="steps timed per turn")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    ap.add_argument("--variants", default="",
                    help=f"comma-separated subset of {','.join(VARIANTS)},generic (default: all)")
    a = ap.parse_args()
    variants = dict(VARIANTS, generic=[r for v in VARIANTS.values() for r in v
                                       if r[0] is ops])
    names = a.variants.split(",") if a.variants else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {sorted(variants)}")
    if "all_on" not in names:
        names.insert(0, "all_on")

    config = tsb.recipe_config(a.recipe)
    config.model.dtype = "float32"
    config.model.platform_ops = "cpu"
    built = {}
    for name in names:
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in variants[name]]
        for mod, attr, f in variants[name]:
            setattr(mod, attr, f)
        try:
            compiled, step, state, batch, _, seconds = tsb.build_bare_step(config)
        finally:
            for mod, attr, f in saved:
                setattr(mod, attr, f)
        acc = step.new_accumulator()
        for _ in range(2):
            state, m, acc = compiled(state, batch, step.schedule, acc)
        jax.block_until_ready(m)
        built[name] = [compiled, step, state, batch, acc]
        print(f"# built {name}: compile {seconds:.1f} s, loss {float(m['loss']):.5f}", flush=True)

    times = {n: [] for n in names}
    for r in range(a.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            compiled, step, state, batch, acc = built[name]
            c0 = time.process_time()
            for _ in range(a.steps):
                state, m, acc = compiled(state, batch, step.schedule, acc)
            jax.block_until_ready(m)
            built[name][2], built[name][4] = state, acc
            times[name].append((time.process_time() - c0) / a.steps)

    base = float(np.median(times["all_on"]))
    print(f"\n{'variant (form off)':24s} {'CPU ms/step':>12s}  {'rounds':24s} off/all_on")
    result = {}
    for n in names:
        med = float(np.median(times[n]))
        result[n] = {"ms_per_step": round(med * 1e3, 1), "ratio": round(med / base, 3)}
        print(f"{n:24s} {med * 1e3:12.1f}  {' '.join(f'{t * 1e3:.0f}' for t in times[n]):24s} "
              f"{med / base:.3f}")
    print(json.dumps({"recipe": a.recipe, "steps": a.steps, "rounds": a.rounds, "variants": result}))


if __name__ == "__main__":
    main()

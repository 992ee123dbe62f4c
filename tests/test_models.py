"""ViT and DINO head against the official PyTorch numbers, and model behaviour.

Tolerance: max relative error (max|a-e| / max|e|) under 1e-4 in float32, as the
foundation issue states; measured here ~3e-7.
"""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import convert, train
from dino_jax.models import ops, vit
from dino_jax.models.head import DINOHead, frozen_weight_g_mask, weight_norm
from official_fixtures import cases, group, load, max_rel_err

TOL = 1e-4


def _backbone_from_fixture(name):
    meta, arrays = load(name)
    sd = group(arrays, "state_dict/")
    params = convert.torch_to_flax_backbone(sd, num_heads=meta["num_heads"])
    model = vit.VisionTransformer(
        patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
        num_heads=meta["num_heads"], mlp_ratio=meta.get("mlp_ratio", 4),
        qkv_bias=meta.get("qkv_bias", True), img_size=meta.get("img_size", 224),
        layer_norm_eps=meta.get("layer_norm_eps", 1e-6))
    return meta, arrays, sd, model, params


@pytest.mark.parametrize("name", cases("backbone"))
def test_backbone_parity(name):
    meta, arrays, _, model, params = _backbone_from_fixture(name)
    v = {"params": params}
    checked = 0
    for h, w in meta["sizes"]:
        key = f"{h}x{w}"
        x = jnp.asarray(arrays[f"inputs/{key}"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
        cls = model.apply(v, x)
        assert max_rel_err(cls, arrays[f"outputs/cls/{key}"]) < TOL, key
        inter = np.stack(model.apply(v, x, n=4, method="get_intermediate_layers"))
        assert max_rel_err(inter, arrays[f"outputs/intermediate4/{key}"]) < TOL, key
        if f"outputs/last_attention/{key}" in arrays:
            attn = model.apply(v, x, method="get_last_selfattention")
            assert max_rel_err(attn, arrays[f"outputs/last_attention/{key}"]) < TOL, key
            checked += 1
        # Patch tokens are the last block's normalised output: same as intermediate[-1].
        toks = model.apply(v, x, method="get_tokens")
        np.testing.assert_allclose(toks, inter[-1], rtol=0, atol=1e-6)
    assert checked >= 1, "no attention outputs were compared"


@pytest.mark.parametrize("name", cases("backbone"))
def test_backbone_roundtrip_bit_exact(name):
    meta, _, sd, _, params = _backbone_from_fixture(name)
    back = convert.flax_to_torch_backbone(params)
    assert sorted(back) == sorted(sd)  # same names: what strict=True loading requires
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert np.array_equal(back[k], v), k


@pytest.mark.parametrize("name", cases("head"))
def test_head_parity(name):
    meta, arrays = load(name)
    sd = group(arrays, "state_dict/")
    params = convert.torch_to_flax_head(sd, prefix="")
    head = DINOHead(out_dim=meta["out_dim"], norm_last_layer=meta["norm_last_layer"],
                    nlayers=meta["nlayers"], hidden_dim=meta["hidden_dim"],
                    bottleneck_dim=meta["bottleneck_dim"])
    init = head.init({"params": jax.random.key(0)}, jnp.zeros((1, meta["in_dim"])))["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    y = head.apply({"params": params}, jnp.asarray(arrays["inputs/x"]))
    assert max_rel_err(y, arrays["outputs/y"]) < TOL
    back = convert.flax_to_torch_head(params, prefix="")
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert np.array_equal(back[k], v), k


def test_position_embedding_interpolation_matches_torch_bicubic():
    """Our matrix form of upsample_bicubic2d against torch itself (any size, +0.1 rule)."""
    torch = pytest.importorskip("torch", reason="torch is the reference for this check")
    rng = np.random.default_rng(0)
    side, dim = 14, 5
    pe = rng.normal(size=(1, 1 + side * side, dim)).astype(np.float32)
    for gh, gw in [(6, 6), (4, 12), (28, 20), (14, 15)]:
        ours = np.asarray(vit.interpolate_pos_embed(jnp.asarray(pe), gh, gw, gh * 16, gw * 16))
        grid = torch.from_numpy(pe[:, 1:]).reshape(1, side, side, dim).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(
            grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
        ref = ref.permute(0, 2, 3, 1).reshape(1, -1, dim).numpy()
        assert max_rel_err(ours[:, 1:], ref) < 1e-5, (gh, gw)
        np.testing.assert_array_equal(ours[:, :1], pe[:, :1])
    # jax.image.resize's bicubic is a different kernel: the reason this code exists.
    naive = jax.image.resize(jnp.asarray(pe[0, 1:].reshape(side, side, dim)), (6, 6, dim), "bicubic")
    ours = vit.interpolate_pos_embed(jnp.asarray(pe), 6, 6, 96, 96)[0, 1:].reshape(6, 6, dim)
    assert max_rel_err(naive, ours) > 1e-3


def test_init_distributions_follow_official():
    model = vit.VisionTransformer(patch_size=8, embed_dim=64, depth=2, num_heads=4, img_size=64)
    p = model.init({"params": jax.random.key(1)}, jnp.zeros((1, 64, 64, 3)))["params"]
    qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"])
    assert abs(qkv.std() - 0.02) < 0.002  # trunc_normal(std=.02) with +-2 absolute bounds
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["bias"], 0)
    np.testing.assert_array_equal(p["norm"]["scale"], 1)
    conv = np.asarray(p["patch_embed"]["kernel"])  # torch default: U(+-1/sqrt(3*8*8))
    bound = 1 / np.sqrt(3 * 8 * 8)
    assert conv.max() <= bound and conv.min() >= -bound and conv.max() > 0.9 * bound
    assert abs(np.asarray(p["pos_embed"]).std() - 0.02) < 0.003
    head = DINOHead(out_dim=300, nlayers=3, hidden_dim=64, bottleneck_dim=32)
    hp = head.init({"params": jax.random.key(2)}, jnp.zeros((1, 64)))["params"]
    np.testing.assert_array_equal(hp["last_layer"]["weight_g"], 1)
    v = np.asarray(hp["last_layer"]["weight_v"])
    assert np.abs(v).max() <= 1 / np.sqrt(32) and np.abs(v).max() > 0.9 / np.sqrt(32)
    mask = frozen_weight_g_mask(hp, True)
    assert mask["last_layer"]["weight_g"] and not mask["last_layer"]["weight_v"]
    assert not any(jax.tree.leaves(frozen_weight_g_mask(hp, False)))


def test_drop_path_only_in_training():
    model = vit.VisionTransformer(patch_size=8, embed_dim=32, depth=4, num_heads=2, img_size=32,
                                  drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    v = model.init({"params": jax.random.key(1)}, x)
    eval1, eval2 = model.apply(v, x), model.apply(v, x, train=False)
    np.testing.assert_array_equal(eval1, eval2)
    t1 = model.apply(v, x, train=True, rngs={"drop_path": jax.random.key(3)})
    t2 = model.apply(v, x, train=True, rngs={"drop_path": jax.random.key(4)})
    assert not np.allclose(t1, eval1) and not np.allclose(t1, t2)
    # Rates grow linearly over depth: first block 0 (never dropped), last 0.5.
    no_drop = vit.VisionTransformer(patch_size=8, embed_dim=32, depth=4, num_heads=2, img_size=32)
    np.testing.assert_array_equal(no_drop.apply(v, x, train=True, rngs={"drop_path": jax.random.key(3)}),
                                  eval1)


def test_bfloat16_compute_keeps_float32_params():
    kw = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, img_size=32)
    f32, bf16 = vit.VisionTransformer(**kw), vit.VisionTransformer(**kw, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = bf16.init({"params": jax.random.key(1)}, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    out16, out32 = bf16.apply(v, x), f32.apply(v, x)
    assert out16.dtype == jnp.bfloat16
    err = max_rel_err(np.asarray(out16, np.float32), out32)
    assert 1e-5 < err < 5e-2, err  # really bf16, and still the same function


def test_any_size_and_clear_error_on_bad_size():
    model = vit.vit_tiny(patch_size=16, depth=1)
    v = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)))
    assert model.apply(v, jnp.zeros((2, 48, 112, 3))).shape == (2, 192)
    attn = model.apply(v, jnp.zeros((1, 48, 112, 3)), method="get_last_selfattention")
    assert attn.shape == (1, 3, 1 + 3 * 7, 1 + 3 * 7)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        model.apply(v, jnp.zeros((1, 50, 64, 3)))


def test_builders_match_official_dims():
    for fn, (d, h) in [(vit.vit_tiny, (192, 3)), (vit.vit_small, (384, 6)), (vit.vit_base, (768, 12))]:
        for p in (8, 16):
            m = fn(patch_size=p)
            assert (m.embed_dim, m.num_heads, m.depth, m.patch_size) == (d, h, 12, p)
            assert vit.build_backbone(vit.model_config(m)) == m


def test_gelu_matches_torch_gelu_and_its_gradient():
    """ops.gelu (erf form, hand-written backward) equals torch.nn.GELU() forward and
    backward, and jax.nn.gelu(approximate=False), to float32 rounding: 2e-6 absolute
    on x in [-12, 12] (|gelu| <= 12; torch's CPU kernel uses the same erf formula)."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(0, 3, 4000)]).astype(np.float32)
    g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    y, vjp = jax.vjp(ops.gelu, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.gelu(xt)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy(), rtol=0, atol=2e-6)
    y_ref, vjp_ref = jax.vjp(lambda v: jax.nn.gelu(v, approximate=False), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(vjp_ref(jnp.asarray(g))[0]), rtol=0, atol=2e-6)
    # a wrong backward (e.g. the cdf alone, missing x * pdf) is off by up to ~0.17 * |g|
    cdf_only = g * 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    assert np.max(np.abs(np.asarray(dx) - cdf_only)) > 0.1


def test_bias_gelu_equals_gelu_of_the_biased_input_and_its_gradients():
    """ops.bias_gelu(h, b) (the MLP's fc1 bias and GELU, recomputed in the backward from
    h) equals jax.nn.gelu(h + b, approximate=False) in value and both gradients, under
    jit on this CPU (the barrier path): 2e-6 absolute on values of size <= 12, the bias
    gradient (a sum over 400 rows) to 1e-5 of its largest entry."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(0, 3, (8, 50, 24)).astype(np.float32))
    b = jnp.asarray(rng.normal(0, 1, (24,)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(8, 50, 24)).astype(np.float32))

    def value_and_grads(f):
        return jax.jit(lambda h, b, g: (lambda y, vjp: (y,) + vjp(g))(*jax.vjp(f, h, b)))(h, b, g)

    y, dh, db = value_and_grads(ops.bias_gelu)
    y_ref, dh_ref, db_ref = value_and_grads(lambda h, b: jax.nn.gelu(h + b, approximate=False))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(dh_ref), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(db), np.asarray(db_ref), rtol=0, atol=1e-5 * np.abs(db_ref).max())
    assert db.shape == (24,) and np.abs(np.asarray(db_ref)).max() > 1  # a gradient that can be wrong


def test_layer_norm_matches_torch_layer_norm_and_its_gradient():
    """ops.layer_norm (row means as matrix-vector products on CPU, closed-form backward)
    equals torch.nn.functional.layer_norm in float64 autograd, value and the gradients
    of x, scale and bias, to 1e-5 of the largest entry (rows with a large mean, where
    E[x^2] - mean^2 would lose digits); with a bfloat16 input it equals
    flax.linen.LayerNorm (use_fast_variance=False, JAX's autodiff) to bf16 rounding."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    import flax.linen as nn
    rng = np.random.default_rng(0)
    b, n, d = 3, 11, 48
    x = (20 + 3 * rng.normal(size=(b, n, d))).astype(np.float32)
    scale = (1 + 0.3 * rng.normal(size=d)).astype(np.float32)
    bias = (0.2 * rng.normal(size=d)).astype(np.float32)
    g = rng.normal(size=(b, n, d)).astype(np.float32)
    args = [jnp.asarray(a) for a in (x, scale, bias)]
    out, vjp = jax.vjp(lambda *a: ops.layer_norm(*a, 1e-6), *args)
    grads = vjp(jnp.asarray(g))
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias)]
    ot = torch.nn.functional.layer_norm(ts[0], (d,), ts[1], ts[2], 1e-6)
    (ot * torch.tensor(g, dtype=torch.float64)).sum().backward()
    for got, want in [(out, ot.detach().numpy())] + [(gr, t.grad.numpy()) for gr, t in zip(grads, ts)]:
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # the module: parameters named as nn.LayerNorm's, output in the compute dtype
    ref = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32, use_fast_variance=False)
    mod = vit.LayerNorm(1e-6, jnp.bfloat16)
    x16 = jnp.asarray(x, jnp.bfloat16)
    params = {"params": {"scale": args[1], "bias": args[2]}}
    assert jax.tree.map(jnp.shape, mod.init(jax.random.PRNGKey(0), x16)) == jax.tree.map(jnp.shape, params)
    o_ref, vjp_ref = jax.vjp(lambda p, v: ref.apply(p, v), params, x16)
    o_new, vjp_new = jax.vjp(lambda p, v: mod.apply(p, v), params, x16)
    assert o_new.dtype == jnp.bfloat16
    g16 = jnp.asarray(g, jnp.bfloat16)
    pairs = [(o_new, o_ref)] + list(zip(jax.tree.leaves(vjp_new(g16)), jax.tree.leaves(vjp_ref(g16))))
    for got, want in pairs:
        assert got.dtype == want.dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
    # a bf16 input with float32 compute dtype is normalised and rounded once, in float32
    ref32 = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False)
    got32, want32 = vit.LayerNorm(1e-6, jnp.float32).apply(params, x16), ref32.apply(params, x16)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got32), np.asarray(want32), rtol=0, atol=1e-5 * np.abs(want32).max())


@pytest.mark.parametrize("d_in,d_out", [(24, 96), (96, 24), (32, 32)])
def test_linear_gradient_equals_jax_rule_and_transposes_the_narrower_operand(d_in, d_out):
    """ops.linear (nn.Dense's matmul) gives the value and gradients of the plain
    ``x @ w`` to float32 rounding (float64 numpy as the judge: 1e-5 relative of the
    largest entry), and its weight gradient contracts the token axis with the narrower
    of x and g as the left operand, also in the program XLA:CPU compiles for the train
    step (its matmul library runs a wide right operand ~1.6x faster; XLA would fold
    the transpose of fc2's (g^T x) back into the dot, swapping the operands)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 50, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
    g = rng.normal(size=(4, 50, d_out)).astype(np.float32)
    y, vjp = jax.vjp(ops.linear, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    for got, want in [(y, x64 @ w64), (dx, g64 @ w64.T),
                      (dw, x64.reshape(-1, d_in).T @ g64.reshape(-1, d_out))]:
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # the weight-gradient dot in both lowerings (CPU: (batch, token) axes merged first;
    # other platforms: contracted in place, since on TPU the merge copies the activation)
    for flatten, lead in [(True, (200,)), (False, (4, 50))]:
        jaxpr = jax.make_jaxpr(lambda a, c: ops._weight_grad(a, c, flatten))(x, g)
        dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
        assert len(dots) == 1, jaxpr
        assert dots[0].invars[0].aval.shape == lead + (min(d_in, d_out),)
        assert dots[0].params["dimension_numbers"][0] == (tuple(range(len(lead))),) * 2
        assert any(e.primitive.name == "reshape" for e in jaxpr.jaxpr.eqns) == flatten
        assert jaxpr.out_avals[0].shape == (d_in, d_out)
    compiled = jax.jit(lambda a, c: ops._weight_grad(a, c, True),
                       compiler_options=train.step_compiler_options("cpu")).lower(x, g).compile()
    dot_shapes = re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} dot\(", compiled.as_text())
    assert dot_shapes == [(str(min(d_in, d_out)), str(max(d_in, d_out)))], dot_shapes


def test_dense_equals_flax_dense_in_parameters_values_and_gradients():
    """vit.Dense (the official Linear) keeps nn.Dense's parameter tree and initial values
    (checkpoints and conversion depend on it) and its value and gradients (1e-6 of the
    largest entry, float32); on CPU its bias gradient is a product with a ones vector
    over the flattened cotangent, elsewhere a plain sum."""
    x = jax.random.normal(jax.random.key(1), (4, 50, 24))
    ours = vit.Dense(40, True, jnp.float32)
    flax_dense = nn.Dense(40, param_dtype=jnp.float32, kernel_init=vit.trunc_normal_init(0.02))
    params, flax_params = ours.init(jax.random.key(0), x), flax_dense.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(flax_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = jax.tree.map(lambda t: t + 0.1, params)  # a nonzero bias
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(flax_dense), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * np.abs(b).max())
    bias_grad = jax.jit(lambda g: jax.vjp(ops.add_bias, g, jnp.zeros(40))[1](g)[1])
    lowered = bias_grad.lower(jnp.ones((4, 50, 40))).as_text()  # this host: CPU
    assert "stablehlo.dot_general" in lowered and "stablehlo.reduce" not in lowered, lowered


def test_weight_norm_matches_torch_weight_norm_and_its_gradient():
    """head.weight_norm (column sums as products, hand-written backward) equals torch's own
    weight-norm kernel (``torch._weight_norm(v, g, dim=0)`` on torch's (out, in) layout,
    float64 autograd) in value and both gradients, to 1e-6 of the largest entry."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(64, 300)).astype(np.float32)
    g = (1 + 0.3 * rng.normal(size=(1, 300))).astype(np.float32)
    dw = rng.normal(size=(64, 300)).astype(np.float32)
    w, vjp = jax.vjp(weight_norm, jnp.asarray(v), jnp.asarray(g))
    dv, dg = vjp(jnp.asarray(dw))
    vt = torch.tensor(v.T, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor(g.T, dtype=torch.float64, requires_grad=True)
    wt = torch._weight_norm(vt, gt, 0)
    (wt * torch.tensor(dw.T, dtype=torch.float64)).sum().backward()
    for got, want in [(w, wt.detach().numpy().T), (dv, vt.grad.numpy().T), (dg, gt.grad.numpy().T)]:
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * np.abs(want).max())
    # without the projection term (-v s t / n^2) the v-gradient is off by far more
    s = g / np.sqrt((v.astype(np.float64) ** 2).sum(0, keepdims=True))
    assert np.abs(s * dw - vt.grad.numpy().T).max() > 0.1 * np.abs(vt.grad.numpy()).max()


def _official_attention_core(qkv, num_heads):
    """The official Attention.forward between qkv and proj, in torch (float64 autograd)."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    t = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = t[0], t[1], t[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // num_heads) ** -0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("num_heads,hd", [(3, 32), (2, 64)])
def test_attention_core_matches_official_and_its_gradient(num_heads, hd):
    """ops.attention (folded-head layout, hand-written backward) equals the official
    module's attention in float64 torch autograd, value and gradient, to 1e-5 of the
    largest entry; in bfloat16 it equals JAX's autodiff of the same casts to bf16
    rounding (2e-2). hd=32 has a scale that is not a power of two (order matters)."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    rng = np.random.default_rng(0)
    b, n, c = 3, 17, num_heads * hd
    qkv = (2 * rng.normal(size=(b, n, 3 * c))).astype(np.float32)
    g = rng.normal(size=(b, n, c)).astype(np.float32)
    out, vjp = jax.vjp(lambda a: ops.attention(a, num_heads), jnp.asarray(qkv))
    (dqkv,) = vjp(jnp.asarray(g))
    qt = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    ot = _official_attention_core(qt, num_heads)
    (ot * torch.tensor(g, dtype=torch.float64)).sum().backward()
    for got, want in [(out, ot.detach().numpy()), (dqkv, qt.grad.numpy())]:
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # a backward that forgets the softmax's row term (-sum(dp * p)) is far off
    q, k, v = ops._split_heads(jnp.asarray(qkv), num_heads)
    p = ops._attention_probs(q, k)
    go = jnp.asarray(g).reshape(b, n, num_heads, hd).transpose(0, 2, 1, 3)
    dp = jnp.einsum("bhqd,bhkd->bhqk", go, v)
    dq_wrong = jnp.einsum("bhqk,bhkd->bhqd", p * dp * hd ** -0.5, k)
    dq = np.asarray(dqkv).reshape(b, n, 3, num_heads, hd)[:, :, 0].transpose(0, 2, 1, 3)
    assert np.abs(np.asarray(dq_wrong) - dq).max() > 0.1 * np.abs(dq).max()

    def autodiff_ref(a):  # the module's previous formulation, JAX's own transpose rules
        t = a.reshape(b, n, 3, num_heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", t[:, :, 0], t[:, :, 1]) * hd ** -0.5
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", attn.astype(a.dtype), t[:, :, 2]).reshape(b, n, c)

    x16, g16 = jnp.asarray(qkv, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    for fn in (autodiff_ref, lambda a: ops.attention(a, num_heads)):
        o16, vjp16 = jax.vjp(fn, x16)
        assert o16.dtype == jnp.bfloat16 and vjp16(g16)[0].dtype == jnp.bfloat16
    o_ref, vjp_ref = jax.vjp(autodiff_ref, x16)
    o_new, vjp_new = jax.vjp(lambda a: ops.attention(a, num_heads), x16)
    for got, want in [(o_new, o_ref), (vjp_new(g16)[0], vjp_ref(g16)[0])]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("remat", [False, True])
def test_cls_feature_computes_only_the_cls_row_of_the_last_block(remat):
    """__call__ (last block on the CLS row alone) equals get_tokens(x)[:, 0] (all rows)
    in value and parameter gradient, in training with drop path (same per-sample masks)
    and in eval, to float32 rounding (1e-5 of the largest entry per leaf), and its
    lowering has no full-width MLP in the last block (fc1 sees B x 1 rows)."""
    m = vit.VisionTransformer(patch_size=4, embed_dim=48, depth=3, num_heads=3, img_size=16,
                              drop_path_rate=0.3, remat=remat)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = m.init(jax.random.PRNGKey(1), x)
    w = jax.random.normal(jax.random.PRNGKey(2), (4, 48))
    for train in (False, True):
        rngs = {"drop_path": jax.random.PRNGKey(3)}

        def loss(p, method=None):
            out = m.apply(p, x, train, rngs=rngs) if method is None else \
                m.apply(p, x, train, method="get_tokens", rngs=rngs)[:, 0]
            return (out * w).sum(), out

        (_, a), ga = jax.value_and_grad(loss, has_aux=True)(variables)
        (_, b), gb = jax.value_and_grad(lambda p: loss(p, "tokens"), has_aux=True)(variables)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(b).max())
        for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-5 * np.abs(v).max())
        if train:  # drop path really dropped something: the eval output differs
            assert np.abs(np.asarray(a) - np.asarray(m.apply(variables, x))).max() > 1e-3
    hlo = jax.jit(lambda p: m.apply(p, x)).lower(variables).as_text()
    assert "tensor<4x1x192xf32>" in hlo and "tensor<4x17x192xf32>" in hlo  # fc1: last block, others


def test_fused_attention_switch_gives_the_official_values_and_gradients():
    """model.fused_attention (jax.nn.dot_product_attention; a deviation, off by default)
    computes what the official op order computes: the CLS feature and every parameter
    gradient agree in float32 to 1e-5 of the largest entry (only the rounding differs),
    the last block on the CLS row included."""
    kw = dict(patch_size=4, embed_dim=48, depth=3, num_heads=3, img_size=16)
    official, fused = vit.VisionTransformer(**kw), vit.VisionTransformer(**kw, fused_attention=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = official.init(jax.random.PRNGKey(1), x)
    w = jax.random.normal(jax.random.PRNGKey(2), (4, 48))

    def value_and_grads(model):
        return jax.value_and_grad(lambda p: (model.apply(p, x) * w).sum())(variables)

    (a, ga), (b, gb) = value_and_grads(official), value_and_grads(fused)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    for u, v in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-5 * np.abs(v).max())


def test_fused_attention_asks_for_cudnn_on_a_gpu_and_falls_back_with_one_warning(monkeypatch, caplog):
    """jax 0.10's dot_product_attention(implementation=None) is XLA's: ops.fused_attention
    names cuDNN where the backend is a GPU and the inputs are half precision, and falls
    back to XLA's (same values) with one warning per reason where cuDNN refuses at trace
    time (this machine has no cuDNN: the refusal is real)."""
    import logging
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 10, 3, 32)).astype(jnp.bfloat16)
               for i in range(3))
    on_cpu = ops.fused_attention(q, k, v, 32 ** -0.5)
    assert calls == ["xla"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ops._CUDNN_REFUSALS.clear()
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="dino_jax.models.ops"):
        on_gpu = [ops.fused_attention(q, k, v, 32 ** -0.5) for _ in range(2)]
        assert calls == ["cudnn", "xla"] * 2
        warnings = [r.getMessage() for r in caplog.records if "cuDNN" in r.getMessage()]
        assert len(warnings) == 1 and "(2, 10, 3, 32)" in warnings[0], warnings
        calls.clear()
        ops.fused_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 0.2)
        assert calls == ["xla"]  # float32: cuDNN's flash kernel takes half precision only
    for out in on_gpu:
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(on_cpu, np.float32))

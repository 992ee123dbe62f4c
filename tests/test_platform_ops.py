"""The CPU forms of models/platform_ops.py against the official numbers and their
generic forms, how ``platform_ops`` chooses them, and what XLA:CPU compiles from them.

This is the one test file that reads compiled XLA:CPU programs (the library
fusions of the CPU step, benchmarks/step_matmuls.py's reading of dots): such
text is the compiler's, and may change with a jaxlib upgrade without any change in
behaviour. The model's parity tests (tests/test_models.py, tests/test_train_step.py)
run both forms against the official fixtures.
"""
import functools
import importlib.util
import math
import os
import platform
import re

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import schedules, train
from dino_jax.config_defaults import base_config
from dino_jax.models import platform_ops, vit
from dino_jax.models.head import DINOHead

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "step_matmuls.py")


def _tiny_model(platform_ops_value):
    return (vit.VisionTransformer(patch_size=4, embed_dim=48, depth=2, num_heads=3, img_size=16,
                                  platform_ops=platform_ops_value),
            DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=16, platform_ops=platform_ops_value))


def _loss_and_grads(platform_ops_value):
    backbone, head = _tiny_model(platform_ops_value)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    params = {"b": backbone.init(jax.random.key(1), x), "h": head.init(jax.random.key(2), jnp.zeros((1, 48)))}

    def loss(p, x):
        return jnp.sum(jnp.sin(head.apply(p["h"], backbone.apply(p["b"], x))))

    return jax.value_and_grad(loss), params, x


def test_auto_takes_the_cpu_forms_only_in_programs_lowered_for_cpu():
    """platform_ops='auto' decides by the platform a program is lowered for (so a TPU
    program compiled ahead of time on this CPU host gets the generic forms); 'cpu' and
    'generic' are the same on every platform; any other value is refused with one line.
    The CPU forms are told apart by their products: LayerNorm's row means and the bias
    gradients are matrix products there, reductions in the generic forms."""
    dots = {}
    for value in ("auto", "cpu", "generic"):
        fn, params, x = _loss_and_grads(value)
        traced = jax.jit(fn).trace(params, x)
        dots[value] = {p: traced.lower(lowering_platforms=(p,)).as_text().count("stablehlo.dot_general")
                       for p in ("cpu", "tpu", "cuda")}
    cpu, generic = dots["cpu"]["cpu"], dots["generic"]["cpu"]
    assert cpu > generic, dots
    assert set(dots["cpu"].values()) == {cpu} and set(dots["generic"].values()) == {generic}
    assert dots["auto"] == {"cpu": cpu, "tpu": generic, "cuda": generic}
    # the same values from all three on this CPU
    values = [jax.jit(_loss_and_grads(v)[0])(*_loss_and_grads(v)[1:]) for v in ("auto", "cpu", "generic")]
    for other in values[1:]:
        np.testing.assert_allclose(float(other[0]), float(values[0][0]), rtol=1e-6)
    with pytest.raises(ValueError, match="model.platform_ops must be one of"):
        _tiny_model("gpu")[0].init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_gelu_matches_torch_gelu_and_its_gradient():
    """platform_ops.gelu (erf form, hand-written backward; every platform runs it) equals
    torch.nn.GELU() forward and backward, and nn.gelu(approximate=False) under JAX's
    autodiff, to float32 rounding: 2e-6 absolute on x in [-12, 12] (|gelu| <= 12)."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(0, 3, 4000)]).astype(np.float32)
    g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    y, vjp = jax.vjp(platform_ops.gelu, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.gelu(xt)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy(), rtol=0, atol=2e-6)
    y_ref, vjp_ref = jax.vjp(lambda t: jax.nn.gelu(t, approximate=False), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(vjp_ref(jnp.asarray(g))[0]), rtol=0, atol=2e-6)
    # a wrong backward (e.g. the cdf alone, missing x * pdf) is off by up to ~0.17 * |g|
    cdf_only = g * 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    assert np.max(np.abs(np.asarray(dx) - cdf_only)) > 0.1


@pytest.mark.parametrize("with_gelu,use_bias", [(False, True), (True, True), (True, False), (False, False)])
def test_cpu_dense_equals_the_formula_and_its_gradients(with_gelu, use_bias):
    """cpu_dense (the product, then the bias with its gradient as a column-sum product,
    or bias + GELU with a recomputing backward) gives the value and the gradients of
    every input of the generic ``x @ kernel + bias`` (then GELU) to float32 rounding:
    1e-5 of the largest entry."""
    rng = np.random.default_rng(0)
    x, w, b, g = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((3, 20, 12), (12, 36), (36,),
                                                                              (3, 20, 36)))
    args = (x, w, b) if use_bias else (x, w)
    got, vjp = jax.vjp(functools.partial(platform_ops.cpu_dense, with_gelu=with_gelu), *args)
    want, vjp_ref = jax.vjp(functools.partial(vit.dense_formula, with_gelu=with_gelu), *args)
    for a, r in zip((got,) + vjp(g), (want,) + vjp_ref(g)):
        assert a.shape == r.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5 * float(jnp.abs(r).max()))


def _autodiff_attention(qkv, num_heads):
    """The plain attention formula between qkv and proj, for JAX's autodiff."""
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=num_heads)
    return einops.rearrange(vit.dot_product_attention(q, k, v)[0], "b n h d -> b n (h d)")


def _official_attention_core(qkv, num_heads):
    """The official Attention.forward between qkv and proj, in torch (float64 autograd)."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    t = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = t[0], t[1], t[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // num_heads) ** -0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("num_heads,hd,query_block", [(3, 32, None), (2, 64, None), (3, 32, 5)])
def test_attention_forms_match_official_and_its_gradient(num_heads, hd, query_block, monkeypatch):
    """platform_ops.attention (hand-written backward; every platform runs it) and JAX's
    autodiff of the plain formula (vit.dot_product_attention) each equal the official
    module's attention in float64 torch autograd,
    value and gradient, to 1e-5 of the largest entry; in bfloat16 the two agree to bf16
    rounding (2e-2). hd=32 has a scale that is not a power of two (order matters).
    ``query_block`` 5 runs attention over query chunks (17 rows: 8, 8, 1), the
    form that sequences longer than QUERY_BLOCK get."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    if query_block is not None:
        monkeypatch.setattr(platform_ops, "QUERY_BLOCK", query_block)
    rng = np.random.default_rng(0)
    b, n, c = 3, 17, num_heads * hd
    qkv = (2 * rng.normal(size=(b, n, 3 * c))).astype(np.float32)
    g = rng.normal(size=(b, n, c)).astype(np.float32)
    qt = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    ot = _official_attention_core(qt, num_heads)
    (ot * torch.tensor(g, dtype=torch.float64)).sum().backward()
    forms = {"hand-written": lambda a: platform_ops.attention(a, num_heads),
             "autodiff": lambda a: _autodiff_attention(a, num_heads)}
    for name, fn in forms.items():
        out, vjp = jax.vjp(fn, jnp.asarray(qkv))
        (dqkv,) = vjp(jnp.asarray(g))
        for got, want in [(out, ot.detach().numpy()), (dqkv, qt.grad.numpy())]:
            assert got.shape == want.shape and got.dtype == jnp.float32, name
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # a backward that forgets the softmax's row term (-sum(dp * p)) is far off
    q, k, v = platform_ops._split_heads(jnp.asarray(qkv), num_heads)
    p = platform_ops._attention_probs(q, k)
    go = jnp.asarray(g).reshape(b, n, num_heads, hd).transpose(0, 2, 1, 3)
    dp = jnp.einsum("bhqd,bhkd->bhqk", go, v)
    dq_wrong = jnp.einsum("bhqk,bhkd->bhqd", p * dp * hd ** -0.5, k)
    dq = qt.grad.numpy().reshape(b, n, 3, num_heads, hd)[:, :, 0].transpose(0, 2, 1, 3)
    assert np.abs(np.asarray(dq_wrong) - dq).max() > 0.1 * np.abs(dq).max()
    x16, g16 = jnp.asarray(qkv, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    (o_ref, vjp_ref), (o_new, vjp_new) = (jax.vjp(forms[k], x16) for k in ("autodiff", "hand-written"))
    for got, want in [(o_new, o_ref), (vjp_new(g16)[0], vjp_ref(g16)[0])]:
        assert got.dtype == want.dtype == jnp.bfloat16
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_layer_norm_forms_match_torch_layer_norm_and_its_gradient():
    """cpu_layer_norm (row means as products, closed-form backward) and the generic
    vit.layer_norm_formula each equal torch.nn.functional.layer_norm in float64 autograd,
    value and the gradients of x, scale and bias, to 1e-5 of the largest entry (rows
    with a large mean, where E[x^2] - mean^2 would lose digits); vit.LayerNorm has
    nn.LayerNorm's parameters and, with a bfloat16 input, its values to bf16 rounding."""
    torch = pytest.importorskip("torch")  # installed by .ci/run (the CPU wheel)
    import flax.linen as nn
    rng = np.random.default_rng(0)
    b, n, d = 3, 11, 48
    x = (20 + 3 * rng.normal(size=(b, n, d))).astype(np.float32)
    scale = (1 + 0.3 * rng.normal(size=d)).astype(np.float32)
    bias = (0.2 * rng.normal(size=d)).astype(np.float32)
    g = rng.normal(size=(b, n, d)).astype(np.float32)
    args = [jnp.asarray(a) for a in (x, scale, bias)]
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias)]
    ot = torch.nn.functional.layer_norm(ts[0], (d,), ts[1], ts[2], 1e-6)
    (ot * torch.tensor(g, dtype=torch.float64)).sum().backward()
    for fn in (platform_ops.cpu_layer_norm, vit.layer_norm_formula):
        out, vjp = jax.vjp(lambda *a: fn(*a, 1e-6, jnp.float32), *args)
        grads = vjp(jnp.asarray(g))
        for got, want in [(out, ot.detach().numpy())] + [(gr, t.grad.numpy()) for gr, t in zip(grads, ts)]:
            assert got.shape == want.shape and got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    ref = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32, use_fast_variance=False)
    x16 = jnp.asarray(x, jnp.bfloat16)
    params = {"params": {"scale": args[1], "bias": args[2]}}
    want = np.asarray(ref.apply(params, x16), np.float32)
    for form in ("cpu", "generic"):
        mod = vit.LayerNorm(1e-6, jnp.bfloat16, form)
        assert jax.tree.map(jnp.shape, mod.init(jax.random.PRNGKey(0), x16)) == jax.tree.map(jnp.shape, params)
        got = mod.apply(params, x16)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("d_in,d_out", [(24, 96), (96, 24), (32, 32)])
def test_cpu_linear_equals_the_product_and_its_gradients(d_in, d_out):
    """cpu_linear (nn.Dense's product in the CPU form) gives the value and gradients of
    the plain ``x @ w`` to float32 rounding (float64 numpy as the judge: 1e-5 of the
    largest entry), and in the compiled CPU program its weight gradient is one
    (in, out) product over the merged (batch, token) rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 50, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
    g = rng.normal(size=(4, 50, d_out)).astype(np.float32)
    y, vjp = jax.vjp(platform_ops.cpu_linear, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    for got, want in [(y, x64 @ w64), (dx, g64 @ w64.T),
                      (dw, x64.reshape(-1, d_in).T @ g64.reshape(-1, d_out))]:
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    weight_grad = jax.jit(lambda a, c: jax.vjp(platform_ops.cpu_linear, a, jnp.asarray(w))[1](c)[1],
                          compiler_options=train.step_compiler_options("cpu"))
    hlo = weight_grad.lower(x, g).compile().as_text()
    dots = re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} dot\(.*lhs_contracting_dims=\{(\d)\}", hlo)
    assert dots == [(str(d_in), str(d_out), "0")], dots


# --------------------------------------------------------------------------
# Compiled XLA:CPU programs.
# --------------------------------------------------------------------------
def test_cpu_bias_gelu_backward_recomputes_the_erf():
    """In the compiled CPU program of cpu_bias_gelu's forward and backward the erf is
    evaluated twice, once in each pass: the backward recomputes it from the saved
    product, where XLA would otherwise store the forward's erf for the backward."""
    h, c = jnp.ones((4, 50, 96)), jnp.ones((4, 50, 96))

    def forward_backward(h, b, c):
        y, vjp = jax.vjp(platform_ops.cpu_bias_gelu, h, b)
        return y, vjp(c)

    hlo = jax.jit(forward_backward, compiler_options=train.step_compiler_options("cpu")).lower(
        h, jnp.ones((96,)), c).compile().as_text()
    assert len(re.findall(r" erf\(", hlo)) == 2, hlo


def _tiny_step_config(depth):
    config = base_config()
    config.update(dict(
        model=dict(arch="custom", patch_size=4, embed_dim=16, depth=depth, num_heads=2, img_size=16,
                   drop_path_rate=0.0, out_dim=64, norm_last_layer=True, head_nlayers=2,
                   head_hidden_dim=32, head_bottleneck_dim=16, dtype="float32", platform_ops="auto"),
        batch_size=4, epochs=1, total_steps=0, warmup_epochs=0, freeze_last_layer=0,
        warmup_teacher_temp_epochs=0))
    return config


def test_cpu_step_hands_only_reductions_to_ynnpack():
    """The CPU step's compiler options (train.step_compiler_options) reach the compiled
    program: on x86-64 YNNPACK gets the reductions only (with what XLA fuses into
    them): no YNNPACK fusion is rooted at a matmul (XLA's default builds those for
    every matmul and its elementwise neighbours), and plain matmul thunks remain.
    Other hosts, or a jaxlib that rejects the experimental option, get XLA's defaults."""
    config = _tiny_step_config(2)
    assert train.step_compiler_options("tpu") is None
    state = train.create_train_state(config)
    sched = schedules.device_schedules(schedules.build_schedules(config, 1))
    batch = {"global_crops": jnp.zeros((4, 2, 16, 16, 3)), "local_crops": jnp.zeros((4, 2, 8, 8, 3))}
    step = jax.jit(train.make_train_step_fn(config), compiler_options=train.step_compiler_options("cpu"))
    hlo = step.lower(state, batch, sched).compile().as_text()
    lib = dict(train._cpu_library_options())
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert not lib
    assert train.step_compiler_options("cpu") == (lib or None)
    if lib:
        assert lib["xla_cpu_experimental_ynn_fusion_type"] == "LIBRARY_FUSION_TYPE_REDUCE"
        ynn = re.findall(r'calls=%?([\w.\-]+), .*"kind":"__ynn_fusion"', hlo)
        assert ynn, "no YNNPACK fusion at all"
        bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \(.*?\{\n(.*?)^\}", hlo, re.M | re.S)}
        roots = [re.search(r"ROOT %\S+ = \S+ ([\w-]+)\(", bodies[c]).group(1) for c in ynn]
        assert "reduce" in roots and "dot" not in roots, roots
        assert re.search(r"= f32\[[\d,]+\]\{[\d,]+\} dot\(", hlo)


def _load_step_matmuls():
    spec = importlib.util.spec_from_file_location("step_matmuls", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_dots_finds_each_product_with_its_shapes_and_dimension_numbers():
    """benchmarks/step_matmuls.py reads the products of a compiled XLA:CPU program from
    its HLO text: shapes and dimension numbers of every dot outside YNNPACK fusions."""
    mod = _load_step_matmuls()
    x, w = jnp.ones((40, 24)), jnp.ones((24, 16))
    a, b = jnp.ones((6, 3, 10, 8)), jnp.ones((6, 3, 8, 5))

    def program(x, w, a, b):
        y = x @ w                                        # (40, 24) x (24, 16)
        dw = jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())))  # token-contracting form
        z = jnp.einsum("bhqd,bhdk->bhqk", a, b)          # batched
        return y.sum() + dw.sum() + z.sum()

    hlo = jax.jit(program, compiler_options=train.step_compiler_options("cpu")).lower(
        x, w, a, b).compile().as_text()
    dots, in_ynn = mod.step_dots(hlo)
    found = sorted((lhs, rhs, dims["lhs_contracting_dims"], dims["rhs_contracting_dims"],
                    dims.get("lhs_batch_dims", ())) for lhs, rhs, dims in dots)
    assert found == sorted([((40, 24), (24, 16), (1,), (0,), ()),
                            ((40, 24), (40, 16), (0,), (0,), ()),
                            ((6, 3, 10, 8), (6, 3, 8, 5), (3,), (2,), (0, 1))]), found
    assert in_ynn == 0
    # torch.matmul layouts: rows then contracted axis on the left, contracted then cols on the right
    assert mod.torch_layout((40, 24), (40, 16), {"lhs_contracting_dims": (0,),
                                                 "rhs_contracting_dims": (0,)}) == ([1, 0], [0, 1])
    assert mod.torch_layout((6, 3, 10, 8), (6, 3, 8, 5),
                            {"lhs_contracting_dims": (3,), "rhs_contracting_dims": (2,),
                             "lhs_batch_dims": (0, 1), "rhs_batch_dims": (0, 1)}) == (
        [0, 1, 2, 3], [0, 1, 2, 3])


def test_products_inside_ynnpack_fusions_are_counted_apart():
    """x86-64: the attention logits' product is fused with its softmax into a YNNPACK
    fusion by the step's options; such products are counted, not listed."""
    mod = _load_step_matmuls()
    q = jnp.ones((8, 3, 50, 32))  # nano's global-crop attention, 8 crops
    hlo = jax.jit(platform_ops._attention_probs, compiler_options=train.step_compiler_options("cpu")).lower(
        q, q).compile().as_text()
    dots, in_ynn = mod.step_dots(hlo)
    assert len(dots) + in_ynn == hlo.count(" dot(")
    if "__ynn_fusion" in hlo:  # jaxlib's YNNPACK fusions (x86-64)
        assert in_ynn == 1 and dots == []

"""ViT and DINO head against the official PyTorch numbers, and model behaviour.

Tolerance: max relative error (max|a-e| / max|e|) under 1e-4 in float32 (float32
rounding alone gives well under that). Every parity test runs both forms of
the operations (``platform_ops``): "generic", what a GPU or TPU runs, and "cpu".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import convert
from dino_jax.models import platform_ops, vit
from dino_jax.models.head import DINOHead, frozen_weight_g_mask, weight_norm
from official_fixtures import cases, group, load, max_rel_err

TOL = 1e-4
FORMS = ("generic", "cpu")  # model.platform_ops: the accelerators' form and the CPU form


def _backbone_from_fixture(name, platform_ops="generic"):
    meta, arrays = load(name)
    sd = group(arrays, "state_dict/")
    params = convert.torch_to_flax_backbone(sd, num_heads=meta["num_heads"])
    model = vit.VisionTransformer(
        patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
        num_heads=meta["num_heads"], mlp_ratio=meta.get("mlp_ratio", 4),
        qkv_bias=meta.get("qkv_bias", True), img_size=meta.get("img_size", 224),
        layer_norm_eps=meta.get("layer_norm_eps", 1e-6), platform_ops=platform_ops)
    return meta, arrays, sd, model, params


def _grad_err(model, v, x, method=None):
    """Max relative difference of every parameter gradient of ``sum(f(x) * w)`` between
    ``model`` and its "generic" form (to float32 rounding: the same products and sums)."""
    w = jax.random.normal(jax.random.key(7), jax.eval_shape(lambda: model.apply(v, x, method=method)).shape)
    generic = model.clone(platform_ops="generic")
    grads = [jax.jit(jax.grad(lambda p, m=m: (m.apply(p, x, method=method) * w).sum()))(v)
             for m in (model, generic)]
    return max(max_rel_err(a, b) for a, b in zip(*map(jax.tree.leaves, grads)))


@pytest.mark.parametrize("platform_ops", FORMS)
@pytest.mark.parametrize("name", cases("backbone"))
def test_backbone_parity(name, platform_ops):
    meta, arrays, _, model, params = _backbone_from_fixture(name, platform_ops)
    v = {"params": params}
    checked = 0
    for h, w in meta["sizes"]:
        key = f"{h}x{w}"
        x = jnp.asarray(arrays[f"inputs/{key}"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
        cls = model.apply(v, x)
        assert max_rel_err(cls, arrays[f"outputs/cls/{key}"]) < TOL, key
        inter = np.stack(model.apply(v, x, n=4, method="get_intermediate_tokens"))
        assert max_rel_err(inter, arrays[f"outputs/intermediate4/{key}"]) < TOL, key
        if f"outputs/last_attention/{key}" in arrays:
            attn = model.apply(v, x, method="get_last_selfattention")
            assert max_rel_err(attn, arrays[f"outputs/last_attention/{key}"]) < TOL, key
            checked += 1
        # Patch tokens are the last block's normalised output: same as intermediate[-1].
        toks = model.apply(v, x, method="get_tokens")
        np.testing.assert_allclose(toks, inter[-1], rtol=0, atol=1e-6)
        if platform_ops != "generic":  # the CPU forms' backward passes: JAX's autodiff's gradients
            assert _grad_err(model, v, x) < TOL, key
    assert checked >= 1, "no attention outputs were compared"


@pytest.mark.parametrize("name", cases("backbone"))
def test_backbone_roundtrip_bit_exact(name):
    meta, _, sd, _, params = _backbone_from_fixture(name)
    back = convert.flax_to_torch_backbone(params)
    assert sorted(back) == sorted(sd)  # same names: what strict=True loading requires
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert np.array_equal(back[k], v), k


@pytest.mark.parametrize("platform_ops", FORMS)
@pytest.mark.parametrize("name", cases("head"))
def test_head_parity(name, platform_ops):
    meta, arrays = load(name)
    sd = group(arrays, "state_dict/")
    params = convert.torch_to_flax_head(sd, prefix="")
    head = DINOHead(out_dim=meta["out_dim"], norm_last_layer=meta["norm_last_layer"],
                    nlayers=meta["nlayers"], hidden_dim=meta["hidden_dim"],
                    bottleneck_dim=meta["bottleneck_dim"], platform_ops=platform_ops)
    init = head.init({"params": jax.random.key(0)}, jnp.zeros((1, meta["in_dim"])))["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    y = head.apply({"params": params}, jnp.asarray(arrays["inputs/x"]))
    assert max_rel_err(y, arrays["outputs/y"]) < TOL
    if platform_ops != "generic":
        assert _grad_err(head, {"params": params}, jnp.asarray(arrays["inputs/x"])) < TOL
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


@pytest.mark.parametrize("platform_ops", FORMS)
def test_bfloat16_compute_keeps_float32_params(platform_ops):
    kw = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, img_size=32, platform_ops=platform_ops)
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


def test_weight_norm_matches_torch_weight_norm_and_its_gradient():
    """head.weight_norm (JAX autodiff of the plain formula) equals torch's own
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


@pytest.mark.parametrize("platform_ops", FORMS)
@pytest.mark.parametrize("remat", [False, True])
def test_cls_feature_computes_only_the_cls_row_of_the_last_block(remat, platform_ops):
    """__call__ (last block on the CLS row alone) equals get_tokens(x)[:, 0] (all rows)
    in value and parameter gradient, in training with drop path (same per-sample masks)
    and in eval, to float32 rounding (1e-5 of the largest entry per leaf), and its
    lowering has no full-width MLP in the last block (fc1 sees B x 1 rows)."""
    m = vit.VisionTransformer(patch_size=4, embed_dim=48, depth=3, num_heads=3, img_size=16,
                              drop_path_rate=0.3, remat=remat, platform_ops=platform_ops)
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
    """jax 0.10's dot_product_attention(implementation=None) is XLA's: platform_ops.fused_attention
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
    on_cpu = platform_ops.fused_attention(q, k, v, 32 ** -0.5)
    assert calls == ["xla"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    platform_ops._CUDNN_REFUSALS.clear()
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="dino_jax.models.platform_ops"):
        on_gpu = [platform_ops.fused_attention(q, k, v, 32 ** -0.5) for _ in range(2)]
        assert calls == ["cudnn", "xla"] * 2
        warnings = [r.getMessage() for r in caplog.records if "cuDNN" in r.getMessage()]
        assert len(warnings) == 1 and "(2, 10, 3, 32)" in warnings[0], warnings
        calls.clear()
        platform_ops.fused_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 0.2)
        assert calls == ["xla"]  # float32: cuDNN's flash kernel takes half precision only
    for out in on_gpu:
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(on_cpu, np.float32))

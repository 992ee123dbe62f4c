"""The ViT's differentiable operations with hand-written backward passes.

Each computes what the official module computes (values and gradients agree with
JAX's autodiff of the plain formula to float32 rounding: tests/test_models.py);
the backward passes and a few CPU-only forms (chosen at lowering with
``jax.lax.platform_dependent``, so a TPU program compiled ahead of time on a CPU
host gets the plain form) exist for speed and memory on XLA:CPU and TPU. Each
docstring says what it changed and by how much (README.md, development notes).

:func:`fused_attention` is the one that is not the official op order: the
``model.fused_attention`` deviation (off by default), cuDNN's kernel on a GPU.

Optimisation barriers here only act on CPU where the program is compiled with
``train.step_compiler_options`` (XLA:CPU otherwise deletes them before fusion).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def linear(x, kernel):
    """``x @ kernel`` over the last axis of ``x`` (any leading axes), as ``nn.Dense`` computes.

    The backward chooses the weight gradient's operand order. ``dW = x^T g`` contracts
    the token axis of both operands; XLA:CPU's matmul library runs such a product at a
    speed set by the width of its right operand (one core, 12,800 tokens: ~95 GFLOP/s
    with 96 columns, 150-160 with 288 or more). So the narrower of ``x`` and ``g`` is
    the left operand (for fc2, ``g`` of width D; for qkv and fc1, ``x`` of width D),
    and where that is ``g`` the small (out, in) product is transposed afterwards,
    behind an optimisation barrier on CPU: XLA folds a transpose of a dot back into
    the dot by swapping its operands (fc2's weight gradient 10.1 -> 6.1 ms on one
    core). Values agree with JAX's rule to float32 rounding (tests/test_models.py)."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, kernel):
    return linear(x, kernel), (x, kernel)


def _linear_bwd(res, g):
    x, kernel = res
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    # XLA:CPU wants the (batch, token) axes merged into one (1-2 ms a dot faster at nano
    # size); on TPU that reshape is a relayout copy of the activation (tokens are not a
    # multiple of 8: ViT-S/8 on v4 went 14.1 -> 17.9 GiB per chip), so elsewhere the
    # leading axes are contracted in place. Chosen when lowering, for the target platform.
    dw = jax.lax.platform_dependent(x, g, cpu=functools.partial(_weight_grad, flatten=True),
                                    default=functools.partial(_weight_grad, flatten=False))
    return dx, dw.astype(kernel.dtype)


def _weight_grad(x, g, flatten: bool):
    """``x^T g`` over all leading axes, the narrower operand on the left (:func:`linear`)."""
    if flatten:
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    lead = tuple(range(x.ndim - 1))
    if x.shape[-1] <= g.shape[-1]:  # transpose x: dW = x^T g
        return jax.lax.dot_general(x, g, ((lead, lead), ((), ())))
    # transpose g: dW = (g^T x)^T, the (out, in) result is small
    product = jax.lax.dot_general(g, x, ((lead, lead), ((), ())))
    if flatten:  # keep XLA from folding the transpose back into the dot (operands swapped)
        product = jax.lax.optimization_barrier(product)
    return product.T


linear.defvjp(_linear_fwd, _linear_bwd)


def column_sums(x):
    """Sum over axis 0 of a 2-D array as ``ones @ x``, kept (1, n).

    The same sums as ``jnp.sum(x, axis=0, keepdims=True)``, but XLA:CPU's column
    reduction of the head's (256, 65536) weight ran 68 ms where the matrix product
    runs 9 ms (models/head.py), and a bias gradient reduced as a library fusion read
    a transposed copy of its cotangent made for it alone (:func:`add_bias`).
    ``Precision.HIGHEST`` keeps float32 sums on TPU (its default f32 matmul is bf16)."""
    return jnp.dot(jnp.ones((1, x.shape[0]), x.dtype), x, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def add_bias(y, bias):
    """``y + bias`` over the last axis, its bias gradient by :func:`_sum_leading`. With
    a plain sum XLA:CPU reduced qkv's cotangent (a (B, N, 3, H, hd) transpose of the
    attention gradients) from a second transposed copy made for that sum alone."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, g):
    return g, _sum_leading(g)


def _sum_leading(g):
    """``g`` summed over all axes but the last: on XLA:CPU a :func:`column_sums`
    product over the flattened ``g`` (float32 sums), reading the buffer the matmuls
    read; elsewhere a plain sum in place (flattening can be a relayout copy on TPU)."""
    def flat(g):
        return column_sums(g.reshape(-1, g.shape[-1]).astype(jnp.float32))[0].astype(g.dtype)

    return jax.lax.platform_dependent(g, cpu=flat, default=lambda g: g.sum(tuple(range(g.ndim - 1))))


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def bias_gelu(h, bias):
    """``gelu(h + bias)``: a Linear's bias and the GELU after it, as one operation.

    The backward recomputes ``x = h + bias`` and the cdf from the saved matmul output
    (on XLA:CPU behind an optimisation barrier, so XLA cannot share the forward's erf:
    sharing it split the forward into an erf pass and a product pass and made the
    backward read the stored erf), and the bias gradient is the sum of the input
    gradient it returns. A nano MLP (12,800 rows) forward and backward 53.5 -> 50.3 ms
    on one core. Same values as :func:`gelu` of :func:`add_bias` to float32 rounding
    (tests/test_models.py)."""
    return gelu(h + bias)


def _bias_gelu_fwd(h, bias):
    return bias_gelu(h, bias), (h, bias)


def _bias_gelu_bwd(res, g):
    h, bias = res
    h = jax.lax.platform_dependent(h, cpu=jax.lax.optimization_barrier, default=lambda h: h)
    dx = _gelu_bwd(h + bias, g)[0]
    return dx, _sum_leading(dx)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def _row_mean(x):
    """Mean over the last axis, keeping it (float32 ``x``).

    On XLA:CPU as a matrix-vector product with a ``1/D`` vector: its matmul library
    then reads the rows once, where a reduction became a library fusion fed with
    materialised (rows, D) broadcasts of the statistics: a nano block's LayerNorm
    (12800 x 96) and the qkv matmul after it, forward and backward, 21.6 -> 10.4 ms;
    the nano step 469 -> 451 ms (alternating runs, benchmarks/README.md). Elsewhere a
    plain mean (a float32 matmul on TPU would round its operands to bfloat16). The two
    differ by float32 rounding (``1/D`` is inexact)."""
    def product(x):
        w = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=jax.lax.Precision.HIGHEST)
    return jax.lax.platform_dependent(x, cpu=product,
                                      default=lambda x: jnp.mean(x, -1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, dtype=None):
    """LayerNorm over the last axis, as ``nn.LayerNorm(use_fast_variance=False)`` and
    torch: statistics in float32, ``var = mean((x - mean)^2)``, ``(x - mean) *
    (rsqrt(var + eps) * scale) + bias`` in float32, cast once to ``dtype`` (default
    ``x.dtype``); the input gradient comes back in ``x.dtype``.

    The backward is the closed form ``dx = rstd * (gs - mean(gs) - xhat * mean(gs *
    xhat))`` with ``gs = g * scale``, from the saved input, mean and rstd: two row
    means and two column sums where autodiff differentiated each step of the forward
    (values agree to float32 rounding; tests/test_models.py)."""
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    x32 = x.astype(jnp.float32)
    mean = _row_mean(x32)
    xc = x32 - mean
    rstd = jax.lax.rsqrt(_row_mean(xc * xc) + eps)
    y = xc * (rstd * scale) + bias
    return y.astype(dtype or x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, dtype, res, g):
    del eps, dtype
    x, mean, rstd, scale = res
    g = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gs = g * scale
    dx = rstd * (gs - _row_mean(gs) - xhat * _row_mean(gs * xhat))
    lead = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), jnp.sum(g * xhat, lead), jnp.sum(g, lead)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def gelu(x):
    """Exact GELU, ``x * 0.5 * (1 + erf(x / sqrt(2)))``: torch.nn.GELU()'s formula.

    ``nn.gelu(approximate=False)`` evaluates ``erfc``, whose XLA expansion computes
    two polynomial branches and an exp and selects; under autodiff the exp is also
    kept for the backward. Here the forward is one erf polynomial and the backward
    recomputes the cdf and the density from x (one fused loop): on XLA:CPU the nano
    step 536 -> 482 ms and the ViT-S/16 step 4.10 -> 3.70 s (benchmarks/README.md).
    Values and gradients agree with both to float32 rounding (tests/test_models.py)."""
    return x * _normal_cdf(x)


def _normal_cdf(x):
    return 0.5 * (1 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    pdf = jnp.exp(-0.5 * x * x) * np.asarray(1 / np.sqrt(2 * np.pi), x.dtype)
    return (g * (_normal_cdf(x) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def materialize_cotangent(x):
    """Identity whose gradient is materialised (an optimisation barrier on the cotangent).

    At each block input the residual-stream gradient is a chain of elementwise
    adds over all later blocks; XLA:CPU fused (duplicated) that chain into every
    consumer, recomputing it per block: O(depth^2) work, 48% of a ViT-S/16 CPU
    step (jax 0.10.2). Materialising it once per block removes that; the values
    are unchanged (same operations, same order). XLA:CPU keeps the barrier only
    when its cse_barrier_expander pass is skipped, as the train step does
    (train.step_compiler_options)."""
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


def _split_heads(qkv, num_heads: int):
    """(B, N, 3C) -> q, k, v of shape (B, H, N, hd): the official reshape and permute."""
    b, n, c3 = qkv.shape
    t = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def _attention_probs(q, k):
    """softmax(q k^T * hd^-0.5) in float32, the official op order (product, then scale)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _transposed_product(a, b):
    """``a^T b`` per (batch, head): (B, H, Q, K), (B, H, Q, d) -> (B, H, K, d).

    On XLA:CPU ``a`` is first transposed in memory (kept so by an optimisation
    barrier: XLA would fold the transpose back into the product): its matmul library
    takes row-major products only, and the transposed-operand product went to a slow
    generic kernel (nano's 768 (50 x 50) x (50 x 32) products: the nano step 460 ->
    446 ms, alternating runs). Elsewhere the plain product. Same products and sums."""
    def copied(a, b):
        return jnp.einsum("bhkq,bhqd->bhkd", jax.lax.optimization_barrier(jnp.swapaxes(a, 2, 3)), b)
    return jax.lax.platform_dependent(a, b, cpu=copied,
                                      default=lambda a, b: jnp.einsum("bhqk,bhqd->bhkd", a, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention(qkv, num_heads: int):
    """Multi-head self-attention core: ``qkv`` (B, N, 3C) -> (B, N, C), before ``proj``.

    The official module's forward (reshape, permute to (3, B, H, N, hd), ``q @ k^T *
    scale``, float32 softmax, ``@ v``, heads back to channels) with a hand-written
    backward that stays in the (B, H, N, hd) layout and returns the gradient already
    in qkv's layout. JAX's own transpose of the products re-derives each operand's
    layout and XLA:CPU copies them into and out of (B, N, H, hd) for every batched
    product (``transpose_copy`` fusions); here there is one copy in and one out. The
    same products and sums as autodiff (values to float32 rounding:
    tests/test_models.py)."""
    return _attention_fwd(qkv, num_heads)[0]


def _attention_fwd(qkv, num_heads: int):
    b, n, _ = qkv.shape
    q, k, v = _split_heads(qkv, num_heads)
    p = _attention_probs(q, k)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v)
    return o.transpose(0, 2, 1, 3).reshape(b, n, -1), (q, k, v, p)


def _attention_bwd(num_heads: int, res, g):
    q, k, v, p = res
    b, h, n, hd = q.shape
    go = g.reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    pc = p.astype(v.dtype)
    dv = _transposed_product(pc, go)
    dp = jnp.einsum("bhqd,bhkd->bhqk", go, v).astype(jnp.float32)
    # softmax backward, then the cast and the scale of the logits
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(q.dtype) * (hd ** -0.5)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k)
    dk = _transposed_product(ds, q)
    # (B, N, 3H, hd): each gradient moved to (B, N, H, hd), then joined on the head axis.
    # XLA:CPU runs three 4-D transposes and a concatenation 4x faster than the 5-D
    # transpose of their stack (nano's 12,800 rows: 5.1 -> 1.2 ms on one core).
    d = jnp.concatenate([t.transpose(0, 2, 1, 3) for t in (dq, dk, dv)], axis=2)
    return (d.reshape(b, n, 3 * h * hd),)


attention.defvjp(_attention_fwd, _attention_bwd)


# cuDNN refusals already reported (one warning each per process).
_CUDNN_REFUSALS: set = set()


def fused_attention(q, k, v, scale: float):
    """``jax.nn.dot_product_attention`` of (B, T, H, hd) ``q`` and (B, S, H, hd) ``k``,
    ``v``: cuDNN's flash-attention kernel where the default backend is a GPU and the
    inputs are bfloat16 or float16, XLA's attention otherwise.

    jax 0.10's ``implementation=None`` means XLA's, not cuDNN's, so the kernel is asked
    for by name. Where cuDNN refuses at trace time (no cuDNN, e.g. a ROCm GPU; an
    unsupported head dim) the call falls back to XLA's with one warning per reason.
    The ``model.fused_attention`` deviation (off by default): not the official op order."""
    half = q.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half:
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (RuntimeError, NotImplementedError, ValueError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            if reason not in _CUDNN_REFUSALS:
                _CUDNN_REFUSALS.add(reason)
                logging.getLogger(__name__).warning(
                    "fused attention: cuDNN flash attention refused %s %s inputs (%s); "
                    "using XLA's attention", tuple(q.shape), q.dtype, reason)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")

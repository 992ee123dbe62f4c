"""Platform-specific forms of the model's operations, and the one place that chooses them.

``config.model.platform_ops`` ("auto" | "cpu" | "generic") reaches every module as
its ``platform_ops`` field; :func:`select` turns it into the function an operation
runs. "generic" is the plain formula written in ``models/vit.py`` (what a GPU or TPU
runs); "cpu" is the form below, which computes the same values with a backward pass
that suits XLA:CPU; "auto" decides when the program is lowered, by the platform it
is lowered for, so a TPU program compiled ahead of time on a CPU host gets the
generic form. Every CPU form is tested against its generic form and the official
numbers (tests/test_models.py, tests/test_train_step.py run both). A CPU form is kept
only where it makes the whole CPU step at least 5% faster
(``benchmarks/cpu_forms.py``; the figures are in benchmarks/README.md).

Two operations have one form on every platform, with a hand-written backward:
:func:`gelu` and :func:`attention`. Each lowers TPU HBM against autodiff of the plain
formula and makes the CPU step faster (docs/tpu_memory.md, benchmarks/README.md).
Sequences longer than ``QUERY_BLOCK`` tokens (patch 8 at 224 px) run attention per
chunk of query rows, so that its backward never holds a whole (B, H, N, N) gradient.

:func:`fused_attention` is the ``model.fused_attention`` deviation (off by default):
cuDNN's kernel on a GPU.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PLATFORM_OPS = ("auto", "cpu", "generic")


def select(platform_ops: str, generic: Callable, cpu: Callable) -> Callable:
    """The form of one operation for ``platform_ops``: ``generic``, ``cpu``, or for
    "auto" whichever fits the platform the program is lowered for (both take and
    return arrays; bind other arguments with ``functools.partial`` first)."""
    if platform_ops == "generic":
        return generic
    if platform_ops == "cpu":
        return cpu
    if platform_ops == "auto":
        def chosen(*args):
            return jax.lax.platform_dependent(*args, cpu=cpu, default=generic)
        return chosen
    raise ValueError(f"model.platform_ops must be one of {PLATFORM_OPS}, got {platform_ops!r}")


# --------------------------------------------------------------------------
# The forms every platform runs.
# --------------------------------------------------------------------------
@jax.custom_vjp
def gelu(x):
    """Exact GELU, torch.nn.GELU()'s default, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, with a
    backward that recomputes the cdf and the density from ``x``: only ``x`` is kept for
    the backward pass. ``nn.gelu(approximate=False)`` evaluates ``erfc`` (two polynomial
    branches and an exp, selected) and autodiff keeps its intermediates, which costs
    HBM on TPU and time on CPU (benchmarks/README.md, docs/tpu_memory.md)."""
    return x * _normal_cdf(x)


def _normal_cdf(x):
    return 0.5 * (1 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    pdf = jnp.exp(-0.5 * x * x) * np.asarray(1 / np.sqrt(2 * np.pi), x.dtype)
    return (g * (_normal_cdf(x) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention(qkv, num_heads: int):
    """Multi-head self-attention core: ``qkv`` (B, N, 3C) -> (B, N, C), before ``proj``.

    The official forward (reshape, permute to (3, B, H, N, hd), ``q @ k^T * scale``,
    float32 softmax, ``@ v``, heads back to channels) with a hand-written backward
    from the saved q, k, v and float32 probabilities: autodiff keeps more
    (B, H, N, N) tensors for the backward, which at patch 8 under ``remat`` costs TPU
    HBM; on XLA:CPU autodiff re-derives
    each operand's layout and copies the operands around every batched product,
    where here there is one copy in and one out (docs/tpu_memory.md,
    benchmarks/README.md). The same products and sums as autodiff; over query chunks
    (:func:`_query_chunks`), dk and dv add the chunks' float32 partial sums."""
    return _attention_fwd(qkv, num_heads)[0]


def _split_heads(qkv, num_heads: int):
    """(B, N, 3C) -> q, k, v of shape (B, H, N, hd): the official reshape and permute."""
    b, n, c3 = qkv.shape
    t = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def _attention_probs(q, k):
    """softmax(q k^T * hd^-0.5) in float32, the official op order (product, then scale)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


# Query rows per chunk of attention: longer sequences (patch 8 at 224 px, 785 tokens)
# compute the probabilities and the backward per chunk of query rows, so that no
# (B, H, N, N) gradient tensor is whole at once (TPU HBM); ViT-S/16 at 224 px
# (197 tokens) and shorter run in one piece.
QUERY_BLOCK = 256


def _query_chunks(n: int) -> list[slice]:
    """Query-row slices of ``n`` rows: one where ``n <= QUERY_BLOCK``; else slices of
    ``n / ceil(n / QUERY_BLOCK)`` rows rounded up to a multiple of 8 (TPU tiles), the last
    one shorter (785 rows: 200, 200, 200, 185)."""
    if n <= QUERY_BLOCK:
        return [slice(0, n)]
    chunks = -(-n // QUERY_BLOCK)
    size = -(-n // (8 * chunks)) * 8
    return [slice(r, r + size) for r in range(0, n, size)]


def _attention_fwd(qkv, num_heads: int):
    b, n, _ = qkv.shape
    q, k, v = _split_heads(qkv, num_heads)
    # each chunk's softmax rows are whole: the same values as one product over all rows
    ps = tuple(_attention_probs(q[:, :, i], k) for i in _query_chunks(n))
    o = jnp.concatenate([jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v) for p in ps], axis=2)
    return o.transpose(0, 2, 1, 3).reshape(b, n, -1), (q, k, v, ps)


def _attention_bwd(num_heads: int, res, g):
    q, k, v, ps = res
    b, h, n, hd = q.shape
    go = g.reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    if len(ps) == 1:
        dq, dk, dv = _attention_bwd_rows(q, k, v, ps[0], go, q.dtype)
    else:
        # dk and dv sum over the query rows: the chunks' float32 partials, then one cast
        parts = [_attention_bwd_rows(q[:, :, i], k, v, p, go[:, :, i], jnp.float32)
                 for i, p in zip(_query_chunks(n), ps)]
        dq = jnp.concatenate([t[0] for t in parts], axis=2)
        dk, dv = (functools.reduce(jnp.add, [t[j] for t in parts]).astype(q.dtype) for j in (1, 2))
    # (B, N, 3H, hd): each gradient moved to (B, N, H, hd), then joined on the head axis
    # (XLA:CPU runs three 4-D transposes and a concatenation faster than the 5-D
    # transpose of their stack).
    d = jnp.concatenate([t.transpose(0, 2, 1, 3) for t in (dq, dk, dv)], axis=2)
    return (d.reshape(b, n, 3 * h * hd),)


def _attention_bwd_rows(q, k, v, p, go, kv_dtype):
    """dq for the query rows in ``q``, ``p`` and ``go`` (all keys in ``k``, ``v``), and those
    rows' contributions to dk and dv, in ``kv_dtype``."""
    hd = q.shape[-1]
    pc = p.astype(v.dtype)
    dv = jnp.einsum("bhqk,bhqd->bhkd", pc, go, preferred_element_type=kv_dtype)
    dp = jnp.einsum("bhqd,bhkd->bhqk", go, v).astype(jnp.float32)
    # softmax backward, then the cast and the scale of the logits
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(q.dtype) * (hd ** -0.5)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=kv_dtype)
    return dq, dk, dv


attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------
# CPU forms.
# --------------------------------------------------------------------------
@jax.custom_vjp
def cpu_linear(x, kernel):
    """``x @ kernel`` over the last axis of ``x``, as ``nn.Dense`` computes, with a backward
    that forms the weight gradient ``x^T g`` from operands whose (batch, token) axes are
    merged into one: XLA:CPU's matmul library runs that 2-D product much faster than
    the product contracting two leading axes that autodiff gives."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, kernel):
    return cpu_linear(x, kernel), (x, kernel)


def _linear_bwd(res, g):
    x, kernel = res
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return dx, dw.astype(kernel.dtype)


cpu_linear.defvjp(_linear_fwd, _linear_bwd)


def _column_sums(x):
    """Sums over axis 0 of a 2-D array, kept (1, n), as a ``ones @ x`` product: XLA:CPU's
    matrix product reads the matrix once, where its column reduction of a wide matrix
    is far slower, and a reduction feeding a product is fused into it and recomputed
    in every tile."""
    return jnp.dot(jnp.ones((1, x.shape[0]), x.dtype), x, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def cpu_weight_norm(v, g):
    """PyTorch's ``weight_norm`` over each column, ``v * (g / ||v||)``, forward and backward
    reductions as :func:`_column_sums` products (the plain form's norms are fused into
    the head's (B, out_dim) product and recomputed in each of its tiles); the backward
    is the closed form ``dv = s dw - v s t / n^2``, ``dg = t / n`` with ``s = g / n``
    and ``t = sum_i v_i dw_i``."""
    return _weight_norm_fwd(v, g)[0]


def _weight_norm_fwd(v, g):
    n2 = _column_sums(jnp.square(v))
    s = g / jnp.sqrt(n2)
    return v * s, (v, s, n2)


def _weight_norm_bwd(res, dw):
    v, s, n2 = res
    t = _column_sums(v * dw)
    return s * dw - v * (s * t / n2), t / jnp.sqrt(n2)


cpu_weight_norm.defvjp(_weight_norm_fwd, _weight_norm_bwd)


def _bias_gradient(g):
    """``g`` summed over all axes but the last, as :func:`_column_sums` of the
    (rows, features)-flattened ``g`` in float32: XLA:CPU's matmul library reads the
    buffer the weight-gradient product reads, where its reduction read a transposed
    copy of the cotangent made for the sum alone."""
    return _column_sums(g.reshape(-1, g.shape[-1]).astype(jnp.float32))[0].astype(g.dtype)


@jax.custom_vjp
def cpu_add_bias(y, bias):
    """``y + bias`` over the last axis, its bias gradient by :func:`_bias_gradient`."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, g):
    return g, _bias_gradient(g)


cpu_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def cpu_bias_gelu(h, bias):
    """``gelu(h + bias)``, a Linear's bias and the GELU after it, with a backward that
    recomputes ``h + bias``, the cdf and the density from the saved ``h`` in one fused
    loop; the bias gradient is :func:`_bias_gradient` of the input gradient."""
    return gelu(h + bias)


def _bias_gelu_fwd(h, bias):
    return cpu_bias_gelu(h, bias), (h, bias)


def _recompute_from(h):
    """``h`` behind an optimisation barrier: the backward then recomputes the erf from it.
    Without the barrier XLA shares the forward's erf with the backward, which splits the
    forward into an erf pass and a product pass and makes the backward read the stored
    erf."""
    return jax.lax.optimization_barrier(h)


def _bias_gelu_bwd(res, g):
    h, bias = res
    dx = _gelu_bwd(_recompute_from(h) + bias, g)[0]
    return dx, _bias_gradient(dx)


cpu_bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def cpu_dense(x, kernel, bias=None, with_gelu: bool = False):
    """A Linear (and the GELU after it where ``with_gelu``): :func:`cpu_linear`, then
    :func:`cpu_add_bias` or :func:`cpu_bias_gelu` (:func:`gelu` without a bias)."""
    y = cpu_linear(x, kernel)
    if bias is None:
        return gelu(y) if with_gelu else y
    return (cpu_bias_gelu if with_gelu else cpu_add_bias)(y, bias)


def _row_mean(x):
    """Mean over the last axis, kept, as a matrix-vector product with a ``1/D`` vector
    (float32): XLA:CPU's matmul library then reads the rows once, where a reduction
    became a fusion fed with materialised (rows, D) broadcasts of the statistics. The
    two differ by float32 rounding (``1/D`` is inexact)."""
    w = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def cpu_layer_norm(x, scale, bias, eps: float, dtype):
    """LayerNorm over the last axis as ``nn.LayerNorm(use_fast_variance=False)`` computes
    it (statistics in float32, ``(x - mean) * (rsqrt(var + eps) * scale) + bias``, cast
    once to ``dtype``), its row means as :func:`_row_mean` products, and the closed-form
    backward ``dx = rstd * (gs - mean(gs) - xhat * mean(gs * xhat))`` (``gs = g * scale``)
    from the saved input, mean and rstd, where autodiff differentiates each step."""
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    x32 = x.astype(jnp.float32)
    mean = _row_mean(x32)
    xc = x32 - mean
    rstd = jax.lax.rsqrt(_row_mean(xc * xc) + eps)
    y = xc * (rstd * scale) + bias
    return y.astype(dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, dtype, res, g):
    del eps, dtype
    x, mean, rstd, scale = res
    g = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gs = g * scale
    dx = rstd * (gs - _row_mean(gs) - xhat * _row_mean(gs * xhat))
    lead = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), jnp.sum(g * xhat, lead), jnp.sum(g, lead)


cpu_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# --------------------------------------------------------------------------
# GPU: the fused-attention deviation.
# --------------------------------------------------------------------------
# cuDNN refusals already reported (one warning each per process).
_CUDNN_REFUSALS: set = set()


def fused_attention(q, k, v, scale: float):
    """``jax.nn.dot_product_attention`` of (B, T, H, hd) ``q`` and (B, S, H, hd) ``k``,
    ``v``: cuDNN's flash-attention kernel where the default backend is a GPU and the
    inputs are bfloat16 or float16, XLA's attention otherwise.

    ``implementation=None`` means XLA's, not cuDNN's, so the kernel is asked for by
    name. Where cuDNN refuses at trace time (no cuDNN, e.g. a ROCm GPU; an unsupported
    head dim) the call falls back to XLA's with one warning per reason.
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

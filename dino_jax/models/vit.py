"""Vision Transformer (Flax Linen) computing what the official DINO ViT computes, and
the DINOv2 backbones from config fields (registers, LayerScale, SwiGLU, mask token,
dinov2's position-embedding interpolation); the defaults are DINO's ViT.

Pre-norm blocks, LayerNorm eps 1e-6 with exact variance, qkv bias, exact (erf)
GELU, final LayerNorm, the CLS token as the feature; the official initial
distributions. Position embeddings are interpolated for other image sizes with a
re-statement of PyTorch's ``interpolate(mode="bicubic", align_corners=False,
scale_factor=...)`` including the official ``+0.1`` offset; ``jax.image.resize``
would give different numbers (different kernel and scale).

Images are NHWC float. Parameters are float32; ``dtype`` sets the compute dtype
(``jnp.bfloat16`` for mixed precision); softmax and normalisations run in float32.
``platform_ops`` chooses the form of a few operations (``models/platform_ops.py``):
the same values, other backward passes on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models import platform_ops as ops

Dtype = Any

# Official builders (vision_transformer.py): widths, depths and heads.
ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def trunc_normal_init(std: float = 0.02, lower: float = -2.0, upper: float = 2.0) -> Callable:
    """The official ``trunc_normal_(std, a=-2, b=2)``: bounds are absolute values,
    so with std 0.02 the truncation is at +-100 sigma (effectively a normal)."""

    def init(key, shape, dtype=jnp.float32):
        x = jax.random.truncated_normal(key, lower / std, upper / std, shape, jnp.float32)
        return (x * std).astype(dtype)

    return init


def torch_default_uniform_init(fan_in: int) -> Callable:
    """PyTorch's default Linear/Conv init (kaiming_uniform a=sqrt(5) and its bias
    rule): uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


# --------------------------------------------------------------------------
# PyTorch-exact bicubic interpolation of the position embedding.
# --------------------------------------------------------------------------
_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient.


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out_size, in_size) matrix of ``upsample_bicubic2d`` along one axis with
    ``align_corners=False`` and an explicit scale factor: source coordinate
    ``(dst + 0.5) / scale - 0.5`` (not clamped), taps clamped to the border.
    Computed in float32 like PyTorch's CPU kernel."""
    inv = np.float32(1.0) / np.float32(scale)
    dst = np.arange(out_size, dtype=np.float32)
    src = (dst + np.float32(0.5)) * inv - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    w = _cubic_weights(t).astype(np.float32)  # (out, 4)
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, k])
    return m.astype(np.float32)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel with a = -0.5 (PIL's), the filter of PyTorch's antialiased bicubic."""
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2.0, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_antialias_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out_size, in_size) matrix of ``interpolate(mode="bicubic", antialias=True,
    align_corners=False)`` along one axis, ``scale`` = output/input: output pixel i is
    centred at input coordinate (i + 0.5) / scale; the kernel is stretched by 1/scale
    when shrinking, its taps stay inside the input and each row is normalised to 1."""
    ratio = 1.0 / scale
    stretch = max(ratio, 1.0)
    support = 2.0 * stretch
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = ratio * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _keys_cubic((np.arange(lo, hi) - center + 0.5) / stretch)
        m[i, lo:hi] = w / w.sum()
    return m.astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_h: int, grid_w: int, image_h: int,
                          image_w: int, offset: float = 0.1, antialias: bool = False) -> jax.Array:
    """The official ``interpolate_pos_encoding`` for a (1, 1+N, D) embedding and
    an image giving a grid_h x grid_w patch grid. ``offset`` and ``antialias`` are
    DINOv2's ``interpolate_offset``/``interpolate_antialias`` (DINO: 0.1, False)."""
    n = pos_embed.shape[1] - 1
    if grid_h * grid_w == n and image_h == image_w:
        return pos_embed
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"position embedding has {n} patch positions, not a square grid")
    if offset:
        # Official: scale_factor=((h0 + offset) / sqrt(N), (w0 + offset) / sqrt(N)),
        # output = floor(in * scale).
        scale_h = (grid_h + offset) / math.sqrt(n)
        scale_w = (grid_w + offset) / math.sqrt(n)
        out_h = int(math.floor(float(side) * scale_h))
        out_w = int(math.floor(float(side) * scale_w))
        assert (out_h, out_w) == (grid_h, grid_w), (out_h, out_w, grid_h, grid_w)
    else:  # DINOv2 with offset 0: size=(h0, w0), the scale is the size ratio
        out_h, out_w = grid_h, grid_w
        scale_h, scale_w = grid_h / side, grid_w / side
    matrix = bicubic_antialias_matrix if antialias else bicubic_matrix
    mh = jnp.asarray(matrix(side, out_h, scale_h))
    mw = jnp.asarray(matrix(side, out_w, scale_w))
    cls_pos = pos_embed[:, :1]
    grid = pos_embed[0, 1:].reshape(side, side, -1).astype(jnp.float32)
    grid = jnp.einsum("ia,jb,abd->ijd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
    patch_pos = grid.reshape(1, out_h * out_w, -1).astype(pos_embed.dtype)
    return jnp.concatenate([cls_pos, patch_pos], axis=1)


# --------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------
def dense_formula(x, kernel, bias=None, with_gelu: bool = False):
    """``x @ kernel + bias`` over the last axis of ``x``, then the exact GELU if
    ``with_gelu`` (``platform_ops.gelu``, the one form every platform runs)."""
    y = jnp.dot(x, kernel)
    if bias is not None:
        y = y + bias
    return ops.gelu(y) if with_gelu else y


class Dense(nn.Module):
    """The official Linear (trunc-normal(0.02) weight, zero bias) with ``nn.Dense``'s
    parameters, float32 ``kernel`` (in, out) and ``bias``, computed in ``dtype``.
    ``gelu``: the exact GELU that follows it in an MLP, applied here so that the CPU
    form can fuse it with the bias."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    gelu: bool = False
    platform_ops: str = "auto"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", trunc_normal_init(0.02), (x.shape[-1], self.features), jnp.float32)
        args = [x.astype(self.dtype), kernel.astype(self.dtype)]
        if self.use_bias:
            args.append(self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype))
        return ops.select(self.platform_ops, functools.partial(dense_formula, with_gelu=self.gelu),
                          functools.partial(ops.cpu_dense, with_gelu=self.gelu))(*args)


def dense(features: int, dtype: Dtype, name: str, use_bias: bool = True,
          platform_ops: str = "auto", gelu: bool = False) -> Dense:
    return Dense(features, use_bias, dtype, gelu, platform_ops, name=name)


def layer_norm_formula(x, scale, bias, eps: float, dtype: Dtype):
    """LayerNorm over the last axis as ``nn.LayerNorm(use_fast_variance=False)`` and torch
    compute it: statistics in float32, exact variance, one cast to ``dtype``."""
    x32 = x.astype(jnp.float32)
    xc = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
    return (xc * (jax.lax.rsqrt(var + eps) * scale) + bias).astype(dtype)


class LayerNorm(nn.Module):
    """The official ``nn.LayerNorm(D, eps)``, with ``nn.LayerNorm``'s parameters
    (float32 ``scale`` ones, ``bias`` zeros); output in ``dtype``."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    platform_ops: str = "auto"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        dtype = jnp.dtype(self.dtype)
        return ops.select(self.platform_ops,
                          lambda x, s, b: layer_norm_formula(x, s, b, self.eps, dtype),
                          lambda x, s, b: ops.cpu_layer_norm(x, s, b, self.eps, dtype))(x, scale, bias)


def layer_norm(eps: float, dtype: Dtype, name: str, platform_ops: str = "auto") -> LayerNorm:
    return LayerNorm(eps, dtype, platform_ops, name=name)


def dot_product_attention(q, k, v):
    """softmax(q k^T * hd^-0.5) v over (B, N, H, hd) tensors, the softmax in float32
    (the official op order: product, scale, softmax). Returns (out, attention)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", attn.astype(v.dtype), v), attn


class DropPath(nn.Module):
    """Stochastic depth per sample: keep with prob 1-rate, scale kept by 1/(1-rate)."""
    rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jnp.floor(keep + jax.random.uniform(self.make_rng("drop_path"), shape, x.dtype))
        return x / keep * mask


class Attention(nn.Module):
    """Multi-head self-attention: qkv, softmax(q k^T / sqrt(hd)) v, proj."""
    dim: int
    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    fused: bool = False  # model.fused_attention: jax.nn.dot_product_attention (a deviation)
    platform_ops: str = "auto"

    @nn.compact
    def __call__(self, x, return_attention: bool = False, cls_only: bool = False):
        """(out, attention or None). ``cls_only``: the CLS token's query alone (keys and
        values from all tokens), out (B, 1, C): the CLS row of the full output."""
        qkv = dense(3 * self.dim, self.dtype, "qkv", self.qkv_bias, self.platform_ops)(x)
        attn = None
        if self.fused or cls_only or return_attention:
            # q, k, v sliced in place, not with the "three" axis moved first: with this layout
            # every recipe's train step fits its TPU slice (docs/tpu_memory.md)
            t = einops.rearrange(qkv, "b n (three h d) -> b n three h d", three=3, h=self.num_heads)
            q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
            if cls_only:
                q = q[:, :1]
            if self.fused and not return_attention:
                out = ops.fused_attention(q, k, v, q.shape[-1] ** -0.5)
            else:
                out, attn = dot_product_attention(q, k, v)
            out = einops.rearrange(out, "b n h d -> b n (h d)")
        else:
            out = ops.attention(qkv, self.num_heads)  # dot_product_attention, hand-written backward
        out = dense(self.dim, self.dtype, "proj", platform_ops=self.platform_ops)(out)
        return out, attn


class Mlp(nn.Module):
    """Transformer MLP / feed-forward block: fc1, GELU, fc2."""
    hidden_dim: int
    dtype: Dtype = jnp.float32
    platform_ops: str = "auto"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = dense(self.hidden_dim, self.dtype, "fc1", platform_ops=self.platform_ops, gelu=True)(x)
        return dense(d, self.dtype, "fc2", platform_ops=self.platform_ops)(x)


class LayerScale(nn.Module):
    """DINOv2's LayerScale: a learned per-channel gain ``gamma`` on a residual branch."""
    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                           jnp.float32)
        return x * gamma.astype(x.dtype)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of DINOv2's fused SwiGLU: 2/3 of the MLP's, rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU feed-forward block (ViT-g): w12, silu(x1) * x2, w3."""
    hidden_dim: int
    dtype: Dtype = jnp.float32
    platform_ops: str = "auto"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x1, x2 = jnp.split(dense(2 * self.hidden_dim, self.dtype, "w12", platform_ops=self.platform_ops)(x),
                           2, axis=-1)
        return dense(d, self.dtype, "w3", platform_ops=self.platform_ops)(nn.silu(x1) * x2)


FFNS = ("mlp", "swiglu")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    fused_attention: bool = False
    platform_ops: str = "auto"
    layerscale_init: float = 0.0  # DINOv2: LayerScale ls1/ls2 after attn/ffn; 0 = none
    ffn: str = "mlp"  # mlp | swiglu (DINOv2 ViT-g)

    @nn.compact
    def __call__(self, x, train: bool = False, return_attention: bool = False,
                 cls_only: bool = False):
        """``cls_only``: return the CLS token's output alone, (B, 1, D), computing only
        what it depends on (every token's keys and values, the CLS query, MLP)."""
        y, attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.dtype, self.fused_attention,
                            self.platform_ops, name="attn")(
            layer_norm(self.eps, self.dtype, "norm1", self.platform_ops)(x), return_attention, cls_only)
        if cls_only:
            x = x[:, :1]
        if self.layerscale_init:
            y = LayerScale(self.layerscale_init, name="ls1")(y)
        drop = DropPath(self.drop_path, name="drop_path")
        x = x + drop(y, train)
        if self.ffn == "swiglu":
            ffn = SwiGLU(swiglu_hidden(self.dim, self.mlp_ratio), self.dtype, self.platform_ops, name="mlp")
        else:
            ffn = Mlp(int(self.dim * self.mlp_ratio), self.dtype, self.platform_ops, name="mlp")
        y = ffn(layer_norm(self.eps, self.dtype, "norm2", self.platform_ops)(x))
        if self.layerscale_init:
            y = LayerScale(self.layerscale_init, name="ls2")(y)
        x = x + drop(y, train)
        return (x, attn) if return_attention else x


class VisionTransformer(nn.Module):
    """The official DINO ViT. ``__call__`` returns the normalised CLS token (B, D)."""
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    img_size: int = 224
    layer_norm_eps: float = 1e-6
    in_chans: int = 3
    dtype: Dtype = jnp.float32
    fused_attention: bool = False  # deviation switch: cuDNN/XLA fused attention kernel
    remat: bool = False  # rematerialise each block but the last in the backward pass (memory for compute)
    platform_ops: str = "auto"  # auto | cpu | generic: the form of the operations (platform_ops.select)
    # DINOv2 (config fields of the same names; these defaults are DINO's ViT):
    num_register_tokens: int = 0  # learned tokens after CLS, without position embedding
    layerscale_init: float = 0.0  # LayerScale on each residual branch, its initial gain; 0 = none
    ffn: str = "mlp"  # block FFN: mlp | swiglu
    interpolate_offset: float = 0.1  # position-embedding resize offset; 0 = exact output size
    interpolate_antialias: bool = False  # antialiased bicubic position-embedding resize
    mask_token: bool = False  # a learned mask token (parameter ``mask_token``, (1, D))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers."""
        return 1 + self.num_register_tokens

    def setup(self):
        if self.ffn not in FFNS:
            raise ValueError(f"model.ffn must be one of {FFNS}, got {self.ffn!r}")
        p = self.patch_size
        fan_in = self.in_chans * p * p
        self.patch_embed = nn.Conv(
            self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
            param_dtype=jnp.float32, kernel_init=torch_default_uniform_init(fan_in),
            bias_init=torch_default_uniform_init(fan_in), name="patch_embed")
        num_patches = (self.img_size // p) ** 2
        self.cls_token = self.param("cls_token", trunc_normal_init(0.02), (1, 1, self.embed_dim))
        self.pos_embed = self.param("pos_embed", trunc_normal_init(0.02),
                                    (1, num_patches + 1, self.embed_dim))
        if self.num_register_tokens:  # DINOv2 draws them at std 1e-6
            self.register_tokens = self.param("register_tokens", nn.initializers.normal(1e-6),
                                              (1, self.num_register_tokens, self.embed_dim))
        if self.mask_token:
            self.mask_embedding = self.param("mask_token", nn.initializers.zeros, (1, self.embed_dim))
        # Linear drop-path rule over depth, as torch.linspace(0, rate, depth).
        rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else [0.0]
        block_cls = nn.remat(Block, static_argnums=(2, 3, 4)) if self.remat else Block
        # The last block runs on the CLS row alone in __call__ and is not rematerialised.
        self.blocks = [
            (block_cls if i < self.depth - 1 else Block)(
                self.embed_dim, self.num_heads, self.mlp_ratio, self.qkv_bias, float(rates[i]),
                self.layer_norm_eps, self.dtype, self.fused_attention, self.platform_ops,
                layerscale_init=self.layerscale_init, ffn=self.ffn, name=f"blocks_{i}")
            for i in range(self.depth)
        ]
        self.norm = layer_norm(self.layer_norm_eps, self.dtype, "norm", self.platform_ops)

    def prepare_tokens(self, x, masks=None):
        """(B, 1+R+N, D): CLS, the registers, the patches; position embedding on CLS and
        patches. ``masks`` (B, N) bool: those patches become the mask token (DINOv2)."""
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        x = self.patch_embed(x.astype(self.dtype))  # (B, h/p, w/p, D)
        gh, gw = x.shape[1], x.shape[2]
        x = einops.rearrange(x, "b h w d -> b (h w) d")
        if masks is not None:
            if not self.mask_token:
                raise ValueError("masks need a model with a mask token (model.mask_token)")
            x = jnp.where(masks[..., None], self.mask_embedding[None].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        pos = interpolate_pos_embed(self.pos_embed, gh, gw, h, w, self.interpolate_offset,
                                    self.interpolate_antialias)
        x = x + pos.astype(x.dtype)
        if self.num_register_tokens:
            regs = jnp.broadcast_to(self.register_tokens.astype(x.dtype),
                                    (b, self.num_register_tokens, self.embed_dim))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return x

    def get_tokens(self, x, train: bool = False):
        """All final normalised tokens (B, 1+R+N, D): [:, 0] is CLS, then R registers
        (``num_prefix_tokens`` = 1+R), then the patches."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x, train, False, False)
        return self.norm(x)

    def __call__(self, x, train: bool = False):
        """The CLS feature, ``get_tokens(x, train)[:, 0]``. The last block computes only
        what that row depends on: all tokens' keys and values, but the CLS query's
        attention row, projection, residual and MLP alone (the official model computes
        the other rows and discards them)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x, train, False, False)
        return self.norm(self.blocks[-1](x, train, False, True))[:, 0]

    def forward_features(self, x, masks=None, return_attention: bool = False):
        """DINOv2's ``forward_features``: {'x_norm_clstoken' (B, D), 'x_norm_regtokens'
        (B, R, D), 'x_norm_patchtokens' (B, N, D), 'x_prenorm' (B, 1+R+N, D)}; with
        ``return_attention`` also the last block's 'attention' (B, heads, 1+R+N, 1+R+N)
        and 'cls_attention' (B, heads, N), the CLS query's weights on the patches."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks[:-1]:
            x = blk(x, False, False, False)
        x, attn = self.blocks[-1](x, False, return_attention, False) if return_attention \
            else (self.blocks[-1](x, False, False, False), None)
        x_norm = self.norm(x)
        k = self.num_prefix_tokens
        out = {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:k],
               "x_norm_patchtokens": x_norm[:, k:], "x_prenorm": x}
        if return_attention:
            out["attention"] = attn
            out["cls_attention"] = attn[:, :, 0, k:]
        return out

    def get_last_selfattention(self, x):
        """Softmax attention of the last block, (B, heads, 1+R+N, 1+R+N), float32."""
        return self.get_tokens_and_attention(x)[1]

    def get_tokens_and_attention(self, x):
        """One forward pass: (final normalised tokens (B, 1+N, D), the last block's softmax
        attention (B, heads, N, N) float32), for callers that need both (extract, video
        segmentation); unused outputs are dropped by XLA under jit."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x, False, False, False)
        x, attn = self.blocks[-1](x, False, True, False)
        return self.norm(x), attn

    def get_intermediate_layers(self, x, n=1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """DINOv2's ``get_intermediate_layers``: the outputs of the last ``n`` blocks (or of
        the blocks whose indices ``n`` lists), through the final LayerNorm when ``norm``; a
        tuple of patch tokens (B, N, D), or (B, h, w, D) with ``reshape`` (NHWC: dinov2
        gives (B, D, h, w)), paired with the CLS token (B, D) when ``return_class_token``.
        DINO's ``get_intermediate_layers(x, n)`` (whole token sequences) is
        :meth:`get_intermediate_tokens`."""
        b, h, w, _ = x.shape
        take = range(self.depth - n, self.depth) if isinstance(n, int) else list(n)
        if not all(0 <= i < self.depth for i in take) or (isinstance(n, int) and n > self.depth):
            raise ValueError(f"blocks {list(take)} requested from a depth-{self.depth} model")
        x = self.prepare_tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks[:max(take) + 1]):
            x = blk(x, False, False, False)
            if i in take:
                outs.append(self.norm(x) if norm else x)
        k = self.num_prefix_tokens
        cls = [o[:, 0] for o in outs]
        outs = [o[:, k:] for o in outs]
        if reshape:
            outs = [o.reshape(b, h // self.patch_size, w // self.patch_size, -1) for o in outs]
        return tuple(zip(outs, cls)) if return_class_token else tuple(outs)

    def get_intermediate_tokens(self, x, n: int = 1):
        """DINO's ``get_intermediate_layers(x, n)``: the normalised outputs of the last
        ``n`` blocks, a list of (B, 1+R+N, D)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, False, False, False)
            if self.depth - i <= n:
                out.append(self.norm(x))
        return out


def _builder(arch: str):
    def build(patch_size: int = 16, **kwargs) -> VisionTransformer:
        return VisionTransformer(patch_size=patch_size, **{**ARCHS[arch], **kwargs})

    build.__name__ = arch
    build.__doc__ = f"Official {arch}: {ARCHS[arch]}, mlp_ratio 4, qkv bias, LayerNorm eps 1e-6."
    return build


vit_tiny = _builder("vit_tiny")
vit_small = _builder("vit_small")
vit_base = _builder("vit_base")

# Fields of VisionTransformer that describe the architecture (saved as model-config JSON).
CONFIG_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                 "img_size", "layer_norm_eps", "num_register_tokens", "layerscale_init", "ffn",
                 "interpolate_offset", "interpolate_antialias", "mask_token")


def arch_name(embed_dim: int, depth: int, num_heads: int) -> str:
    """'vit_small' etc. when the dims are an official builder's, else 'custom'."""
    for name, dims in ARCHS.items():
        if dims == dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads):
            return name
    return "custom"


def model_config(model: VisionTransformer) -> dict:
    """JSON-able description from which :func:`build_backbone` rebuilds the model."""
    cfg = {f: getattr(model, f) for f in CONFIG_FIELDS}
    cfg["arch"] = arch_name(model.embed_dim, model.depth, model.num_heads)
    return cfg


def build_backbone(cfg: dict, **overrides) -> VisionTransformer:
    """Build from a model-config dict (``arch`` + fields); unknown keys are ignored."""
    fields = {f.name for f in dataclasses.fields(VisionTransformer)}
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    arch = cfg.get("arch", "custom")
    if arch in ARCHS:
        kwargs = {**ARCHS[arch], **kwargs}
    elif arch != "custom":
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)} or 'custom'")
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)

"""DINO projection head: MLP, L2-normalised bottleneck, weight-normalised last layer.

Row i of the last layer's weight is ``g_i * v_i / ||v_i||`` (PyTorch
``weight_norm`` with dim=0). ``g`` starts at 1; with ``norm_last_layer`` the
official code never trains it (the optimiser must leave it out: see
:func:`frozen_weight_g_mask`).

Flax layout: Dense kernels are (in, out) = torch weight.T; ``weight_v`` is
(bottleneck, out) and ``weight_g`` is (1, out) — kept 2-D like torch's (out, 1)
so the official weight-decay rule (skip biases and 1-D tensors) treats it the same.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models import platform_ops as ops
from dino_jax.models.vit import dense, torch_default_uniform_init

Dtype = Any


def l2_normalize(x, axis=-1, eps=1e-12):
    """``torch.nn.functional.normalize``: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def weight_norm(v, g):
    """``v * (g / ||v||)`` with the norm over each column: PyTorch's ``weight_norm``
    (dim=0 of torch's (out, in) weight)."""
    return v * (g / jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True)))


class WeightNormDense(nn.Module):
    """Bias-free Linear with weight normalisation over each output unit."""
    features: int
    dtype: Dtype = jnp.float32
    platform_ops: str = "auto"

    @nn.compact
    def __call__(self, x):
        in_dim = x.shape[-1]
        v = self.param("weight_v", torch_default_uniform_init(in_dim), (in_dim, self.features))
        g = self.param("weight_g", nn.initializers.ones, (1, self.features))
        w = ops.select(self.platform_ops, weight_norm, ops.cpu_weight_norm)(v, g)
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))


class DINOHead(nn.Module):
    """The official DINOHead: MLP (Linear, GELU, ...), L2 normalisation, weight-normalised Linear."""
    out_dim: int = 65536
    norm_last_layer: bool = True
    nlayers: int = 3
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dtype: Dtype = jnp.float32
    platform_ops: str = "auto"  # auto | cpu | generic: the form of the operations (platform_ops.select)

    @nn.compact
    def __call__(self, x):
        nlayers = max(self.nlayers, 1)
        dims = [self.bottleneck_dim] if nlayers == 1 else (
            [self.hidden_dim] * (nlayers - 1) + [self.bottleneck_dim])
        x = x.astype(self.dtype)
        for i, d in enumerate(dims):
            x = dense(d, self.dtype, f"mlp_{i}", platform_ops=self.platform_ops, gelu=i < len(dims) - 1)(x)
        x = l2_normalize(x.astype(jnp.float32))
        return WeightNormDense(self.out_dim, self.dtype, self.platform_ops, name="last_layer")(x)


def frozen_weight_g_mask(head_params, norm_last_layer: bool):
    """Pytree of bools over ``head_params``: True where a leaf is never trained
    (``last_layer/weight_g`` when ``norm_last_layer``)."""
    def is_frozen(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return bool(norm_last_layer and keys[-2:] == ["last_layer", "weight_g"])

    return jax.tree_util.tree_map_with_path(is_frozen, head_params)

"""The official optimiser as optax transforms: per-tensor gradient clipping,
AdamW with PyTorch's exact semantics, the weight-decay mask, the frozen
``weight_g`` and the last-layer freeze.

Official behaviour reproduced (main_dino.py, utils.py):

- ``utils.clip_gradients``: each gradient tensor on its own is scaled by
  ``clip / (||g|| + 1e-6)`` when that is < 1 (not a global-norm clip).
- ``utils.cancel_gradients_last_layer``: during the first ``freeze_last_layer``
  epochs the head's last layer has ``grad = None``, so ``torch.optim.AdamW``
  skips it entirely: its parameters, both moments AND its own step count (torch
  keeps one per parameter) are untouched. Hence the per-leaf ``count`` below and
  the ``active`` argument of the update.
- ``utils.get_params_groups``: no weight decay on biases and 1-D tensors;
  parameters with ``requires_grad=False`` (``last_layer.weight_g`` when
  ``norm_last_layer``) are in no group and never change.
- ``torch.optim.AdamW``: ``p *= 1 - lr*wd`` (decoupled, scaled by lr), then Adam
  with bias correction and ``eps`` added to ``sqrt(v) / sqrt(1 - b2^t)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


# --------------------------------------------------------------------------
# Masks over the student's params {'backbone': ..., 'head': ...}.
# --------------------------------------------------------------------------
def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: not a ``bias`` and more than one dimension
    (official rule; LayerNorm scales are 1-D; cls_token/pos_embed/weight_g decay)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: not (_keys(path)[-1] == "bias" or jnp.ndim(p) <= 1), params)


def last_layer_mask(params: PyTree) -> PyTree:
    """True for the head's weight-normalised last layer (official: ``'last_layer' in name``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "last_layer" in _keys(path), params)


def trainable_mask(params: PyTree, norm_last_layer: bool) -> PyTree:
    """False for parameters the official code never trains: ``last_layer/weight_g``
    when ``norm_last_layer`` (``requires_grad=False``)."""
    def is_trainable(path, _):
        return not (norm_last_layer and _keys(path)[-2:] == ["last_layer", "weight_g"])

    return jax.tree_util.tree_map_with_path(is_trainable, params)


def active_mask(last_layer: PyTree, last_layer_frozen) -> PyTree:
    """Per-leaf bool scalars for :func:`torch_adamw`'s ``active``: False on the
    last layer while it is frozen. ``last_layer_frozen`` may be traced."""
    frozen = jnp.asarray(last_layer_frozen, bool)
    return jax.tree.map(lambda is_last: jnp.logical_not(frozen) if is_last else jnp.asarray(True),
                        last_layer)


def _resolve(mask, params):
    return mask(params) if callable(mask) else mask


# --------------------------------------------------------------------------
# Per-tensor gradient clipping.
# --------------------------------------------------------------------------
def tensor_norms(tree: PyTree) -> PyTree:
    """L2 norm of every leaf (float32)."""
    return jax.tree.map(lambda g: jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))), tree)


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """Official ``clip_gradients``: each tensor scaled by ``max_norm / (norm + 1e-6)``
    when that coefficient is below 1. ``max_norm`` 0 (or None) disables it."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        if not max_norm:
            return updates, state

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            coef = max_norm / (norm + 1e-6)
            return jnp.where(coef < 1, g * coef.astype(g.dtype), g)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------
# AdamW, PyTorch semantics, per-parameter step counts.
# --------------------------------------------------------------------------
class TorchAdamWState(NamedTuple):
    step: jax.Array   # int32 scalar: number of update calls (drives callable schedules)
    count: PyTree     # int32 scalar per parameter: torch's per-parameter ``state['step']``
    mu: PyTree        # exp_avg
    nu: PyTree        # exp_avg_sq


def _value(v, step):
    return v(step) if callable(v) else v


def torch_adamw(learning_rate: float | Callable | None = None,
                weight_decay: float | Callable | None = None,
                b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay_mask: PyTree | Callable | None = decay_mask,
                trainable: PyTree | Callable | None = None,
                ) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.AdamW`` as an optax transform returning parameter deltas.

    ``learning_rate`` / ``weight_decay``: floats or callables of the update
    count, or None to require them as extra args of ``update`` (the train step
    passes the per-iteration schedule values that way).
    ``weight_decay_mask``: pytree (or callable of params) of bools, True = decay.
    ``trainable``: pytree (or callable) of Python bools; False leaves are never
    changed (static, costs nothing).

    ``update(grads, state, params, *, learning_rate=None, weight_decay=None,
    active=None)``: ``active`` is an optional pytree of bool scalars (may be
    traced); where False the parameter, its moments and its count are left as
    they are and its delta is 0 (torch's ``grad is None``).
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)
    lr_default, wd_default = learning_rate, weight_decay

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        count = jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)
        return TorchAdamWState(jnp.zeros((), jnp.int32), count, zeros,
                               jax.tree.map(jnp.copy, zeros))

    def update(grads, state, params=None, *, learning_rate=None, weight_decay=None,
               active=None, **extra):
        del extra
        if params is None:
            raise ValueError("torch_adamw needs params (decoupled weight decay)")
        lr = learning_rate if learning_rate is not None else _value(lr_default, state.step)
        wd = weight_decay if weight_decay is not None else _value(wd_default, state.step)
        if lr is None or wd is None:
            raise ValueError("torch_adamw: learning_rate and weight_decay must be given "
                             "at construction or to update()")
        lr = jnp.asarray(lr, jnp.float32)
        wd = jnp.asarray(wd, jnp.float32)
        dmask = _resolve(weight_decay_mask, params) if weight_decay_mask is not None else \
            jax.tree.map(lambda _: True, params)
        tmask = _resolve(trainable, params) if trainable is not None else \
            jax.tree.map(lambda _: True, params)
        amask = active if active is not None else jax.tree.map(lambda _: None, params)

        def one(g, p, mu, nu, count, decay, train, act):
            if not train:
                return jnp.zeros_like(p), mu, nu, count
            g = g.astype(jnp.float32)
            p32 = p.astype(jnp.float32)
            new_count = count + 1
            t = new_count.astype(jnp.float32)
            p1 = p32 * (1 - lr * wd) if decay else p32
            new_mu = mu + (1 - b1) * (g - mu)                  # exp_avg.lerp_(grad, 1 - b1)
            new_nu = nu * b2 + (1 - b2) * (g * g)              # exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
            bc1 = -jnp.expm1(t * log_b1)                       # 1 - b1**t, accurate in float32
            bc2 = -jnp.expm1(t * log_b2)
            denom = jnp.sqrt(new_nu) / jnp.sqrt(bc2) + eps
            p2 = p1 - (lr / bc1) * (new_mu / denom)
            delta = (p2 - p32).astype(p.dtype)
            if act is None:
                return delta, new_mu, new_nu, new_count
            act = jnp.asarray(act, bool)
            return (jnp.where(act, delta, jnp.zeros_like(delta)), jnp.where(act, new_mu, mu),
                    jnp.where(act, new_nu, nu), jnp.where(act, new_count, count))

        treedef = jax.tree.structure(params)
        flat = [treedef.flatten_up_to(x) for x in
                (grads, params, state.mu, state.nu, state.count, dmask, tmask, amask)]
        out = [one(*args) for args in zip(*flat)]
        deltas, mus, nus, counts = (treedef.unflatten(list(x)) for x in zip(*out))
        return deltas, TorchAdamWState(state.step + 1, counts, mus, nus)

    return optax.GradientTransformationExtraArgs(init, update)


def dino_optimizer(clip_grad: float = 3.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   norm_last_layer: bool = True,
                   learning_rate: float | Callable | None = None,
                   weight_decay: float | Callable | None = None,
                   ) -> optax.GradientTransformationExtraArgs:
    """Per-tensor clip then PyTorch AdamW with the official masks, over the
    student params ``{'backbone', 'head'}``. ``update(grads, state, params, *,
    learning_rate, weight_decay, active)``; build ``active`` with
    :func:`active_mask` (``last_layer_mask(params)``, frozen-this-step flag).
    The clip sees the last layer's gradient too (as officially; it only matters
    for the returned norms there)."""
    return optax.chain(
        clip_by_tensor_norm(clip_grad),
        torch_adamw(learning_rate, weight_decay, b1, b2, eps, decay_mask,
                    lambda params: trainable_mask(params, norm_last_layer)),
    )


def adamw_state(opt_state) -> TorchAdamWState:
    """The :class:`TorchAdamWState` inside a :func:`dino_optimizer` state."""
    for s in opt_state:
        if isinstance(s, TorchAdamWState):
            return s
    raise ValueError("no TorchAdamWState in this optimiser state")

"""Teacher EMA and center update as optax-style state transforms.

Both are pure ``(init, update)`` pairs: ``init`` builds the state, ``update``
returns the new state; the momentum may be a traced per-step scalar (the
teacher's comes from the cosine schedule, see ``schedules.build_schedules``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dino_jax import losses


class StateTransform(NamedTuple):
    init: Callable[..., Any]
    update: Callable[..., Any]


def teacher_ema() -> StateTransform:
    """Teacher <- m * teacher + (1 - m) * student over EVERY parameter (the
    official loop runs over ``student.parameters()``, frozen ``weight_g``
    included).

    init(student_params) -> teacher params (a copy of the student).
    update(student_params, teacher_params, momentum) -> new teacher params.
    """
    def init(student_params):
        return jax.tree.map(lambda p: jnp.array(p, copy=True), student_params)

    def update(student_params, teacher_params, momentum):
        m = jnp.asarray(momentum, jnp.float32)

        def one(q, k):
            # torch: k.mul_(m).add_((1 - m) * q)
            return (k * m.astype(k.dtype) + (1 - m).astype(k.dtype) * q).astype(k.dtype)

        return jax.tree.map(one, student_params, teacher_params)

    return StateTransform(init, update)


def center_ema(out_dim: int, momentum: float = 0.9) -> StateTransform:
    """The DINO center: c <- m c + (1 - m) mean_{global batch}(teacher output).

    init() -> zeros (1, out_dim) float32.
    update(teacher_out, center) -> new center, ``teacher_out`` (..., out_dim) raw
    teacher head outputs of this step (all global crops of the global batch).
    """
    def init(*_):
        return jnp.zeros((1, out_dim), jnp.float32)

    def update(teacher_out, center):
        return losses.update_center(center, teacher_out, momentum)

    return StateTransform(init, update)

"""The DINO objective (official ``DINOLoss``) and the diagnostics that tell collapse apart.

Layouts: the core functions take the crops on a leading axis,
``student_out (ncrops, B, K)`` and ``teacher_out (2, B, K)``; :func:`chunk_crops`
turns the official crop-major concatenation ``(ncrops*B, K)`` into that.

Collapse (Caron et al. 2021, Sec. 5.3 / Fig. 7): when the teacher collapses the
student simply copies it, so the KL(teacher || student) goes to 0, and the
teacher either puts all its mass on one dimension for every image (the entropy
of the *batch-mean* teacher distribution goes to 0; what happens without
centering) or becomes uniform (teacher entropy goes to log K; what happens
without sharpening). See :func:`collapse_flag` for the criterion.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Collapse criterion (documented in collapse_flag).
COLLAPSE_KL = 0.05            # KL(teacher || student) below this (nats): student copies the teacher
COLLAPSE_ONE_DIM = 0.1        # batch-mean teacher entropy below this fraction of log K
COLLAPSE_UNIFORM = 0.9        # per-image teacher entropy above this fraction of log K


def chunk_crops(x: jax.Array, ncrops: int) -> jax.Array:
    """(ncrops*B, K) crop-major rows (official ``.chunk(ncrops)``) -> (ncrops, B, K)."""
    if x.shape[0] % ncrops:
        raise ValueError(f"{x.shape[0]} rows are not {ncrops} crops of equal batch")
    return x.reshape(ncrops, x.shape[0] // ncrops, *x.shape[1:])


def teacher_probs(teacher_out: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
    """Centering and sharpening: softmax((t - c) / temp), without gradient."""
    t = teacher_out.astype(jnp.float32)
    q = jax.nn.softmax((t - center.astype(jnp.float32).reshape(-1)) / teacher_temp, axis=-1)
    return jax.lax.stop_gradient(q)


def _entropy(p: jax.Array) -> jax.Array:
    """Entropy (nats) over the last axis, 0 log 0 = 0."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def dino_loss(student_out: jax.Array, teacher_out: jax.Array, center: jax.Array,
              teacher_temp, student_temp: float = 0.1):
    """Multi-crop DINO cross-entropy.

    student_out: (ncrops, B, K) student head outputs (any number of crops; the
      first two are the global crops the teacher saw).
    teacher_out: (2, B, K) raw teacher head outputs (gradient stopped here).
    center: (1, K) or (K,). teacher_temp: scalar (may be traced).

    Returns (loss, aux): the mean over all (teacher crop iq, student crop v != iq)
    pairs of the batch mean of sum_k -q log softmax(s / student_temp); aux holds
    float32 diagnostics: ``teacher_entropy`` (mean over images of H(q)),
    ``batch_entropy`` (H of the batch-mean q), ``kl`` (mean over the same pairs of
    KL(q || p_student)), and ``teacher_max_prob`` (mean of max_k q).
    """
    nt, ns = teacher_out.shape[0], student_out.shape[0]
    if ns < 2 or nt > ns:
        raise ValueError(f"need at least the teacher's {nt} crops among the student's, got {ns}")
    s = student_out.astype(jnp.float32) / student_temp
    log_p = jax.nn.log_softmax(s, axis=-1)                       # (ns, B, K)
    q = teacher_probs(teacher_out, center, teacher_temp)         # (nt, B, K)
    # ce[iq, v] = mean_b sum_k -q[iq] log p[v]
    ce = -jnp.einsum("ibk,vbk->iv", q, log_p, precision=jax.lax.Precision.HIGHEST) / s.shape[1]
    pair = jnp.ones((nt, ns), bool).at[jnp.arange(nt), jnp.arange(nt)].set(False)
    n_terms = nt * ns - nt
    loss = jnp.sum(jnp.where(pair, ce, 0.0)) / n_terms

    h_q = _entropy(q)                                            # (nt, B)
    mean_h_q = jnp.mean(h_q, axis=1)                             # (nt,)
    # KL(q_iq || p_v) = CE(q_iq, p_v) - H(q_iq), averaged over the same pairs.
    kl = jnp.sum(jnp.where(pair, ce - mean_h_q[:, None], 0.0)) / n_terms
    aux = {
        "teacher_entropy": jnp.mean(h_q),
        "batch_entropy": _entropy(jnp.mean(q, axis=(0, 1))),
        "kl": kl,
        "teacher_max_prob": jnp.mean(jnp.max(q, axis=-1)),
    }
    return loss, aux


def update_center(center: jax.Array, teacher_out: jax.Array, momentum: float = 0.9) -> jax.Array:
    """c <- m c + (1 - m) * mean over every row of the GLOBAL batch of the raw
    teacher outputs. ``teacher_out`` is (..., K); under jit with a batch-sharded
    array the mean is over the global batch (XLA adds the all-reduce)."""
    t = teacher_out.astype(jnp.float32).reshape(-1, teacher_out.shape[-1])
    batch_center = jnp.sum(t, axis=0, keepdims=True) / t.shape[0]
    return center * momentum + batch_center * (1 - momentum)


def collapse_flag(aux: dict, out_dim: int) -> jax.Array:
    """True when the diagnostics say the teacher has collapsed:

        kl < COLLAPSE_KL  and  (batch_entropy < COLLAPSE_ONE_DIM * log K      # one dimension dominates
                                or teacher_entropy > COLLAPSE_UNIFORM * log K)  # uniform output

    A healthy run has a low per-image teacher entropy (sharp) but a high
    batch-mean entropy (different images use different dimensions) and a
    clearly positive KL. Works on device (jnp) or host values."""
    log_k = math.log(out_dim)
    one_dim = aux["batch_entropy"] < COLLAPSE_ONE_DIM * log_k
    uniform = aux["teacher_entropy"] > COLLAPSE_UNIFORM * log_k
    return jnp.logical_and(aux["kl"] < COLLAPSE_KL, jnp.logical_or(one_dim, uniform))


class DINOLoss:
    """Convenience mirror of the official module for the crop-major layout,
    with the per-epoch teacher-temperature schedule. Pure: the center is passed
    in and the updated one returned."""

    def __init__(self, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        from dino_jax.schedules import teacher_temp_schedule  # noqa: PLC0415
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def __call__(self, student_output, teacher_output, center, epoch: int):
        """(loss, new_center, aux) for crop-major (ncrops*B, K) / (2*B, K) outputs."""
        temp = float(self.teacher_temp_schedule[epoch])
        loss, aux = dino_loss(chunk_crops(student_output, self.ncrops),
                              chunk_crops(teacher_output, 2), center, temp, self.student_temp)
        return loss, update_center(center, teacher_output, self.center_momentum), aux

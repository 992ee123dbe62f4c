"""``config.data.source = 'synthetic'``: random crops of the recipe's shapes, made
on the devices. No TensorFlow, no files: for benchmarks of the real training loop
and for GPU/TPU machines without TF.

Every step's global batch ``{'global_crops': (B, 2, G, G, 3), 'local_crops':
(B, L, l, l, 3)}`` is drawn by one jitted function with ``jax.random`` straight into
the batch sharding, so nothing crosses from the host but the step number: 8-bit
values, as decoded pixels are, spread uniformly over [-2, 2] (about the range of
ImageNet-normalised pixels), four from each random 32-bit word (a quarter of the
random bits a float32 uniform per value would draw, so the batch costs little
beside the step the loop benchmark times). Batch k is a
function of (seed, k) only: a resumed run sees the batches an uninterrupted one
would. Not images: the loss trains on noise, so use it for speed, never for
features.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dino_jax import sharding


def _uniform_8bit(key, shape) -> jax.Array:
    """float32 ``shape`` of 256 evenly spaced levels in [-2, 2], uniformly drawn: the
    bytes of ``ceil(n / 4)`` random 32-bit words."""
    n = math.prod(shape)
    words = jax.random.bits(key, (-(-n // 4),), jnp.uint32)
    levels = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:n].reshape(shape)
    return levels.astype(jnp.float32) * (4.0 / 255.0) - 2.0


class SyntheticIterator:
    """Global device batches for the train loop; the same interface as
    ``pipeline.TrainIterator`` (``steps_per_epoch``, ``num_examples``, ``get_state``),
    but ``next()`` returns global ``jax.Array``s already laid out by
    ``sharding.batch_sharding(mesh)``."""

    on_device = True  # the loop must not shard these batches again

    def __init__(self, data_cfg, global_batch_size: int, seed: int, mesh, start_step: int = 0,
                 state: dict | None = None):
        self.num_examples = int(data_cfg.synthetic_num_examples)
        if global_batch_size > self.num_examples:
            raise ValueError(f"batch size {global_batch_size} is larger than "
                             f"data.synthetic_num_examples={self.num_examples}")
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // jax.process_count()  # per host, as TrainIterator
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        g, l, nl = int(data_cfg.global_crop_size), int(data_cfg.local_crop_size), int(data_cfg.num_local_crops)
        b = self.global_batch_size
        self.step = int(state["position"]) // self.global_batch_size if state else int(start_step)
        self._key = jax.random.PRNGKey(int(seed))

        def draw(key, step):  # the key as an argument: a captured array would be read at lowering
            k_g, k_l = jax.random.split(jax.random.fold_in(key, step))
            batch = {"global_crops": _uniform_8bit(k_g, (b, 2, g, g, 3))}
            if nl > 0:
                batch["local_crops"] = _uniform_8bit(k_l, (b, nl, l, l, 3))
            return batch

        self._draw = jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._draw(self._key, self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """Where the next batch starts, in ``TrainIterator``'s format (global position)."""
        return {"position": self.step * self.global_batch_size, "skipped": 0}

"""The on-device synthetic source (dino_jax/data/synthetic.py): shapes, value law,
and batch k a function of (seed, k) only."""
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax import sharding
from dino_jax.data import synthetic


def _iterator(seed=0, start_step=0):
    d = ml_collections.ConfigDict(dict(synthetic_num_examples=1000, global_crop_size=16,
                                       local_crop_size=8, num_local_crops=3))
    return synthetic.SyntheticIterator(d, 32, seed, sharding.make_mesh(1), start_step=start_step)


def test_synthetic_batches_are_uniform_8bit_levels_and_reproducible():
    it = _iterator()
    b0, b1 = next(it), next(it)
    assert b0["global_crops"].shape == (32, 2, 16, 16, 3) and b0["local_crops"].shape == (32, 3, 8, 8, 3)
    assert all(v.dtype == jnp.float32 for v in b0.values())
    x = np.concatenate([np.asarray(v).ravel() for v in b0.values()])
    # 256 evenly spaced levels over [-2, 2], each drawn with probability 1/256
    levels = np.round((x + 2.0) * 255.0 / 4.0)
    np.testing.assert_allclose(x, levels * 4.0 / 255.0 - 2.0, atol=1e-6)
    counts = np.bincount(levels.astype(int), minlength=256)
    assert counts.size == 256 and counts.min() > 0
    expected = x.size / 256
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 400, chi2  # 255 degrees of freedom: p ~ 1e-8 at 400
    assert abs(x.mean()) < 0.02 and abs(x.std() - 4.0 / 255.0 * np.sqrt((256 ** 2 - 1) / 12)) < 0.02
    # a resumed iterator (start_step=1) yields batch 1 again; another step or seed differs
    again = next(_iterator(start_step=1))
    for k in b1:
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(b1[k]))
    assert not np.array_equal(np.asarray(b0["global_crops"]), np.asarray(b1["global_crops"]))
    assert not np.array_equal(np.asarray(next(_iterator(seed=1))["global_crops"]), np.asarray(b0["global_crops"]))

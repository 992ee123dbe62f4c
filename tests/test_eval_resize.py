"""Every resize on an evaluation's hot path, built at the size real data has and
checked against its reference: DAVIS's frame resize (cv2 bilinear, 854x480 ->
832x480), its label upsampling (PyTorch bilinear by the patch size, patch 16 and
8) and retrieval's multiscale rescale (PyTorch bilinear at 1/sqrt(2) and 1/2 of
a 512 px image). Each must also finish within a generous bound: the naive
three-operand contraction these replaced took minutes per image at these sizes,
the separable forms take milliseconds, so the bound catches a return of the
naive form without being a timing test.
"""
import time

import numpy as np
import torch

from dino_jax.eval import retrieval, video_segmentation

BOUND_S = 10.0  # generous: each call below takes well under a second on one busy core


def _timed(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def _torch_bilinear(x_chw: np.ndarray, scale: float) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x_chw, np.float32))[None]
    return torch.nn.functional.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False,
                                           recompute_scale_factor=False)[0].numpy()


def test_davis_frame_resize_matches_the_dense_reference_at_480p():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (480, 854, 3), dtype=np.uint8)
    th, tw = video_segmentation.target_size(480, 854, 480)
    assert (th, tw) == (480, 832)
    got, secs = _timed(video_segmentation.resize_linear, img, th, tw)
    assert secs < BOUND_S, secs
    # Reference: the dense (out, in) cv2 weights of each axis applied as matrix products.
    mh = video_segmentation._linear_matrix(480, th)
    mw = video_segmentation._linear_matrix(854, tw)
    ref = np.tensordot(mh, img.astype(np.float64), axes=(1, 0))
    ref = np.tensordot(ref, mw, axes=(1, 1)).transpose(0, 2, 1)
    ref = np.clip(np.round(ref), 0, 255).astype(np.uint8)
    assert got.shape == (480, 832, 3)
    # Equal up to a level where float rounding of an exact .5 goes the other way.
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert (got != ref).mean() < 1e-4


def test_davis_frame_resize_matches_the_original_contraction_on_both_axes():
    """A portrait frame resized on both axes against the three-operand form (small, so
    the naive contraction is quick)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
    got = video_segmentation.resize_linear(img, 40, 33)
    x = np.einsum("ia,jb,abc->ijc", video_segmentation._linear_matrix(61, 40),
                  video_segmentation._linear_matrix(47, 33), img.astype(np.float64))
    ref = np.clip(np.round(x), 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert (got != ref).mean() < 1e-2


def test_davis_label_upsampling_matches_pytorch_at_480p():
    rng = np.random.default_rng(2)
    for patch in (16, 8):
        seg = rng.uniform(0, 1, (4, 480 // patch, 832 // patch)).astype(np.float32)
        got, secs = _timed(video_segmentation.upsample_labels, seg, patch)
        assert secs < BOUND_S, (patch, secs)
        ref = _torch_bilinear(seg, patch)
        assert got.shape == ref.shape == (4, 480, 832)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_retrieval_multiscale_rescale_matches_pytorch_at_512():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(384, 512, 3)).astype(np.float32)
    assert retrieval.rescale(x, 1.0) is x
    for s in retrieval.SCALES[1:]:
        got, secs = _timed(retrieval.rescale, x, s)
        assert secs < BOUND_S, (s, secs)
        ref = _torch_bilinear(x.transpose(2, 0, 1), s).transpose(1, 2, 0)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        # The interpolation weights are float32 (PyTorch's come from its own float32 source
        # coordinates): up to ~2e-4 on values of unit scale.
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)


def test_davis_kth_largest_equals_top_k():
    """DAVIS's per-target k-th largest affinity (k passes of max-and-remove) equals
    ``top_k``'s k-th value, duplicates and zeros included, at the real 480p shape."""
    import jax

    rng = np.random.default_rng(4)
    a = rng.random((1560, 8 * 1560)).astype(np.float32)
    a[rng.random(a.shape) < 0.9] = 0.0        # masked-out neighbours and empty queue slots
    a[3, :7] = 0.5                             # ties at the top
    a[5, :] = 0.0                              # a target with no source left
    for k in (1, 5, 20):
        got = np.asarray(jax.jit(video_segmentation.kth_largest, static_argnums=1)(a, k))
        np.testing.assert_array_equal(got, np.asarray(jax.lax.top_k(a, k)[0][:, -1]))

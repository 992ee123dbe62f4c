"""Discovery of the official-code fixtures (see tests/fixtures/official/README.md).

Every ``*.json`` in the folder is one case; ``kind`` says which test reads it.
``DINO_JAX_OFFICIAL_FIXTURES=/dir`` replaces the folder, so other sets of the
same schema run through the same tests unchanged.
"""
import glob
import json
import os

import numpy as np
import pytest

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "official")


def fixture_dir() -> str:
    return os.environ.get("DINO_JAX_OFFICIAL_FIXTURES", DEFAULT_DIR)


def cases(kind: str):
    """pytest params, one per fixture of ``kind``, with the file name as id."""
    out = []
    for path in sorted(glob.glob(os.path.join(fixture_dir(), "*.json"))):
        with open(path) as f:
            meta = json.load(f)
        if meta.get("kind") == kind:
            name = os.path.splitext(os.path.basename(path))[0]
            out.append(pytest.param(name, id=name))
    if not out:
        raise RuntimeError(f"no '{kind}' fixtures in {fixture_dir()}: the parity tests need them")
    return out


def load(name: str):
    """(meta dict, {array name: np.ndarray})."""
    base = os.path.join(fixture_dir(), name)
    with open(base + ".json") as f:
        meta = json.load(f)
    with np.load(base + ".npz") as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    return meta, arrays


def group(arrays, prefix: str) -> dict:
    """{name without prefix: array} for names under ``prefix``."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e| (scale-aware; robust to near-zero entries)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def state_rel_err(path, a, b, embed_dim):
    """max |a - b| / max |b|, without the key part of attn/qkv/bias (in the
    parameters and both Adam moments): its gradient is exactly 0 mathematically
    (a shift of every key adds a constant to each softmax row), so what lands
    there is rounding residue that Adam's g / (|g| + eps) amplifies; it depends
    on the summation order and is not a property of the step (see
    test_train_step.py for the same exemption against the official numbers)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keys = jax.tree_util.keystr(path)
    if keys.endswith("['attn']['qkv']['bias']") and a.ndim == 1:
        keep = np.ones(a.shape, bool)
        keep[embed_dim:2 * embed_dim] = False
        a, b = a[keep], b[keep]
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

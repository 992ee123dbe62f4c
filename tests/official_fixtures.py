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

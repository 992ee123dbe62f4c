"""Checkpoints: params dirs (export/convert) and the training CheckpointManager.

A *params dir* is what ``convert torch2jax`` and ``export`` write and what the
evaluation tools read::

    DIR/model_config.json   {"model": {...ViT fields, "arch"}, "head": {...} | null, ...}
    DIR/params/             Orbax (StandardCheckpointer) of {"backbone": ..., ["head": ...]}

The Orbax tree holds only nested dicts of float32 arrays, so plain
``orbax.checkpoint.StandardCheckpointer().restore(DIR + "/params")`` reads it
without this package.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

MODEL_CONFIG = "model_config.json"
PARAMS = "params"


class CheckpointError(ValueError):
    """One-line, user-facing checkpoint problem."""


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415 - slow import, only when used

    return ocp


def save_params_dir(out_dir: str, params: dict, model_cfg: dict, head_cfg: dict | None = None,
                    overwrite: bool = False, **extra) -> None:
    """Write a params dir atomically (temp folder beside it, then rename)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        tree = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        ckptr = _ocp().StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS), tree)
        ckptr.wait_until_finished()
        meta = {"model": model_cfg, "head": head_cfg, **extra}
        with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def is_params_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(os.path.join(path, PARAMS))


def load_params_dir(path: str):
    """(params, model_cfg, head_cfg) from a params dir."""
    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    if not is_params_dir(path):
        raise CheckpointError(f"{path} is not a params dir (expected {MODEL_CONFIG} and {PARAMS}/)")
    with open(os.path.join(path, MODEL_CONFIG)) as f:
        meta = json.load(f)
    try:
        params = _ocp().StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot restore {path}/{PARAMS}: {str(e).splitlines()[0]}") from e
    return params, meta["model"], meta.get("head")


def load_backbone(path: str, dtype=None):
    """(VisionTransformer, backbone params) from a params dir (convert/export) or a
    training workdir (the teacher backbone of its latest complete checkpoint)."""
    from dino_jax.models import vit  # noqa: PLC0415

    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    if is_params_dir(path):
        params, model_cfg, _ = load_params_dir(path)
        backbone = params["backbone"]
    else:
        backbone, model_cfg = load_teacher_backbone_from_workdir(path)
    overrides = {"dtype": dtype} if dtype is not None else {}
    return vit.build_backbone(model_cfg, **overrides), backbone

"""Warm start (``--config.init_from=PATH``): begin a run from existing weights.

PATH may be
  * an official ``.pth`` (or ``.npz`` with the same names): a release backbone file
    (``dino_deitsmall16_pretrain.pth``) or a full training checkpoint
    (``checkpoint.pth`` / ``*_full_checkpoint.pth``: ``student``, ``teacher`` with
    ``module.``/``backbone.``/``head.`` names, and ``dino_loss`` with the center);
  * a dino_jax params dir (``convert torch2jax`` / ``export``): backbone, and the
    head when it has one;
  * another run's workdir: student, teacher and center of its latest checkpoint.

What the file has is loaded, the rest keeps the fresh initialisation: with a
backbone only, student and teacher start from that backbone with a fresh head
(teacher head = student head, as at any start); with a full checkpoint, student,
teacher, both heads and the center are loaded. The optimiser state, step and
schedules always start afresh (it is a new run, not a resume; resuming the run's
own checkpoint in ``--workdir`` wins over ``init_from``). The architecture must
be the config's: any difference is refused with one line naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax
import numpy as np

from dino_jax import checkpoint, paths, torch_weights


class WarmStartError(ValueError):
    """``init_from`` that cannot be used: one line for the user."""


@dataclass
class InitWeights:
    """Weights read from ``init_from``: params trees {'backbone', ['head']} as numpy."""
    source: str
    kind: str                            # 'official backbone', 'official training checkpoint', ...
    student: dict
    teacher: dict | None = None          # None: teacher = student (the official start)
    center: np.ndarray | None = None
    model_cfgs: list = field(default_factory=list)  # (what, backbone cfg, head cfg or None)


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------
def _from_official(path: str, num_heads: int) -> InitWeights:
    raw = torch_weights.read_state_dict(path)
    nets = [k for k in ("student", "teacher") if isinstance(raw.get(k), dict)]
    cfgs = []

    def net(key):
        sd = torch_weights.select_state_dict(raw, key)
        params, model_cfg, head_cfg = torch_weights.torch_to_flax(sd, num_heads=_heads(sd, num_heads))
        cfgs.append((key or "backbone", model_cfg, head_cfg))
        return params

    if nets:  # official training checkpoint
        missing = {"student", "teacher"} - set(nets)
        if missing:
            raise WarmStartError(f"{path} has {', '.join(nets)} but no {', '.join(sorted(missing))}")
        student, teacher = net("student"), net("teacher")
        loss_state = raw.get("dino_loss")
        center = None
        if isinstance(loss_state, dict) and isinstance(loss_state.get("center"), np.ndarray):
            center = np.asarray(loss_state["center"], np.float32)
        return InitWeights(path, "official training checkpoint", student, teacher, center, cfgs)
    params = net(None)
    kind = "official backbone + head state dict" if "head" in params else "official backbone file"
    return InitWeights(path, kind, params, model_cfgs=cfgs)


def _heads(sd: dict, num_heads: int) -> int:
    """The head count to read ``sd`` with (shapes do not show it): the config's when
    the width is divisible by it, else 1, so that a different width reaches the
    architecture check and its one-line message instead of a conversion error."""
    w = sd.get("patch_embed.proj.weight")
    return num_heads if w is not None and w.shape[0] % num_heads == 0 else 1


def _from_params_dir(path: str) -> InitWeights:
    params, model_cfg, head_cfg = checkpoint.load_params_dir(path)
    if "backbone" not in params:
        raise WarmStartError(f"{path} holds no backbone params")
    params = jax.tree.map(np.asarray, params)
    return InitWeights(path, "dino_jax params dir", params,
                       model_cfgs=[("backbone", model_cfg, head_cfg if "head" in params else None)])


def _from_workdir(path: str) -> InitWeights:
    ckpt = checkpoint.TrainCheckpointer(path, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise WarmStartError(f"{path} has no complete checkpoint")
        try:
            tree, meta = ckpt.restore(step, host=True)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint of the other run
            raise WarmStartError(f"cannot restore step {step} of {path}: "
                                 f"{str(e).strip().splitlines()[0][:300]}") from e
    finally:
        ckpt.close()
    cfgs = [("student", meta["model_config"], meta.get("head_config"))]
    return InitWeights(f"{path} (step {step})", "dino_jax training workdir", tree["student"],
                       tree["teacher"], np.asarray(tree["center"], np.float32), cfgs)


def read_init_weights(path: str, num_heads: int) -> InitWeights:
    """What ``path`` holds (see the module doc). ``num_heads``: the config's, since
    the head count is not in the tensor shapes."""
    try:
        paths.check_bucket(path)
    except paths.PathError as e:
        raise WarmStartError(f"init_from {path}: {e}") from e
    if not paths.exists(path):
        raise WarmStartError(f"init_from {path} does not exist")
    try:
        if paths.isdir(path):
            if checkpoint.is_params_dir(path):
                return _from_params_dir(path)
            if paths.isdir(paths.join(path, checkpoint.CHECKPOINTS)):
                return _from_workdir(path)
            raise WarmStartError(f"init_from {path} is a directory but neither a params dir "
                                 f"({checkpoint.MODEL_CONFIG} + {checkpoint.PARAMS}/) nor a training "
                                 f"workdir ({checkpoint.CHECKPOINTS}/)")
        return _from_official(path, num_heads)
    except (torch_weights.ConversionError, checkpoint.CheckpointError) as e:
        raise WarmStartError(f"init_from {path}: {e}") from e


# --------------------------------------------------------------------------
# Checking and applying.
# --------------------------------------------------------------------------
_ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "img_size")
_HEAD_FIELDS = ("out_dim", "nlayers", "hidden_dim", "bottleneck_dim")


def _describe(cfg: dict, fields) -> str:
    return " ".join(f"{k}={cfg[k]}" for k in fields if k in cfg)


def check_architecture(init: InitWeights, model_cfg: dict, head_cfg: dict) -> None:
    """One-line WarmStartError when what ``init`` holds is not the config's model."""
    for what, m, h in init.model_cfgs:
        diff = [k for k in _ARCH_FIELDS if k in m and k in model_cfg and m[k] != model_cfg[k]]
        if diff:
            raise WarmStartError(
                f"init_from {init.source} is a different backbone than the config: {what} has "
                f"{_describe(m, diff)}, the config {_describe(model_cfg, diff)}")
        if h is not None:
            diff = [k for k in _HEAD_FIELDS if k in h and h[k] != head_cfg[k]
                    and not (k == "hidden_dim" and h["nlayers"] == 1)]
            if diff:
                raise WarmStartError(
                    f"init_from {init.source} has a different head than the config: {what} has "
                    f"{_describe(h, diff)}, the config {_describe(head_cfg, diff)}")


def _fit(loaded: dict, target: dict, what: str, source: str):
    """``loaded`` (numpy) laid out like ``target`` (same tree, shapes, shardings)."""
    t_paths = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
    l_paths = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
    if t_paths.keys() != l_paths.keys():
        extra = sorted(set(l_paths) - set(t_paths))[:3]
        missing = sorted(set(t_paths) - set(l_paths))[:3]
        raise WarmStartError(f"init_from {source}: the {what} params do not fit the config's model "
                             f"(missing {missing}, unexpected {extra})")
    for k, t in t_paths.items():
        if tuple(np.shape(l_paths[k])) != tuple(t.shape):
            raise WarmStartError(f"init_from {source}: {what}{k} has shape {tuple(np.shape(l_paths[k]))}, "
                                 f"the config's model {tuple(t.shape)}")
    return jax.tree.map(checkpoint.to_global_array, target, loaded)


def apply(state, init: InitWeights):
    """``state`` (a fresh TrainState) with ``init``'s weights; returns (state, log line).

    The fresh optimiser state (step counts and AdamW moments at zero) does not depend
    on the parameter values, so it is kept as is."""
    src = init.source
    has_head = "head" in init.student
    teacher_src = init.teacher if init.teacher is not None else init.student  # official start: t = s

    def net(params, target, who):
        out = {"backbone": _fit(params["backbone"], target["backbone"], f"{who} backbone", src)}
        out["head"] = (_fit(params["head"], target["head"], f"{who} head", src) if "head" in params
                       else target["head"])  # fresh head (the fresh teacher head = student head)
        return out

    student = net(init.student, state.student, "student")
    teacher = net(teacher_src, state.teacher, "teacher")
    center = state.center
    if init.center is not None:
        if init.center.size != np.size(state.center):
            raise WarmStartError(f"init_from {src}: the center has {init.center.size} entries, "
                                 f"the config's head {np.size(state.center)} (model.out_dim)")
        center = _fit(init.center.reshape(np.shape(state.center)), state.center, "center", src)
    state = state.replace(student=student, teacher=teacher, center=center)
    loaded = ["student backbone"] + (["student head"] if has_head else [])
    if init.teacher is not None:
        loaded += ["teacher backbone"] + (["teacher head"] if "head" in init.teacher else [])
    else:
        loaded += ["teacher = student"]
    if init.center is not None:
        loaded.append("center")
    fresh = ([] if has_head else ["head (student and teacher)"]) + \
        ([] if init.center is not None else ["center (zeros)"]) + ["optimiser state", "step 0"]
    msg = (f"warm start from {init.source} ({init.kind}): loaded {', '.join(loaded)}; "
           f"initialised {', '.join(fresh)}")
    return state, msg


def warm_start(state, config, model_cfg: dict, head_cfg: dict):
    """(state, log line) with ``config.init_from``'s weights (see the module doc)."""
    init = read_init_weights(str(config.init_from), num_heads=int(model_cfg["num_heads"]))
    check_architecture(init, model_cfg, head_cfg)
    return apply(state, init)

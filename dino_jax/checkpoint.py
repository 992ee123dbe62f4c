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
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback

import jax
import numpy as np

from dino_jax import paths

MODEL_CONFIG = "model_config.json"
PARAMS = "params"


class CheckpointError(ValueError):
    """One-line, user-facing checkpoint problem."""


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415 - slow import, only when used

    return ocp


def save_params_dir(out_dir: str, params: dict, model_cfg: dict, head_cfg: dict | None = None,
                    overwrite: bool = False, **extra) -> None:
    """Write a params dir atomically (temp folder beside it, then rename); on an object
    store (no rename) in place, ``model_config.json`` last, so that a half-written dir
    is not a params dir (:func:`is_params_dir`)."""
    out_dir = paths.abspath(out_dir)
    if paths.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} exists (pass --overwrite to replace it)")
    if paths.is_remote(out_dir):
        paths.check_bucket(out_dir)
        if paths.exists(out_dir):
            paths.rmtree(out_dir)
        tree = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        ckptr = _ocp().StandardCheckpointer()
        ckptr.save(paths.join(out_dir, PARAMS), tree)
        ckptr.wait_until_finished()
        paths.write_text(paths.join(out_dir, MODEL_CONFIG),
                         json.dumps({"model": model_cfg, "head": head_cfg, **extra}, indent=1, sort_keys=True))
        return
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
    return paths.isfile(paths.join(path, MODEL_CONFIG)) and paths.isdir(paths.join(path, PARAMS))


def load_params_dir(path: str):
    """(params, model_cfg, head_cfg) from a params dir."""
    paths.check_bucket(path)
    if not paths.exists(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    if not is_params_dir(path):
        raise CheckpointError(f"{path} is not a params dir (expected {MODEL_CONFIG} and {PARAMS}/)")
    meta = json.loads(paths.read_text(paths.join(path, MODEL_CONFIG)))
    try:
        params = _ocp().StandardCheckpointer().restore(paths.join(paths.abspath(path), PARAMS))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot restore {path}/{PARAMS}: {str(e).splitlines()[0]}") from e
    return params, meta["model"], meta.get("head")


def load_backbone(path: str, dtype=None):
    """(VisionTransformer, backbone params) from a params dir (convert/export) or a
    training workdir (the teacher backbone of its latest complete checkpoint)."""
    from dino_jax.models import vit  # noqa: PLC0415

    paths.check_bucket(path)
    if not paths.exists(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    if is_params_dir(path):
        params, model_cfg, _ = load_params_dir(path)
        if "backbone" not in params:
            raise CheckpointError(f"{path} holds no 'backbone' params (found: {', '.join(sorted(params))})")
        backbone = params["backbone"]
    else:
        backbone, model_cfg = load_teacher_backbone_from_workdir(path)
    overrides = {"dtype": dtype} if dtype is not None else {}
    return vit.build_backbone(model_cfg, **overrides), backbone


# --------------------------------------------------------------------------
# Training checkpoints: WORKDIR/checkpoints/<step>/{state,meta}.
# --------------------------------------------------------------------------
CHECKPOINTS = "checkpoints"


def _is_prng_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_to_tree(state):
    """A TrainState (flax struct) as nested dicts of arrays; typed PRNG keys as raw key data."""
    from flax import serialization  # noqa: PLC0415

    tree = serialization.to_state_dict(state)
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_prng_key(x) else x, tree)


def tree_to_state(target, tree):
    """Inverse of :func:`state_to_tree` onto ``target``'s structure (and key types)."""
    from flax import serialization  # noqa: PLC0415

    target_tree = serialization.to_state_dict(target)
    tree = jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_prng_key(t) else x,
        target_tree, tree)
    return serialization.from_state_dict(target, tree)


def abstract_tree(tree):
    """ShapeDtypeStructs (with shardings) describing ``tree``: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _unreadable_reason(err: Exception) -> str:
    """A short, file-name-safe reason from a restore error: the TensorStore status
    (``OUT_OF_RANGE``, ``DATA_LOSS``, ``NOT_FOUND``...) when there is one, else the type."""
    first = (str(err).strip().splitlines() or [""])[0]
    m = re.match(r"([A-Z][A-Z_]{2,})\b", first)
    return m.group(1) if m else type(err).__name__


_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _SetAsideReadNoise(logging.Filter):
    """Silences what the unfinished reads of a damaged, set-aside step print later.

    A restore stops at its first failed read; Orbax's event loop then closes while
    TensorStore still runs the step's other reads. When they end, each either fails
    with nobody awaiting it (asyncio logs "... exception was never retrieved" with a
    traceback) or calls back into the closed loop (``RuntimeError: Event loop is
    closed`` through ``sys.unraisablehook``): hundreds of tracebacks after the one
    line that reported the step (some arrive before the restore call returns). As a
    filter on the ``asyncio`` logger this drops those records whose error names a
    step folder being verified or set aside; as the unraisable hook (installed when
    the first step is verified) it drops the closed-loop callbacks and passes
    everything else to the hook it replaced."""

    def __init__(self):
        super().__init__()
        self.step_dirs: set[str] = set()
        self._previous_hook = None

    def watch(self, step_dir: str):
        self.step_dirs.add(step_dir.rstrip(os.sep) + os.sep)
        asyncio_logger = logging.getLogger("asyncio")
        if self not in asyncio_logger.filters:
            asyncio_logger.addFilter(self)
        if getattr(sys.unraisablehook, "__self__", None) is not self:
            self._previous_hook = sys.unraisablehook
            sys.unraisablehook = self.unraisable_hook

    def unwatch(self, step_dir: str):
        self.step_dirs.discard(step_dir.rstrip(os.sep) + os.sep)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and record.exc_info[1] is not None
                and record.getMessage().startswith(_NEVER_RETRIEVED)):
            return True
        text = str(record.exc_info[1])
        return not any(d in text for d in self.step_dirs)

    def unraisable_hook(self, unraisable):
        err = unraisable.exc_value
        if (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
                and any(f.name == "call_soon_threadsafe"
                        for f in traceback.extract_tb(unraisable.exc_traceback))):
            return
        (self._previous_hook or sys.__unraisablehook__)(unraisable)


_SET_ASIDE_READ_NOISE = _SetAsideReadNoise()


class TrainCheckpointer:
    """Orbax CheckpointManager for training: async saves, the last ``keep`` plus every
    step multiple of ``keep_every``. Orbax writes each step to a temporary folder and
    renames it when complete, so ``latest_step`` never sees a half-written checkpoint.
    A complete step can still be damaged later (truncated files, a full disk, bit rot):
    :meth:`latest_readable_step` finds the newest step that restores and sets the
    others aside."""

    def __init__(self, workdir: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        ocp = _ocp()
        paths.check_bucket(workdir)
        self.directory = paths.join(paths.abspath(workdir), CHECKPOINTS)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1), keep_period=int(keep_every) or None,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._verified = None  # (step, host tree, meta) read by latest_readable_step

    def latest_readable_step(self, log=print):
        """The newest step whose state and meta restore, or None.

        Each newer step that fails to restore is reported in one line (``log``),
        renamed aside to ``<step>.unreadable-<REASON>`` (never deleted; Orbax
        ignores the name) and the next older one is tried; with none left, one line
        says so and None is returned (the run starts afresh). The arrays read here
        are kept on the host, so the following :meth:`restore` of that step does
        not read the files again."""
        from absl import logging as absl_logging  # noqa: PLC0415 - Orbax logs through absl

        steps = sorted(self.manager.all_steps(), reverse=True)
        aside = []
        for step in steps:
            verbosity = absl_logging.get_verbosity()
            absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's warnings about the damage
            step_dir = paths.join(self.directory, str(int(step)))
            _SET_ASIDE_READ_NOISE.watch(step_dir)
            try:
                host, meta = self.restore(step, host=True)
            except Exception as e:  # noqa: BLE001 - any damage: TensorStore, JSON, missing files
                new = self._set_aside(step, _unreadable_reason(e))
                aside.append(step)
                why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" [tensorstore_spec=")[0]
                log(f"checkpoint step {step} in {self.directory} is unreadable "
                    f"({why[:400] + ('...' if len(why) > 400 else '')}): moved to {paths.basename(new)}")
                continue
            finally:
                absl_logging.set_verbosity(verbosity)
            _SET_ASIDE_READ_NOISE.unwatch(step_dir)
            self._verified = (step, host, meta)
            return step
        if aside:
            log(f"no readable checkpoint left in {self.directory} (steps {', '.join(map(str, aside))} "
                f"set aside as *.unreadable-*): starting from step 0")
        return None

    def _set_aside(self, step: int, reason: str) -> str:
        """Move step ``step`` to ``<step>.unreadable-<reason>``: a rename on disk; on an
        object store (no rename) a copy, then the deletion of the original, its commit
        marker first (:func:`paths.move_tree`)."""
        src = paths.join(self.directory, str(int(step)))
        dst = paths.join(self.directory, f"{int(step)}.unreadable-{reason}")
        n = 1
        while paths.exists(dst + (f".{n}" if n > 1 else "")):
            n += 1
        dst += f".{n}" if n > 1 else ""
        if jax.process_index() == 0 and paths.exists(src):
            paths.move_tree(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"dino_jax_set_aside_{step}")
        self.manager.reload()
        return dst

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state_tree, meta: dict) -> bool:
        """Start saving (asynchronously); False when ``step`` is already saved."""
        ocp = _ocp()
        if step in self.manager.all_steps():
            return False
        return bool(self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta)), force=True))

    def local_target(self, step: int):
        """Restore target placing every array on this process's first device: reads a
        checkpoint whatever topology (hosts, devices, fsdp) wrote it."""
        ocp = _ocp()
        md = ocp.StandardCheckpointer().metadata(paths.join(self.directory, str(int(step)), "state"))
        tree = getattr(md, "item_metadata", md)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), tree)

    def restore(self, step: int, target_tree=None, host: bool = False):
        """(state tree, meta) of ``step``; with ``target_tree`` arrays get its shardings,
        otherwise they land on this process's first device (``host``: numpy arrays)."""
        ocp = _ocp()
        if self._verified is not None and self._verified[0] == int(step) and not host:
            _, tree, meta = self._verified
            self._verified = None
            if target_tree is None:
                return tree, meta
            try:
                return jax.tree.map(to_global_array, target_tree, tree), meta
            except (ValueError, TypeError):  # structures differ: let Orbax map it from the files
                pass
        if host:
            target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), self.local_target(step))
        else:
            target = abstract_tree(target_tree) if target_tree is not None else self.local_target(step)
        restore = ocp.args.StandardRestore(target)
        out = self.manager.restore(int(step), args=ocp.args.Composite(state=restore, meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        """The JSON meta of ``step`` alone (cheap: no arrays are read)."""
        ocp = _ocp()
        return self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def to_global_array(target, host_value):
    """``host_value`` (numpy) as a global array laid out like ``target`` (multi-host safe)."""
    value = np.asarray(host_value, dtype=target.dtype)
    if value.shape != tuple(target.shape):
        raise ValueError(f"shape {value.shape} != {tuple(target.shape)}")
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def load_teacher_backbone_from_workdir(workdir: str, step: int | None = None):
    """(teacher backbone params as numpy, model_cfg) of checkpoint ``step`` (default: the
    latest complete one)."""
    paths.check_bucket(workdir)
    ckpt_dir = paths.join(paths.abspath(workdir), CHECKPOINTS)
    if not paths.isdir(ckpt_dir):
        raise CheckpointError(f"{workdir} is neither a params dir nor a training workdir "
                              f"(no {CHECKPOINTS}/ and no {MODEL_CONFIG})")
    ckpt = TrainCheckpointer(workdir, async_save=False)
    try:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise CheckpointError(f"{workdir} has no complete checkpoint")
        elif step not in ckpt.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {workdir}; available: {ckpt.all_steps()}")
        tree, meta = ckpt.restore(step)
    finally:
        ckpt.close()
    teacher = tree.get("teacher_params", tree.get("teacher"))
    if teacher is None or "backbone" not in teacher:
        raise CheckpointError(f"checkpoint {step} in {workdir} holds no teacher backbone")
    return jax.tree.map(np.asarray, teacher["backbone"]), meta["model_config"]

"""The evaluator protocol (big_vision's): every evaluation is an object with

    every_epochs                     -1 off, 0 at the end of training only, N every N epochs
    run(backbone, params) -> {name: float}

``backbone`` is the Flax ``VisionTransformer`` module (its ``__call__`` is the CLS
feature; :func:`dino_jax.eval.features.forward` gives every other output from it) and
``params`` its parameters: the teacher's backbone during training, a loaded checkpoint
in the ``python -m dino_jax.eval.*`` programs. :mod:`dino_jax.eval.periodic` builds the
evaluators from ``config.evals``; the programs build the same classes from their flags.

Several hosts: an evaluator whose ``process0_only`` is False (k-NN, the linear probe)
runs on every process, each reading its shard of the data over the global mesh, and
writes files from process 0 only. One whose ``process0_only`` is True (retrieval, copy
detection, video segmentation: per-image programs that read every image) runs on
process 0 alone, on its own devices with a host copy of the params; the other processes
wait and receive its numbers, so no file is written twice.
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dino_jax.eval.common import EvalError, error_line


class Evaluator:
    """Base class: subclasses set ``name`` and implement :meth:`run`."""
    name = ""
    process0_only = False

    def __init__(self, every_epochs: int = 0):
        self.every_epochs = int(every_epochs)

    def run(self, backbone, params) -> dict:
        raise NotImplementedError


class FunctionEvaluator(Evaluator):
    """An evaluation given as a function ``evaluate(backbone, params, progress=..., **settings)``
    returning named numbers (retrieval, copy detection, video segmentation); it runs on
    process 0 alone when there are several."""
    process0_only = True

    def __init__(self, name: str, evaluate, settings: dict, every_epochs: int = 0, progress=None):
        super().__init__(every_epochs)
        self.name, self.evaluate, self.settings, self.progress = name, evaluate, dict(settings), progress

    def run(self, backbone, params) -> dict:
        res = self.evaluate(backbone, params, progress=self.progress, **self.settings)
        return {k: float(v) for k, v in res.items()}


def is_due(every_epochs: int, epochs_done: int | None) -> bool:
    """Whether an evaluator runs after ``epochs_done`` epochs (``None``: the end of training)."""
    if every_epochs < 0:
        return False
    if epochs_done is None:
        return True
    return every_epochs > 0 and epochs_done % every_epochs == 0


def host_params(params):
    """The params as host numpy arrays on every process (a collective: every process calls
    it), so one process can run a program of its own devices with them."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(params))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def _broadcast_json(obj) -> dict:
    """``obj`` (process 0's) on every process, as JSON bytes (the others pass anything)."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(n, np.uint8)
    buf[:len(data)] = data[:n]
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def run_evaluator(ev: Evaluator, backbone, params) -> dict:
    """``ev.run(backbone, params)``, on process 0 alone for a ``process0_only`` evaluator
    when there are several processes (the others receive its numbers, or its error)."""
    if not ev.process0_only or jax.process_count() == 1:
        return ev.run(backbone, params)
    local = host_params(params)
    msg, failure = {}, None
    if jax.process_index() == 0:
        try:
            msg = {"result": ev.run(backbone, local)}
        except Exception as e:  # noqa: BLE001  (told to the other processes, then re-raised)
            failure, msg = e, {"error": error_line(e)}
    msg = _broadcast_json(msg)
    if failure is not None:
        raise failure
    if "error" in msg:
        raise EvalError(f"{ev.name} on process 0: {msg['error']}")
    return msg["result"]


def run_due(evaluators: dict, backbone, params, epochs_done: int | None, progress=None, exclude=()) -> dict:
    """Run the evaluators due after ``epochs_done`` epochs (``None``: the end of training);
    their numbers merged into one flat dict, one progress line per evaluator."""
    out = {}
    for name, ev in evaluators.items():
        if name in exclude or not is_due(ev.every_epochs, epochs_done):
            continue
        t0 = time.time()
        res = run_evaluator(ev, backbone, params)
        if progress:
            progress(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items())
                     + f" ({time.time() - t0:.0f}s)")
        out.update(res)
    return out

"""The DINO training loop: :func:`train_and_evaluate` and what feeds it.

One flat loop, ``for step in range(start, total)``, with periodic actions at its
sync points (log steps, epoch ends, checkpoint steps, the end): fetch the
on-device metrics, stop on a non-finite loss, log, evaluate, checkpoint, agree on
pre-emption. Between sync points the loop never waits for the devices: batches
arrive through a :class:`DevicePrefetcher` and the step keeps its metrics in an
on-device accumulator. Beside it: the distributed set-up
(:func:`initialize_distributed`) and the pre-emption flag (:class:`PreemptionFlag`).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from dino_jax import checkpoint, paths, schedules, sharding, train, warm_start
from dino_jax.data import synthetic
from dino_jax.eval import periodic
from dino_jax.metrics_log import TrainLogger, format_duration
from dino_jax.models import vit


class TrainingError(RuntimeError):
    """A run that must stop with one clear line (non-finite loss, bad config...)."""


# --------------------------------------------------------------------------
# Distributed set-up.
# --------------------------------------------------------------------------
def _multi_host_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")  # TPU pod slice with several hosts


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """``jax.distributed.initialize`` when running on several hosts (no-op otherwise)."""
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _multi_host_environment():
        jax.distributed.initialize()


# --------------------------------------------------------------------------
# Pre-emption.
# --------------------------------------------------------------------------
class PreemptionFlag:
    """Set by SIGTERM (and SIGINT): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self) -> bool:
        """True on every host once any host was asked to stop (a collective on several hosts)."""
        if jax.process_count() == 1:
            return self.requested
        flags_all = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.asarray(flags_all).any())


# --------------------------------------------------------------------------
# Feeding the devices.
# --------------------------------------------------------------------------
class DevicePrefetcher:
    """Batches on their way to the devices while the current step runs.

    A background thread takes batches from ``iterator``, puts each on the
    devices with ``to_device`` (asynchronous host-to-device copies) and queues
    ``(device batch, iterator.get_state() after it)`` up to ``depth`` ahead, so the
    loop's ``next()`` normally finds a batch already on the devices. An
    exception in the thread (a data error) is raised by the ``next()`` that
    would have got its batch.
    """

    def __init__(self, iterator, to_device, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator, to_device),
                                        name="DevicePrefetcher", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator, to_device):
        try:
            while not self._stop.is_set():
                batch = next(iterator)
                if not self._put((to_device(batch), iterator.get_state())):
                    return
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            self._put(e)

    def next(self):
        """(global device batch, data-iterator state after it)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)


def train_iterator(config, mesh, start_step: int, data_state: dict | None):
    """(iterator, to_device): the on-device synthetic batches (no TensorFlow), or
    tf.data batches of an image source, put on the devices by ``to_device``."""
    if config.data.source == "synthetic":
        if periodic.knn_enabled(config):
            raise TrainingError("data.source 'synthetic' has no labels for k-NN: set "
                                "--config.evals.knn.every_epochs=-1")
        it = synthetic.SyntheticIterator(config.data, int(config.batch_size), int(config.seed), mesh,
                                         start_step=start_step, state=data_state)
        return it, lambda batch: batch
    # The one TensorFlow import of a training run, made only for image sources.
    from dino_jax.data import pipeline  # noqa: PLC0415

    it = pipeline.create_train_iterator(config.data, int(config.batch_size), int(config.seed),
                                        start_step=start_step, state=data_state)
    if periodic.knn_enabled(config):  # needs labels: say so now, not after training
        knn = config.evals.knn
        pipeline.check_knn_labels(config.data, it.source, (knn.train_split, knn.eval_split))
    return it, lambda batch: sharding.shard_host_batch(batch, mesh)


# --------------------------------------------------------------------------
# Set-up: a fresh, warm-started or resumed state.
# --------------------------------------------------------------------------
def model_configs(config, backbone, head) -> tuple[dict, dict]:
    """(backbone, head) configs saved in each checkpoint's metadata."""
    head_cfg = dict(out_dim=head.out_dim, norm_last_layer=head.norm_last_layer, nlayers=head.nlayers,
                    hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim)
    return vit.model_config(backbone), head_cfg


def _initial_state(config, workdir, mesh, ckpt, latest, models, optimizer, model_cfg, head_cfg):
    """(state, message or None, the starting teacher backbone for ``evals.knn.random_init`` or None).

    A fresh run starts from the model init, or from ``init_from``'s weights; a run
    with a checkpoint resumes it and reloads ``init_from`` only for the
    ``evals.knn.random_init`` baseline (the teacher the run started from).
    """
    state = train.create_train_state(config, jax.random.PRNGKey(int(config.seed)), mesh=mesh,
                                     models=models, optimizer=optimizer)
    want_start = periodic.wants_baseline(config)
    start, msg = state, None
    if config.init_from and (latest is None or want_start):
        try:
            start, msg = warm_start.warm_start(state, config, model_cfg, head_cfg)
        except warm_start.WarmStartError as e:
            if latest is None:
                raise
            start, msg = None, f"evals.knn.random_init: no baseline ({e})"  # resume wins anyway
    start_teacher = (jax.tree.map(np.asarray, start.teacher["backbone"])
                     if want_start and start is not None else None)
    if latest is None:
        return start, msg, start_teacher
    if msg and start is not None:
        msg = None  # the run resumes; init_from only gave the baseline
    tree, meta = ckpt.restore(latest, checkpoint.state_to_tree(state))
    if meta.get("model_config") != model_cfg:
        raise TrainingError(f"the checkpoint in {workdir} is a different model "
                            f"({meta.get('model_config')}) than the config ({model_cfg})")
    return checkpoint.tree_to_state(state, tree), msg, start_teacher


# --------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------
def evaluate(config, evaluators, backbone, params, logger, step: int, epochs_done: int | None,
             start_params=None) -> dict:
    """The evaluations of the teacher backbone ``params`` due after ``epochs_done``
    epochs, logged at ``step``; their numbers. ``epochs_done=None`` is the end of
    training: every evaluator, and k-NN also of ``start_params`` (the teacher the
    run started from) when given."""
    if epochs_done is not None:
        out = periodic.run_due(evaluators, backbone, params, epochs_done, logger.print)
        logger.scalars(step, out, "eval")
        return out
    out = periodic.run_final(evaluators, backbone, params, start_params,
                             "init_from" if config.init_from else "random init", logger.print)
    logger.scalars(step, {k: v for k, v in out.items() if k.startswith("knn_")}, "knn")
    logger.scalars(step, {k: v for k, v in out.items() if not k.startswith("knn_")}, "eval")
    return out


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, stream=None,
                       on_sync: Callable[[int, checkpoint.TrainCheckpointer], None] | None = None) -> dict:
    """Train (or resume) in ``workdir``, then evaluate; returns the run's summary
    (``dino_jax.main`` prints it as its last line).

    stream: where progress lines go (default stdout; process 0 only).
    on_sync: called as ``on_sync(step, checkpointer)`` when the loop starts and
      after every sync point's checkpoint, e.g. to wait for the saves in flight
      or to watch the run from outside (the steps between two calls never wait
      for the devices).
    """
    t_start = time.time()
    is_main = jax.process_index() == 0
    paths.makedirs(workdir)  # local or gs:// (one line for a missing or forbidden bucket)
    mesh = sharding.make_mesh(int(config.num_fsdp))
    sharding.check_batch_size(int(config.batch_size), mesh)
    batch_size = int(config.batch_size)

    ckpt = checkpoint.TrainCheckpointer(workdir, keep=config.keep_checkpoints,
                                        keep_every=config.keep_every_steps)
    preempt = PreemptionFlag()
    prefetch = None
    try:
        note = lambda msg: is_main and print(msg, file=stream or sys.stdout, flush=True)  # noqa: E731
        latest = ckpt.latest_readable_step(log=note)  # damaged newer steps: one line each, set aside
        start_step = int(latest or 0)
        data_state = ckpt.restore_meta(latest).get("data") if latest is not None else None
        data_it, to_device = train_iterator(config, mesh, start_step, data_state)
        steps_per_epoch = int(data_it.steps_per_epoch)
        sched = schedules.build_schedules(config, steps_per_epoch)
        total_steps = len(sched["lr"])

        models = train.build_models(config)
        backbone = models[0]
        model_cfg, head_cfg = model_configs(config, *models)
        optimizer = train.make_optimizer(config)
        state, init_msg, start_teacher = _initial_state(config, workdir, mesh, ckpt, latest, models,
                                                        optimizer, model_cfg, head_cfg)
        train_step = train.TrainStep(config, sched, mesh=mesh, models=models, optimizer=optimizer,
                                     state_sharding=jax.tree.map(lambda x: x.sharding, state),
                                     halt_on_nonfinite=bool(config.stop_on_nonfinite))
        evaluators = periodic.build(config, mesh)

        logger = TrainLogger(workdir, total_steps, steps_per_epoch, batch_size, is_main, stream=stream)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.student))
        logger.print(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
                     f"({jax.devices()[0].platform}), mesh {dict(mesh.shape)}; "
                     f"{data_it.num_examples} training images, {steps_per_epoch} steps/epoch, "
                     f"{total_steps} steps; student {n_params / 1e6:.2f}M params")
        if init_msg:
            logger.print(init_msg)
        if latest is not None:
            logger.print(f"resumed from {ckpt.directory}/{latest} (epoch {latest / steps_per_epoch:.2f})")

        # Data-iterator state after each step's batch since the last sync point: the
        # checkpoint of step s resumes the data exactly after batch s.
        data_states = {start_step: data_it.get_state()}

        def save(step, state):
            meta = {"model_config": model_cfg, "head_config": head_cfg, "data": data_states[step],
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "config": json.loads(config.to_json_best_effort())}
            logger.flush()  # gs://: the logs so far land with the checkpoint (metrics_log doc)
            return ckpt.save(int(step), checkpoint.state_to_tree(state), meta)

        log_every, ckpt_every = int(config.log_every_steps), int(config.checkpoint_every_steps)
        preempt.install()
        prefetch = DevicePrefetcher(data_it, to_device, depth=int(config.data.device_prefetch))
        acc = train_step.new_accumulator()
        stopped = None
        synced = []  # (time, step) of each sync point: the loop's own images/s
        logger.start(start_step)
        if on_sync:
            on_sync(start_step, ckpt)
        step = start_step
        for step in range(start_step + 1, total_steps + 1):  # step: steps done after this one
            batch, data_states[step] = prefetch.next()
            state, _, acc = train_step(state, batch, acc)
            log_now = step % log_every == 0 or step == total_steps
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if not (log_now or epoch_end or step % ckpt_every == 0):
                continue
            # A sync point: the interval's one device-to-host transfer.
            acc_host = jax.device_get(acc)
            acc = train_step.new_accumulator()
            synced.append((time.time(), step))
            first_bad = int(acc_host["first_bad"])
            if first_bad and config.stop_on_nonfinite:  # the official code also stops (loss.item())
                good = first_bad - 1  # the guard kept this state through the rest of the interval
                save(good, state)
                ckpt.wait()
                raise TrainingError(
                    f"non-finite loss ({float(acc_host['bad_loss'])}) at step {first_bad}: stopped; "
                    f"the last good state (step {good}) is checkpointed in {ckpt.directory}")
            if first_bad:
                logger.print(f"warning: {int(acc_host['skipped'])} step(s) with a non-finite loss "
                             f"skipped (update dropped) before step {step}, the first at {first_bad}")
            logger.interval_metrics(step, acc_host["sums"], int(acc_host["count"]), acc_host["last"], log_now)
            if epoch_end:
                epoch = (step - 1) // steps_per_epoch
                extra = {}
                if step != total_steps:  # the end of training evaluates below
                    extra = evaluate(config, evaluators, backbone, state.teacher["backbone"], logger,
                                     step, epoch + 1)
                stats = logger.end_epoch(epoch, extra)
                logger.print(f"epoch {epoch} done: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in stats.items() if k != "epoch" and isinstance(v, float)))
            if step % ckpt_every == 0 and step < total_steps:
                save(step, state)
            data_states = {step: data_states[step]}
            if on_sync:
                on_sync(step, ckpt)
            if log_now and preempt.agreed():  # a collective: at most once per log interval
                stopped = "preempted"
                break
        save(step, state)
        ckpt.wait()
    finally:
        preempt.restore()
        if prefetch is not None:
            prefetch.close()
        ckpt.close()

    train_seconds = time.time() - t_start
    summary = {"step": step, "total_steps": total_steps, "train_seconds": round(train_seconds, 1)}
    if len(synced) >= 2 and synced[-1][0] > synced[0][0]:
        # Steps after the first sync point (compilation excluded) over their wall time.
        summary["images_per_second"] = round(
            (synced[-1][1] - synced[0][1]) * batch_size / (synced[-1][0] - synced[0][0]), 2)
    if stopped:
        logger.print(f"stopped by signal at step {step}: checkpoint saved; rerun the same command to resume")
        summary["stopped"] = stopped
    else:
        logger.print(f"training done in {format_duration(train_seconds)}")
        summary.update(evaluate(config, evaluators, backbone, state.teacher["backbone"], logger, step,
                                None, start_teacher))
    logger.close()
    return summary

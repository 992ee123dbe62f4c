"""DINO pre-training: ``python -m dino_jax.main --config=configs/vit_s8.py --workdir=DIR``.

Builds the mesh, the input pipeline and the train state, resumes from the latest
complete checkpoint in ``--workdir`` if there is one, trains, checkpoints
(asynchronously, every ``checkpoint_every_steps`` and at the end; on SIGTERM
before exiting), logs (stdout progress with ETA, TensorBoard, JSON-lines
``log.txt``), and evaluates the teacher with k-NN when the config names an
evaluation split. The last stdout line is a JSON summary.

Any config field can be overridden: ``--config.batch_size=1024 --config.model.dtype=bfloat16``.
Several hosts: TPU pods and SLURM/Open MPI GPU clusters are detected; elsewhere set
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` or the flags below.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from dino_jax import runtime  # noqa: E402  (imports nothing heavy)

if __name__ == "__main__":
    runtime.reexec_with_tcmalloc()  # before JAX and TF allocate anything
runtime.set_xla_cpu_defaults()  # before jax is imported

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (a Python file with get_config()); fields can be "
    "overridden as --config.field=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, log.txt and TensorBoard events. "
                    "An existing run in it is resumed from its latest complete checkpoint.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs "
                    "where it is not detected (default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) of a multi-host run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-host run.")


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
    import jax  # noqa: PLC0415

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

    def agreed(self) -> bool:
        """True on every host once any host was asked to stop."""
        import jax  # noqa: PLC0415

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

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
        import queue  # noqa: PLC0415
        import threading  # noqa: PLC0415

        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator, to_device),
                                        name="DevicePrefetcher", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue  # noqa: PLC0415

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
        import queue  # noqa: PLC0415

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)


def _between_syncs():
    """Context of the steps between two sync points (log, epoch end, checkpoint).
    ``DINO_JAX_CHECK_NO_SYNC=1`` runs them under
    ``jax.transfer_guard_device_to_host("disallow")`` (GPU/TPU: any device-to-host
    read there fails loudly); tests replace this function to count transfers."""
    import contextlib  # noqa: PLC0415

    if os.environ.get("DINO_JAX_CHECK_NO_SYNC"):
        import jax  # noqa: PLC0415

        return jax.transfer_guard_device_to_host("disallow")
    return contextlib.nullcontext()


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------
def _model_configs(config, backbone, head):
    from dino_jax.models import vit  # noqa: PLC0415

    head_cfg = dict(out_dim=head.out_dim, norm_last_layer=head.norm_last_layer, nlayers=head.nlayers,
                    hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim)
    return vit.model_config(backbone), head_cfg


def _train_iterator(config, mesh, start_step, data_state):
    """(iterator, to_device): tf.data batches for image sources (TensorFlow is imported
    here only), or the on-device synthetic batches (no TensorFlow)."""
    from dino_jax import sharding  # noqa: PLC0415

    if config.data.source == "synthetic":
        from dino_jax.data import synthetic  # noqa: PLC0415

        if config.data.eval_split:
            raise TrainingError("data.source 'synthetic' has no labels for k-NN: set --config.data.eval_split=")
        it = synthetic.SyntheticIterator(config.data, int(config.batch_size), int(config.seed), mesh,
                                         start_step=start_step, state=data_state)
        return it, lambda batch: batch
    from dino_jax.data import pipeline  # noqa: PLC0415

    it = pipeline.create_train_iterator(config.data, int(config.batch_size), int(config.seed),
                                        start_step=start_step, state=data_state)
    if config.data.eval_split and "knn" in config.evals:  # needs labels: say so now, not after training
        pipeline.check_knn_labels(config.data, it.source)
    return it, lambda batch: sharding.shard_host_batch(batch, mesh)


def train_and_evaluate(config, workdir: str, stream=None) -> dict:
    """Train (or resume) in ``workdir``; returns the summary printed as the last line.

    The loop never waits for the devices between sync points (log steps, epoch
    ends, checkpoint steps, the end): batches arrive through a
    :class:`DevicePrefetcher`, the step carries its metrics in an on-device
    accumulator, and only at a sync point is that accumulator fetched (one
    device-to-host transfer), checked for a non-finite step, logged, and the
    pre-emption flag agreed across hosts (log steps only).
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from dino_jax import checkpoint, schedules, sharding, train, warm_start  # noqa: PLC0415
    from dino_jax.eval import periodic  # noqa: PLC0415
    from dino_jax.metrics_log import TrainLogger, format_duration  # noqa: PLC0415

    t_start = time.time()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(int(config.num_fsdp))
    sharding.check_batch_size(int(config.batch_size), mesh)

    ckpt = checkpoint.TrainCheckpointer(workdir, keep=config.keep_checkpoints,
                                        keep_every=config.keep_every_steps)
    prefetch = None
    try:
        note = lambda msg: is_main and print(msg, file=stream or sys.stdout, flush=True)  # noqa: E731
        latest = ckpt.latest_readable_step(log=note)  # damaged newer steps: one line each, set aside
        start_step = int(latest or 0)
        data_state = ckpt.restore_meta(latest).get("data") if latest is not None else None

        data_it, to_device = _train_iterator(config, mesh, start_step, data_state)
        steps_per_epoch = int(data_it.steps_per_epoch)
        sched = schedules.build_schedules(config, steps_per_epoch)
        total_steps = len(sched["lr"])

        models = train.build_models(config)
        backbone, head = models
        model_cfg, head_cfg = _model_configs(config, backbone, head)
        optimizer = train.make_optimizer(config)
        rng = jax.random.PRNGKey(int(config.seed))
        state = train.create_train_state(config, rng, mesh=mesh, models=models, optimizer=optimizer)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        # knn_random_init's baseline is the teacher the run started from (random init, or
        # init_from's weights); a resumed run reloads init_from only for it.
        want_start = bool(config.knn_random_init and config.data.eval_split)
        start, init_msg = state, None
        if config.init_from and (latest is None or want_start):
            try:
                start, init_msg = warm_start.warm_start(state, config, model_cfg, head_cfg)
            except warm_start.WarmStartError as e:
                if latest is None:
                    raise
                start, init_msg = None, f"knn_random_init: no baseline ({e})"  # resume wins anyway
        if latest is None:
            state = start
        elif init_msg and start is not None:
            init_msg = None  # the run resumes; init_from only gave the baseline
        init_teacher_backbone = (jax.tree.map(np.asarray, start.teacher["backbone"])
                                 if want_start and start is not None else None)
        if latest is not None:
            tree, meta = ckpt.restore(latest, checkpoint.state_to_tree(state))
            state = checkpoint.tree_to_state(state, tree)
            if meta.get("model_config") != model_cfg:
                raise TrainingError(f"the checkpoint in {workdir} is a different model "
                                    f"({meta.get('model_config')}) than the config ({model_cfg})")

        logger = TrainLogger(workdir, total_steps, steps_per_epoch, int(config.batch_size), is_main,
                             stream=stream)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.student))
        logger.print(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
                     f"({jax.devices()[0].platform}), mesh {dict(mesh.shape)}; "
                     f"{data_it.num_examples} training images, {steps_per_epoch} steps/epoch, "
                     f"{total_steps} steps; student {n_params / 1e6:.2f}M params")
        if init_msg:
            logger.print(init_msg)
        if latest is not None:
            logger.print(f"resumed from {ckpt.directory}/{latest} (epoch {latest / steps_per_epoch:.2f})")

        step_fn = train.make_train_step(config, mesh=mesh, state_sharding=state_sh, models=models,
                                        optimizer=optimizer, schedule=sched,
                                        halt_on_nonfinite=bool(config.stop_on_nonfinite))

        # Data-iterator state after each step's batch since the last sync point: a
        # checkpoint of step s resumes the data exactly after batch s.
        data_states = {start_step: data_it.get_state()}

        def save(step, state):
            meta = {"model_config": model_cfg, "head_config": head_cfg, "data": data_states[step],
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "config": json.loads(config.to_json_best_effort())}
            return ckpt.save(int(step), checkpoint.state_to_tree(state), meta)

        evaluators = periodic.build(config)
        log_every, ckpt_every = int(config.log_every_steps), int(config.checkpoint_every_steps)
        # Test hook: a real SIGKILL of this process right after this step (crash-resume tests);
        # in-flight async saves are let finish first so the restart has a checkpoint to resume.
        kill_at = int(os.environ.get("DINO_JAX_TEST_KILL_AT_STEP", "0") or 0)

        def sync_point(s):
            return (s % log_every == 0 or s % steps_per_epoch == 0 or s % ckpt_every == 0
                    or s == total_steps or s == kill_at)

        preempt = PreemptionFlag().install()
        prefetch = DevicePrefetcher(data_it, to_device, depth=int(config.data.device_prefetch))
        acc = step_fn.new_accumulator()
        step = start_step
        stopped = None
        synced = []  # (time, step) of each sync point: the loop's own images/s
        logger.start(step)
        try:
            while step < total_steps:
                with _between_syncs():  # no device-to-host transfer in here
                    while True:
                        batch, data_states[step + 1] = prefetch.next()
                        state, acc = step_fn.accumulate(state, batch, acc)
                        step += 1
                        if sync_point(step):
                            break
                # Sync point: the interval's one device-to-host transfer.
                acc_host = jax.device_get(acc)
                acc = step_fn.new_accumulator()
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
                log_now = step % log_every == 0 or step == total_steps
                logger.interval_metrics(step, acc_host["sums"], int(acc_host["count"]), acc_host["last"],
                                        log_now)
                if step % steps_per_epoch == 0 or step == total_steps:
                    epoch = (step - 1) // steps_per_epoch
                    extra = {}
                    if step != total_steps:  # config.evals (k-NN by default); the end evaluates below
                        extra = periodic.run_due(evaluators, backbone, state.teacher["backbone"], mesh,
                                                 epoch + 1, logger.print)
                        logger.scalars(step, extra, "eval")
                    stats = logger.end_epoch(epoch, extra)
                    logger.print(f"epoch {epoch} done: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in stats.items() if k != "epoch" and isinstance(v, float)))
                if step % ckpt_every == 0 and step < total_steps:
                    save(step, state)
                if step == kill_at:
                    ckpt.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                data_states = {step: data_states[step]}
                if log_now and preempt.agreed():  # a collective: at most once per log interval
                    stopped = "preempted"
                    break
            save(step, state)
            ckpt.wait()
        finally:
            preempt.restore()
    finally:
        if prefetch is not None:
            prefetch.close()
        ckpt.close()
    train_seconds = time.time() - t_start
    summary = {"step": step, "total_steps": total_steps, "train_seconds": round(train_seconds, 1)}
    if len(synced) >= 2 and synced[-1][0] > synced[0][0]:
        # Steps after the first sync point (compilation excluded) over their wall time.
        summary["images_per_second"] = round(
            (synced[-1][1] - synced[0][1]) * int(config.batch_size) / (synced[-1][0] - synced[0][0]), 2)
    if stopped:
        logger.print(f"stopped by signal at step {step}: checkpoint saved; rerun the same command to resume")
        summary["stopped"] = stopped
        logger.close()
        return summary
    logger.print(f"training done in {format_duration(train_seconds)}")
    if config.data.eval_split and "knn" in config.evals:
        res = _knn(config, backbone, state.teacher["backbone"], mesh, logger)
        summary["knn_top1_trained"] = res["knn_top1"]
        summary["knn_top5_trained"] = res["knn_top5"]
        logger.print(f"k-NN (k={config.knn_k}) top-1 of the trained teacher: {res['knn_top1']:.2f}%")
        if init_teacher_backbone is not None:
            res0 = _knn(config, backbone, init_teacher_backbone, mesh, logger)
            summary["knn_top1_random"] = res0["knn_top1"]
            summary["knn_top5_random"] = res0["knn_top5"]
            logger.print(f"k-NN (k={config.knn_k}) top-1 of the starting teacher "
                         f"({'init_from' if config.init_from else 'random init'}): {res0['knn_top1']:.2f}%")
        logger.scalars(step, {k: v for k, v in summary.items() if k.startswith("knn")}, "knn")
    summary.update(periodic.run_due(evaluators, backbone, state.teacher["backbone"], mesh, None, logger.print,
                                    exclude=("knn",)))  # the other config.evals at the end
    logger.close()
    return summary


def _knn(config, backbone, backbone_params, mesh, logger) -> dict:
    """Weighted k-NN top-1/top-5 (percent) of ``backbone_params`` on the eval split."""
    from dino_jax.eval import periodic  # noqa: PLC0415

    t0 = time.time()
    res = periodic.KnnEvaluator(config)(backbone, backbone_params, mesh)
    logger.print(f"k-NN: top-1 {res['knn_top1']:.2f}% top-5 {res['knn_top5']:.2f}% "
                 f"({time.time() - t0:.0f}s)")
    return res


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or FLAGS.workdir is None:
        print("error: --config and --workdir are required "
              "(e.g. --config=configs/quickstart.py --workdir=/tmp/dino)", file=sys.stderr)
        sys.exit(2)
    from dino_jax import checkpoint  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)
    try:
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (TrainingError, checkpoint.CheckpointError, ValueError) as e:  # DataError, WarmStartError: ValueErrors
        if os.environ.get("DINO_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    import jax  # noqa: PLC0415

    if jax.process_index() == 0:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    app.run(main)

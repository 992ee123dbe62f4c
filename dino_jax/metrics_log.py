"""Training logs: a progress line with ETA, TensorBoard scalars, the official
JSON-lines ``log.txt`` (one line per epoch of averaged ``train_*`` stats), and
``metrics.jsonl`` (one JSON line per logging step: the step's metrics, readable
without TensorBoard; :func:`read_metrics`).

Only process 0 writes; TensorBoard goes through tensorboardX so the core never
imports TensorFlow. The workdir may be a ``gs://`` URL (:mod:`dino_jax.paths`): an
object cannot be appended to, so there the logs are kept in memory and each file is
rewritten whole, at most every ``REMOTE_FLUSH_SECONDS`` and at every epoch end,
:meth:`TrainLogger.flush` (the loop calls it at each checkpoint) and close.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from collections import defaultdict

import numpy as np

from dino_jax import paths

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
# Least time between two rewrites of a log on an object store (module doc).
REMOTE_FLUSH_SECONDS = 30.0


class _LogFile:
    """A text file lines are appended to: locally each append goes straight to the
    file; on an object store the whole object is rewritten when :meth:`flush` is
    called (its earlier content, e.g. a resumed run's, is read once and kept)."""

    def __init__(self, path: str):
        self.path, self.remote = path, paths.is_remote(path)
        self._text = None  # remote: the object's content, appended to in memory
        self.dirty = False

    def append(self, text: str):
        if not self.remote:
            paths.append_text(self.path, text)
            return
        if self._text is None:
            self._text = paths.read_text(self.path) if paths.exists(self.path) else ""
        self._text += text
        self.dirty = True

    def flush(self):
        if self.remote and self.dirty:
            paths.write_text(self.path, self._text)
            self.dirty = False


def format_duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class EpochAverager:
    """Running means of scalar metrics over an epoch (the official MetricLogger global_avg)."""

    def __init__(self):
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)

    def update(self, metrics: dict, count: int = 1):
        """Add ``count`` steps whose per-metric sums are ``metrics`` (one step: its values)."""
        if count <= 0:
            return
        for k, v in metrics.items():
            self.sums[k] += float(v)
            self.counts[k] += count

    def averages(self) -> dict:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def collapse_message(step: int, metrics: dict) -> str:
    """The collapse warning: the diagnostics and the official remedies (main_dino.py help:
    lower the teacher temperature, raise the teacher momentum, freeze the last layer longer)."""
    return (f"collapse at step {step}: the teacher's outputs collapsed (KL {float(metrics['kl']):.3g}, "
            f"teacher entropy {float(metrics['teacher_entropy']):.3g}, batch entropy "
            f"{float(metrics['batch_entropy']):.3g} nats); official remedies: lower the teacher "
            f"temperature (--config.teacher_temp/--config.warmup_teacher_temp, e.g. 0.04 -> 0.03), "
            f"raise the teacher momentum (--config.momentum_teacher=0.9995 at batch <= 256), freeze the "
            f"last layer longer (--config.freeze_last_layer=3)")


class TrainLogger:
    def __init__(self, workdir: str, total_steps: int, steps_per_epoch: int, global_batch: int,
                 is_main: bool = True, tensorboard: bool = True, stream=None):
        self.workdir, self.total_steps, self.steps_per_epoch = workdir, total_steps, steps_per_epoch
        self.global_batch, self.is_main = global_batch, is_main
        self.stream = stream or sys.stdout
        self.writer = None
        self.remote = paths.is_remote(workdir)
        self._files = {name: _LogFile(paths.join(workdir, name)) for name in (METRICS_FILE, LOG_FILE)}
        self._flushed_at = 0.0
        if is_main and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                # gs://: tensorboardX's own GCS writer (google-cloud-storage), which uploads
                # the whole events file at each flush: flushed with the logs, not per step.
                self.writer = SummaryWriter(paths.join(workdir, "tensorboard"),
                                            flush_secs=int(REMOTE_FLUSH_SECONDS) if self.remote else 120)
            except ImportError:
                self.print("tensorboardX is not installed: no TensorBoard events are written")
        self.epoch_avg = EpochAverager()
        self._collapse_epoch = -1  # the collapse line is printed at most once per epoch
        self._t_last, self._step_last = None, None
        self._t_start, self._step_start = None, None

    def print(self, msg: str):
        if self.is_main:
            print(msg, file=self.stream, flush=True)

    def start(self, step: int):
        self._t_start = self._t_last = time.time()
        self._step_start = self._step_last = step

    def step_metrics(self, step: int, metrics: dict, log_now: bool):
        """Accumulate one step's metrics; print the progress line and write TensorBoard when asked."""
        self.interval_metrics(step, metrics, 1, metrics, log_now)

    def interval_metrics(self, step: int, sums: dict, count: int, last: dict, log_now: bool):
        """Add ``count`` steps (per-metric ``sums``) to the epoch averages; when ``log_now``
        print the progress line and write TensorBoard and metrics.jsonl with ``last``, the
        metrics of the newest applied step."""
        self.epoch_avg.update(sums, count)
        if count > 0 and "collapse" in sums and float(sums["collapse"]) > 0:  # any step of the interval
            self._check_collapse(step, {**{k: float(v) for k, v in last.items()}, "collapse": 1.0})
        if not log_now:
            return
        metrics = {k: float(v) for k, v in last.items()} if count > 0 else {}  # all skipped: no values
        now = time.time()
        steps = step - self._step_last
        rate = steps * self.global_batch / max(now - self._t_last, 1e-9)
        done = step - self._step_start
        elapsed = now - self._t_start
        eta = (self.total_steps - step) * elapsed / done if done > 0 else float("nan")
        self._t_last, self._step_last = now, step
        epoch = step / self.steps_per_epoch
        self.print(
            f"step {step}/{self.total_steps}  epoch {epoch:.2f}  loss {metrics.get('loss', float('nan')):.4f}  "
            f"lr {metrics.get('lr', 0):.3g}  wd {metrics.get('wd', 0):.3g}  "
            f"t_temp {metrics.get('teacher_temp', 0):.3f}  mom {metrics.get('momentum', 0):.5f}  "
            f"entropy {metrics.get('teacher_entropy', float('nan')):.3f}  "
            f"{rate:.1f} img/s  ETA {format_duration(eta)}")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)
            self.writer.add_scalar("train/images_per_second", rate, step)
        if self.is_main:
            record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "images_per_second": rate}
            self._files[METRICS_FILE].append(json.dumps(record) + "\n")
        self.flush(force=not self.remote or now - self._flushed_at >= REMOTE_FLUSH_SECONDS)

    def flush(self, force: bool = True):
        """Write what was logged (object store: rewrite the logs; see module doc)."""
        if not force:
            return
        for f in self._files.values():
            f.flush()
        if self.writer is not None:
            self.writer.flush()
        self._flushed_at = time.time()

    def _check_collapse(self, step: int, metrics: dict):
        """One line (per epoch at most) when ``losses.collapse_flag`` held at this step."""
        if "collapse" not in metrics or float(metrics["collapse"]) < 0.5:
            return
        epoch = (step - 1) // self.steps_per_epoch
        if epoch == self._collapse_epoch:
            return
        self._collapse_epoch = epoch
        self.print(collapse_message(step, metrics))

    def scalars(self, step: int, values: dict, prefix: str):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self.flush(force=not self.remote)

    def end_epoch(self, epoch: int, extra: dict | None = None):
        """Append the official per-epoch JSON line ({"train_loss": ..., "epoch": e}) to log.txt."""
        stats = {f"train_{k}": v for k, v in self.epoch_avg.averages().items()}
        stats.update(extra or {})
        stats["epoch"] = epoch
        if self.is_main:
            self._files[LOG_FILE].append(json.dumps(stats) + "\n")
            self.flush()
        self.epoch_avg = EpochAverager()
        return stats

    def close(self):
        for f in self._files.values():
            f.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl`` sorted by step, one per step (a resumed
    run logs some steps again: the last record wins)."""
    by_step = {}
    for line in paths.read_text(paths.join(workdir, METRICS_FILE)).splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]

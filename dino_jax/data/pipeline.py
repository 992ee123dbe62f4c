"""tf.data pipelines: DINO multi-crop training, evaluation, and linear-probe training.

Training order is arithmetic on positions, not a replayed stream. Epoch e
visits the examples in a pseudo-random permutation (``index_shuffle`` seeded by
(seed, e)); the first ``steps_per_epoch * global_batch`` positions are used
(the official ``drop_last``). Global batch k holds positions
``[k*B, (k+1)*B)``; host h of H takes the contiguous slice
``[k*B + h*B/H, k*B + (h+1)*B/H)``, so hosts are disjoint and the global batch
(hosts concatenated in process order) is the same whatever the host count.
Each example's crops are seeded by (seed, global position), so they do not
depend on threads or hosts, and resuming at position p reproduces exactly what
an uninterrupted run reads from p on.

Unreadable images (corrupt, truncated) are dropped inside tf.data, counted and
logged with their file names by the iterator; the next image takes their place.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from dino_jax.data import augment
from dino_jax.data.sources import DataError, check_knn_labels, make_source, require_labels
from dino_jax.data.tfutil import tf

log = logging.getLogger("dino_jax.data")
AUTOTUNE = tf.data.AUTOTUNE

__all__ = ["DataError", "TrainIterator", "EvalIterator", "create_train_iterator", "create_eval_iterator",
           "create_supervised_train_iterator", "num_classes", "num_examples", "check_knn_labels", "require_labels",
           "to_global_arrays"]


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415

        return jax.process_index(), jax.process_count()
    return int(process_index), int(process_count)


def _as_numpy(t):
    """A batch tensor as numpy without a copy (``np.asarray`` shares the tensor's buffer;
    ``.numpy()`` copies it: ~0.4 ms per ImageNet multi-crop example on the main thread)."""
    return np.asarray(t)


def _options(deterministic=True):
    opts = tf.data.Options()
    opts.deterministic = deterministic
    opts.threading.private_threadpool_size = 0
    opts.autotune.enabled = True
    return opts


class _Positions:
    """Host-local counter c -> (global position p, epoch, example index)."""

    def __init__(self, num_examples, global_batch, process_index, process_count, seed, shuffle=True):
        self.n, self.gb = num_examples, global_batch
        self.b = global_batch // process_count
        self.h = process_index
        self.steps_per_epoch = num_examples // global_batch
        self.per_epoch = self.steps_per_epoch * global_batch
        self.seed, self.shuffle = seed, shuffle

    def dataset(self, start: int):
        """tf.data of (global position, example index) for host-local counters >= start."""
        b, gb, h, per_epoch, n = self.b, self.gb, self.h, self.per_epoch, self.n
        seed, shuffle = self.seed, self.shuffle

        def mapper(c):
            p = (c // b) * gb + h * b + c % b
            epoch = p // per_epoch
            i = p % per_epoch
            if shuffle:
                key = tf.stack([tf.constant(seed, tf.int64), epoch])
                idx = tf.random.experimental.index_shuffle(i, key, n - 1)
            else:
                idx = i
            return p, tf.cast(idx, tf.int64)

        return tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(mapper)

    def position(self, c: int) -> int:
        return (c // self.b) * self.gb + self.h * self.b + c % self.b

    def to_global(self, c: int) -> int:
        """The host-count-free form of counter ``c`` that checkpoints store: global
        examples before the batch holding ``c`` plus ``c``'s offset in it (the global
        position of host 0's next example; ``c * process_count`` with no skips)."""
        return (c // self.b) * self.gb + c % self.b

    def from_global(self, g: int) -> int:
        """Inverse of :meth:`to_global` for this host count: a run saved by any number
        of hosts resumes at the same global batch on this one."""
        return (g // self.gb) * self.b + g % self.gb


class TrainIterator:
    """Per-host DINO batches: {'global_crops': (b, 2, G, G, 3), 'local_crops': (b, L, l, l, 3)}
    float32; with ``data_cfg.device_augment`` uint8 crops (width first) plus 'global_aug' / 'local_aug'
    (their photometric decisions, see :mod:`dino_jax.data.device_augment`)."""

    def __init__(self, data_cfg, global_batch_size: int, seed: int, start_step: int = 0,
                 process_index=None, process_count=None, start_position: int | None = None):
        h, hc = _process(process_index, process_count)
        if data_cfg.device_augment and data_cfg.pil_ops:
            raise DataError("data.pil_ops (photometric ops by PIL on the host) and data.device_augment "
                            "(photometric ops on the accelerator) exclude each other: turn one off")
        if global_batch_size % hc:
            raise DataError(f"global batch {global_batch_size} is not divisible by the {hc} hosts")
        self.source = make_source(data_cfg, str(data_cfg.train_split))
        n = self.source.num_examples
        if global_batch_size > n:
            raise DataError(f"batch size {global_batch_size} is larger than the dataset "
                            f"({n} images in {self.source.name})")
        self.num_examples = n
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // hc
        self.steps_per_epoch = n // global_batch_size
        self.cfg = augment.MultiCropConfig.from_data_config(data_cfg)
        self.seed = int(seed)
        # device_augment: crops leave as uint8 with their photometric decisions
        # (augment.multi_crop until='device'); dino_jax.data.device_augment finishes them.
        self.until = "device" if data_cfg.device_augment else "all"
        self._pos = _Positions(n, global_batch_size, h, hc, self.seed)
        # Host-local counter of the next example; consumed-but-unreadable ones included.
        # ``start_position`` is the global form (get_state), whatever host count saved it.
        self.counter = (self._pos.from_global(int(start_position)) if start_position is not None
                        else start_step * self.batch_size)
        self.skipped = 0
        self._it = iter(self._build(data_cfg, self.counter))

    def _build(self, data_cfg, start):
        src, cfg, seed, until = self.source, self.cfg, self.seed, self.until
        if getattr(src, "sequential", False):
            return self._build_sequential(data_cfg, start)
        ds = self._pos.dataset(start)

        def load_and_augment(p, idx):
            image, _ = src.load(idx)
            crops = augment.multi_crop(image, tf.stack([tf.constant(seed, tf.int64), p]), cfg, until=until)
            crops["position"] = p
            return crops

        ds = ds.map(load_and_augment, num_parallel_calls=int(data_cfg.num_parallel_calls),
                    deterministic=True)
        ds = ds.ignore_errors()  # unreadable images: counted by position gaps in __next__
        ds = ds.batch(self.batch_size, drop_remainder=True)
        ds = ds.prefetch(int(data_cfg.prefetch) or AUTOTUNE)
        return ds.with_options(_options())

    def _build_sequential(self, data_cfg, start):
        """TFDS (tfrecord) datasets: this host's even split, files and a buffer shuffled
        with the run seed (deterministic), repeated; resume skips ``start`` encoded
        examples before any decoding. Crops are seeded by the host-local counter."""
        src, cfg, seed, pos, until = self.source, self.cfg, self.seed, self._pos, self.until
        h = pos.h
        ds = src.dataset(h, self.global_batch_size // self.batch_size, shuffle_seed=seed).repeat()
        ds = ds.shuffle(int(data_cfg.shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
        ds = ds.enumerate().skip(start)
        b, gb = pos.b, pos.gb

        def load_and_augment(c, example):
            image, _ = src.decode(example)
            p = (c // b) * gb + h * b + c % b
            crops = augment.multi_crop(image, tf.stack([tf.constant(seed, tf.int64), p]), cfg, until=until)
            crops["position"] = p
            return crops

        ds = ds.map(load_and_augment, num_parallel_calls=int(data_cfg.num_parallel_calls),
                    deterministic=True).ignore_errors()
        ds = ds.batch(self.batch_size, drop_remainder=True)
        return ds.prefetch(int(data_cfg.prefetch) or AUTOTUNE).with_options(_options())

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        positions = batch.pop("position").numpy()
        if getattr(self.source, "sequential", False):
            self.counter += len(positions)  # the stream itself defines the order
        else:
            self._account(positions)
        return tf.nest.map_structure(_as_numpy, batch)

    def _account(self, positions):
        for p in positions:
            while self._pos.position(self.counter) != p:
                self.skipped += 1
                idx = self._example_of(self._pos.position(self.counter))
                log.warning("skipped an unreadable image (%s); %d skipped so far",
                            self.source.describe(idx), self.skipped)
                self.counter += 1
            self.counter += 1

    def _example_of(self, p):
        epoch, i = p // self._pos.per_epoch, p % self._pos.per_epoch
        key = tf.constant([self.seed, epoch], tf.int64)
        return int(tf.random.experimental.index_shuffle(tf.constant(i, tf.int64), key, self.num_examples - 1))

    def get_state(self) -> dict:
        """Where the next batch starts, independent of the host count: the global
        position of host 0's next example (``_Positions.to_global``; unreadable
        images included) and this host's count of skipped images."""
        return {"position": int(self._pos.to_global(self.counter)), "skipped": int(self.skipped)}


def create_train_iterator(data_cfg, global_batch_size: int, seed: int, start_step: int = 0,
                          process_index=None, process_count=None, state: dict | None = None):
    """Training iterator; resume with ``state=it.get_state()`` (or ``start_step`` when no
    image was ever skipped: position = step * per-host batch)."""
    start_position = state.get("position") if state else None
    return TrainIterator(data_cfg, global_batch_size, seed, start_step, process_index, process_count,
                         start_position)


# --------------------------------------------------------------------------
# Evaluation: deterministic, every example once, padded last batch with a mask.
# --------------------------------------------------------------------------
class EvalIterator:
    """Per-host batches {'image', 'label', 'mask'} over this host's contiguous shard."""

    def __init__(self, data_cfg, split: str, batch_size: int, image_size: int | None = None,
                 process_index=None, process_count=None, max_examples: int | None = None,
                 transform=None):
        h, hc = _process(process_index, process_count)
        self.source = make_source(data_cfg, split)
        n = self.source.num_examples
        if max_examples:
            n = min(n, int(max_examples))
        self.num_examples = n
        per_host = math.ceil(n / hc)
        self.start, self.stop = min(h * per_host, n), min((h + 1) * per_host, n)
        self.batch_size = int(batch_size)
        self.num_batches = math.ceil(per_host / self.batch_size)  # same on every host
        size = int(image_size or data_cfg.eval_image_size)
        ratio = float(data_cfg.eval_resize_ratio)
        src = self.source
        transform = transform or (lambda img: augment.eval_transform(img, size, ratio))

        def load(idx):
            image, label = src.load(idx)
            return {"image": transform(image), "label": label, "mask": True}

        total = self.num_batches * self.batch_size
        if getattr(src, "sequential", False):  # TFDS: this host's (uneven) split, in order
            self.start, self.stop = 0, src.host_num_examples(h, hc, drop_remainder=False)
            self.num_batches = math.ceil(math.ceil(src.num_examples / hc) / self.batch_size)
            total = self.num_batches * self.batch_size
            ds = src.dataset(h, hc, shuffle_seed=None, drop_remainder=False)
            if max_examples:
                ds = ds.take(per_host)
                self.stop = min(self.stop, per_host)

            def load_seq(example):
                image, label = src.decode(example)
                return {"image": transform(image), "label": label, "mask": True}

            ds = ds.map(load_seq, num_parallel_calls=AUTOTUNE, deterministic=True)
        else:
            ds = tf.data.Dataset.range(self.start, self.stop).map(
                load, num_parallel_calls=int(data_cfg.num_parallel_calls), deterministic=True)
        pad = tf.data.Dataset.from_tensors(
            {"image": tf.zeros([size, size, 3]), "label": tf.constant(-1, tf.int32),
             "mask": False}).repeat(total - (self.stop - self.start))
        self._ds = ds.concatenate(pad).batch(self.batch_size).prefetch(2).with_options(_options())

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        done = 0
        it = iter(self._ds)
        while True:
            try:
                b = next(it)
            except StopIteration:
                return
            except tf.errors.OpError as e:  # an unreadable image: name it in one line
                raise DataError(self._unreadable(done, e)) from None
            done += 1
            yield {k: _as_numpy(v) for k, v in b.items()}

    def _unreadable(self, batch: int, err) -> str:
        """The message for a decode failure in batch ``batch``: finds the file by decoding
        that batch's examples one by one (only on this error path)."""
        msg = (err.message or str(err)).strip().splitlines()[0]
        lo = self.start + batch * self.batch_size
        for i in list(range(lo, min(lo + self.batch_size, self.stop))) + list(range(self.start, self.stop)):
            if getattr(self.source, "sequential", False):
                break
            try:
                self.source.load(tf.constant(i, tf.int64))
            except tf.errors.OpError:
                return f"cannot read {self.source.describe(i)} in {self.source.name}: {msg}"
        return f"cannot read an image of {self.source.name}: {msg}"


def create_eval_iterator(data_cfg, split: str, batch_size: int, image_size: int | None = None,
                         process_index=None, process_count=None, max_examples: int | None = None):
    return EvalIterator(data_cfg, split, batch_size, image_size, process_index, process_count, max_examples)


class SupervisedIterator:
    """Linear-probe training batches {'image', 'label'}: RandomResizedCrop + flip, shuffled, repeating."""

    def __init__(self, data_cfg, split, batch_size, seed, image_size=None, process_index=None,
                 process_count=None, start_step: int = 0):
        h, hc = _process(process_index, process_count)
        self.source = make_source(data_cfg, split)
        n = self.source.num_examples
        if batch_size > n:
            raise DataError(f"batch size {batch_size} is larger than the dataset ({n} images)")
        self.num_examples, self.steps_per_epoch = n, n // batch_size
        self.batch_size = batch_size // hc
        size = int(image_size or data_cfg.eval_image_size)
        pos = _Positions(n, batch_size, h, hc, int(seed))
        src = self.source

        def load(p, idx):
            image, label = src.load(idx)
            seed_p = tf.stack([tf.constant(int(seed), tf.int64), p])
            return {"image": augment.train_transform(image, seed_p, size), "label": label}

        if getattr(src, "sequential", False):
            def load_seq(c, example):
                image, label = src.decode(example)
                seed_c = tf.stack([tf.constant(int(seed), tf.int64), c])
                return {"image": augment.train_transform(image, seed_c, size), "label": label}

            ds = src.dataset(h, hc, shuffle_seed=int(seed)).repeat().shuffle(
                int(data_cfg.shuffle_buffer), seed=int(seed)).enumerate().skip(start_step * self.batch_size)
            ds = ds.map(load_seq, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()
        else:
            # Host-local counter c = start_step * b: the batches of an uninterrupted run from that step.
            ds = pos.dataset(start_step * self.batch_size).map(load, num_parallel_calls=AUTOTUNE,
                                                              deterministic=True).ignore_errors()
        self._it = iter(ds.batch(self.batch_size, drop_remainder=True).prefetch(2).with_options(_options()))

    def __iter__(self):
        return self

    def __next__(self):
        return {k: _as_numpy(v) for k, v in next(self._it).items()}


def create_supervised_train_iterator(data_cfg, split, batch_size, seed, image_size=None,
                                     process_index=None, process_count=None, start_step: int = 0):
    """Linear-probe batches, one source for every epoch (re-shuffled per epoch), from ``start_step``."""
    return SupervisedIterator(data_cfg, split, batch_size, seed, image_size, process_index, process_count,
                              start_step)


def num_examples(data_cfg, split) -> int:
    return make_source(data_cfg, split).num_examples


def num_classes(data_cfg, split) -> int:
    return make_source(data_cfg, split).num_classes


def to_global_arrays(batch, sharding):
    """Per-host numpy batch -> global jax.Arrays laid out by ``sharding`` (multi-host safe)."""
    import jax  # noqa: PLC0415

    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

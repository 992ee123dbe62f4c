"""Image sources: Fashion-MNIST IDX files, ImageFolder directories, image lists, TFDS datasets.

``image_folder`` takes ``root/<split>/<class>/<image>`` (labels from the class
folders, as torchvision's ImageFolder), or, for pre-training, unlabeled images:
a ``root/<split>/`` or a ``root`` (then for every split) that holds images
itself (all images below it count, at any depth), or a ``.txt`` file listing
image paths (one a line, relative to the file's folder). Unlabeled
examples have label -1 and the source 0 classes; evaluations that need labels
(k-NN) refuse them with one line (:func:`require_labels`).

A source knows its size and classes up front and hands tf.data the examples it
is asked for by index, so the pipeline can shuffle, shard over hosts and resume
by arithmetic on positions instead of by replaying a stream.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import struct

import numpy as np

from dino_jax import paths
from dino_jax.data.files import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, list_images  # noqa: F401
from dino_jax.data.tfutil import tf

log = logging.getLogger("dino_jax.data")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DataError(ValueError):
    """A dataset problem found at start-up: one clear line for the user."""


# --------------------------------------------------------------------------
# Fashion-MNIST IDX (Debian's dataset-fashion-mnist).
# --------------------------------------------------------------------------
def _read_idx(path: str) -> np.ndarray:
    data = paths.read_bytes(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} bytes)")
    return arr.reshape(shape)


def read_fashion_mnist(directory: str, split: str):
    """(images uint8 (N, 28, 28), labels int32 (N,)) of ``split`` ('train' | 'test')."""
    if split not in _IDX_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(_IDX_FILES)}")
    if not paths.isdir(directory):
        raise DataError(f"Fashion-MNIST directory {directory} does not exist "
                        f"(apt-get install dataset-fashion-mnist)")
    idx_files = []
    for stem in _IDX_FILES[split]:
        cands = [paths.join(directory, stem + ext) for ext in (".gz", "")]
        found = [p for p in cands if paths.exists(p)]
        if not found:
            raise DataError(f"{cands[0]} not found in the Fashion-MNIST directory {directory}")
        idx_files.append(found[0])
    images, labels = _read_idx(idx_files[0]), _read_idx(idx_files[1])
    if len(images) != len(labels):
        raise DataError(f"{idx_files[0]} has {len(images)} images but {idx_files[1]} {len(labels)} labels")
    return images, labels.astype(np.int32)


def has_fashion_mnist_idx(directory: str, split: str) -> bool:
    """Whether ``directory`` holds both IDX files (gzipped or not) of ``split``."""
    return all(any(os.path.exists(os.path.join(directory, stem + ext)) for ext in (".gz", ""))
               for stem in _IDX_FILES.get(split, ("",)))


def tfds_fashion_mnist(split: str, data_dir: str | None):
    """(images, labels) of TFDS ``fashion_mnist``, which TFDS downloads and prepares in
    ``data_dir`` (None: ~/tensorflow_datasets) when it is not there yet."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 - TFDS is imported lazily, as in TfdsSource

    data = tfds.as_numpy(tfds.load("fashion_mnist", split=split, batch_size=-1, data_dir=data_dir))
    return data["image"][..., 0], data["label"].astype(np.int32)


def load_fashion_mnist(directory: str, split: str, tfds_data_dir: str | None = None):
    """Fashion-MNIST from ``directory``'s IDX files; when that is Debian's default folder
    and the files are absent, from TFDS ``fashion_mnist`` instead (downloaded if online).
    Offline with neither, one error line names both ways to get the data."""
    if directory != FASHION_MNIST_DIR or has_fashion_mnist_idx(directory, split) or split not in _IDX_FILES:
        return read_fashion_mnist(directory, split)
    log.info("Fashion-MNIST IDX files not in %s: using TFDS fashion_mnist", directory)
    try:
        return tfds_fashion_mnist(split, tfds_data_dir)
    except Exception as e:  # noqa: BLE001 - offline download errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"Fashion-MNIST not found: install Debian's IDX files (apt-get install "
                        f"dataset-fashion-mnist) or run once online so that TFDS downloads "
                        f"fashion_mnist to {tfds_data_dir or '~/tensorflow_datasets'} "
                        f"(TFDS: {reason[:200]})") from e


# --------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------
class Source:
    """num_examples, num_classes, and ``load(index) -> (uint8 HxWx3 image, int32 label)``
    as a tf function over a scalar int64 index."""
    name = "source"
    num_examples: int
    num_classes: int

    def load(self, index):  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"example {index}"


class ArraySource(Source):
    """In-memory uint8 images (N, H, W) or (N, H, W, C): Fashion-MNIST."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        if images.ndim == 3:
            images = images[..., None]
        self.images = tf.constant(images)
        self.labels = tf.constant(labels.astype(np.int32))
        self.num_examples = int(len(labels))
        self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.name = name

    def load(self, index):
        img = tf.gather(self.images, index)
        if img.shape[-1] == 1:
            img = tf.image.grayscale_to_rgb(img)
        return img, tf.gather(self.labels, index)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _has_top_level_images(folder: str) -> bool:
    return any(_is_image(n) and paths.isfile(paths.join(folder, n)) for n in paths.listdir(folder))


class FolderSource(Source):
    """ImageFolder: ``root/<class>/<image>``, classes sorted by name as torchvision does;
    or, with ``labeled=False`` or when ``root`` holds images itself, every image below
    ``root`` without labels (label -1, 0 classes)."""

    def __init__(self, root: str, subset=None, labeled: bool | None = None):
        if not paths.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        if labeled is None:
            labeled = not _has_top_level_images(root)
        classes, files, labels = [], [], []
        if labeled:
            classes = sorted(d for d in paths.listdir(root) if paths.isdir(paths.join(root, d)))
            for ci, c in enumerate(classes):
                found = list_images(paths.join(root, c))
                files += found
                labels += [ci] * len(found)
        else:
            files = list_images(root)
            labels = [-1] * len(files)
        if not files:
            raise DataError(f"image folder {root} has no images "
                            f"{'in class sub-folders ' if labeled else ''}({', '.join(IMAGE_EXTENSIONS)})")
        self._init(root, classes, files, labels, subset,
                   f"ImageFolder {root}" + ("" if labeled else " (unlabeled)"))

    def _init(self, root, classes, files, labels, subset, name):
        if subset is not None:  # (slice, split name): files in class order, as TFDS slices records
            idx = _sliced(len(files), *subset)
            files, labels = [files[i] for i in idx], [labels[i] for i in idx]
        self.root, self.classes, self.files = root, classes, files
        self.remote = paths.is_remote(root)
        self.paths = tf.constant(files)
        self.labels = tf.constant(np.asarray(labels, np.int32))
        self.num_examples, self.num_classes = len(files), len(classes)
        self.name = name

    def load(self, index):
        path = tf.gather(self.paths, index)
        if self.remote:  # through the path layer (gcsfs), not TF's own GCS client (paths module doc)
            data = tf.numpy_function(lambda p: paths.read_bytes(np.asarray(p).item().decode()), [path],
                                     tf.string, stateful=False)
            data.set_shape([])
        else:
            data = tf.io.read_file(path)
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return img, tf.gather(self.labels, index)

    def describe(self, index: int) -> str:
        return self.files[index]


class ListSource(FolderSource):
    """Unlabeled images listed in a text file, one path a line (relative paths are
    relative to the file's folder; blank lines and lines starting with '#' skipped)."""

    def __init__(self, list_file: str, subset=None):
        try:
            lines = [ln.strip() for ln in paths.read_text(list_file).splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the image list {list_file}: {e}") from e
        base = paths.dirname(paths.abspath(list_file))
        files = [ln if paths.is_remote(ln) else paths.join(base, ln)
                 for ln in lines if ln and not ln.startswith("#")]
        if not files:
            raise DataError(f"the image list {list_file} names no images")
        missing = [p for p in files[:10] if not paths.isfile(p)]  # catch a wrong base early
        if missing:
            raise DataError(f"the image list {list_file} names {missing[0]}, which does not exist")
        self._init(base, [], files, [-1] * len(files), subset, f"image list {list_file}")


def _resolve_folder_split(root: str, split: str):
    """(folder, labeled): ``root/<split>`` (labels from its class folders, or none when it
    holds images itself); without that sub-folder, a root that holds images itself
    stands for every split (all images below it, unlabeled)."""
    sub = paths.join(root, split)
    if paths.isdir(sub):
        return sub, None
    if not paths.isdir(root):
        raise DataError(f"image folder {root} does not exist")
    if _has_top_level_images(root):
        return root, False
    splits = sorted(d for d in paths.listdir(root) if paths.isdir(paths.join(root, d)))
    raise DataError(f"no split {split!r} in image folder {root} (sub-folders: {', '.join(splits[:10])}); "
                    f"unlabeled images go in {root}/{split}/ (any depth) or in a .txt list as data.path")


def check_knn_labels(data_cfg, train_source: Source, splits) -> None:
    """At start-up, before training: the k-NN bank and evaluated ``splits`` have labels
    (``train_source``, already built, stands for a split that is the training split)."""
    for split in map(str, splits):
        src = train_source if split == str(data_cfg.train_split) else make_source(data_cfg, split)
        require_labels(src, f"k-NN evaluation (split {split!r})")


def require_labels(source: Source, what: str) -> None:
    """One-line DataError when ``source`` has no labels (unlabeled folder or list)."""
    if source.num_classes == 0:
        raise DataError(f"{what} needs labels, and {source.name} has none: give it a split with class "
                        f"sub-folders (root/<split>/<class>/<image>) or turn it off "
                        f"(k-NN: --config.evals.knn.every_epochs=-1)")


class TfdsSource(Source):
    """A prepared TFDS dataset (no download: this runs offline).

    An array_record dataset (``tfds build --file_format=array_record``) is read by
    index, like a folder: every host walks the same global order, so a run resumes
    with the same global batches on any host count. A tfrecord one has no random
    access: each host reads its even share of the record files in a seeded shuffled
    order (``sequential=True``), a share that changes with the host count."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # noqa: PLC0415

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends
            raise DataError(f"unknown TFDS dataset {name!r}: {str(e).splitlines()[0]}") from e
        try:
            info = builder.info
            splits = info.splits
            if split not in splits:
                raise DataError(f"TFDS dataset {name!r} has no split {split!r} "
                                f"(splits: {', '.join(sorted(splits.keys()))})")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"TFDS dataset {name!r} is not prepared in {data_dir or '~/tensorflow_datasets'}: "
                            f"{str(e).splitlines()[0]}") from e
        if not builder.is_prepared() if hasattr(builder, "is_prepared") else False:
            raise DataError(f"TFDS dataset {name!r} is not prepared in {data_dir or '~/tensorflow_datasets'} "
                            f"(run tfds build / download it where there is network)")
        self.builder, self.split, self.tfds = builder, split, tfds
        self.num_examples = int(splits[split].num_examples)
        label = info.features["label"] if "label" in info.features else None
        self.num_classes = int(label.num_classes) if label is not None else 0
        self.name = f"TFDS {name}:{split}"
        file_format = getattr(info, "file_format", None)
        self.sequential = str(getattr(file_format, "value", file_format)) != "array_record"
        if not self.sequential:  # records by index, images left encoded for tf to decode
            self._records = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

    def load(self, index):
        """Record ``index`` of an array_record dataset: (uint8 image, int32 label; -1 without labels)."""
        def fetch(i):
            record = self._records[int(i)]
            return record["image"], np.int32(record.get("label", -1))

        data, label = tf.numpy_function(fetch, [index], (tf.string, tf.int32), stateful=False)
        data.set_shape([])
        label.set_shape([])
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return img, label

    def describe(self, index: int) -> str:
        return f"{self.name} record {index}"

    def host_split(self, process_index: int, process_count: int, drop_remainder: bool):
        return self.tfds.even_splits(self.split, n=process_count, drop_remainder=drop_remainder)[process_index]

    def host_num_examples(self, process_index, process_count, drop_remainder) -> int:
        info = self.builder.info.splits[self.host_split(process_index, process_count, drop_remainder)]
        return int(info.num_examples)

    def dataset(self, process_index: int, process_count: int, shuffle_seed: int | None,
                drop_remainder: bool = True):
        """This host's share as tf.data of (uint8 image dataset-decoded later, label):
        {'image': encoded bytes, 'label'}; files shuffled with ``shuffle_seed`` (None: in order)."""
        read_config = self.tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True)
        return self.builder.as_dataset(
            split=self.host_split(process_index, process_count, drop_remainder),
            shuffle_files=shuffle_seed is not None, read_config=read_config,
            decoders={"image": self.tfds.decode.SkipDecoding()})

    @staticmethod
    def decode(example):
        img = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        label = example.get("label", tf.constant(-1, tf.int64))
        return img, tf.cast(label, tf.int32)


_SLICE = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def parse_split(split: str):
    """'train' -> ('train', None); 'train[:2000]' / 'train[1000:-1000]' -> ('train', slice).
    The TFDS slicing syntax (counts only), also for Fashion-MNIST and ImageFolder."""
    m = _SLICE.match(str(split))
    if not m:
        if "[" in str(split) or "]" in str(split):
            raise DataError(f"cannot parse split {split!r}; slices look like 'train[:2000]' or 'train[100:600]'")
        return str(split), None
    start, stop = (int(v) if v else None for v in (m["start"], m["stop"]))
    return m["base"], slice(start, stop)


def _sliced(n: int, sl, split: str) -> np.ndarray:
    idx = np.arange(n)[sl]
    if len(idx) == 0:
        raise DataError(f"split {split!r} selects no examples (the split has {n})")
    return idx


def make_source(data_cfg, split: str) -> Source:
    kind = str(data_cfg.source)
    if kind in ("fashion_mnist", "image_folder"):
        base, sl = parse_split(split)
    if kind == "fashion_mnist":
        images, labels = load_fashion_mnist(str(data_cfg.path or FASHION_MNIST_DIR), base,
                                            data_cfg.tfds_data_dir)
        if sl is not None:
            idx = _sliced(len(labels), sl, split)
            images, labels = images[idx], labels[idx]
        return ArraySource(images, labels, f"Fashion-MNIST {split}")
    if kind == "image_folder":
        if not data_cfg.path:
            raise DataError("data.path must name the ImageFolder root or an image list (.txt) "
                            "for data.source='image_folder'")
        subset = None if sl is None else (sl, split)
        try:
            paths.check_bucket(str(data_cfg.path))
        except paths.PathError as e:
            raise DataError(f"data.path {data_cfg.path}: {e}") from None
        if paths.isfile(str(data_cfg.path)):
            return ListSource(str(data_cfg.path), subset)
        folder, labeled = _resolve_folder_split(str(data_cfg.path), base)
        return FolderSource(folder, subset, labeled=labeled)
    if kind == "tfds":
        if not data_cfg.tfds_name:
            raise DataError("data.tfds_name must be set for data.source='tfds'")
        return TfdsSource(str(data_cfg.tfds_name), split, data_cfg.tfds_data_dir)
    raise DataError(f"unknown data.source {kind!r}; expected fashion_mnist, image_folder or tfds")

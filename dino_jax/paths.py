"""The one path layer: every path a user gives (workdir, checkpoints, logs, init_from,
exports, image folders and lists, evaluation inputs and outputs) is read and written
through here, so a ``gs://`` URL works wherever a local path does.

It is a thin layer over ``etils.epath``, which Orbax already uses. For ``gs://`` epath
picks ``tf.io.gfile`` when TensorFlow is installed, unless ``EPATH_USE_TF=false``;
this module sets that default (a user's own ``EPATH_USE_TF`` wins), so ``gs://`` goes
through gcsfs (fsspec) in every process, with or without TensorFlow. gcsfs, like
TensorStore (the arrays of Orbax checkpoints) and google-cloud-storage (TensorBoard
events), reads the client libraries' standard settings: application default
credentials, and ``STORAGE_EMULATOR_HOST`` / ``TENSORSTORE_GCS_HTTP_URL`` for another
GCS endpoint (an emulator, a GCS-compatible store). TensorFlow's own GCS client has no
endpoint setting, which is one more reason not to route ``gs://`` through it.

GCS has no append and no rename: :func:`append_text` rewrites the object,
:func:`move_tree` copies then deletes (see the functions).
"""
from __future__ import annotations

import os

os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// through gcsfs, not tf.io.gfile (module doc)

import fsspec.config  # noqa: E402
from etils import epath  # noqa: E402

# No cached listings: TensorStore (checkpoint arrays) and the other hosts write to the
# bucket behind gcsfs's back, so a cached listing would miss their new steps.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

Path = epath.Path


class PathError(ValueError):
    """A path that cannot be used (missing bucket, no permission): one line for the user."""


def is_remote(path) -> bool:
    """True for a URL (``gs://``, ``s3://``...), False for a local path."""
    return "://" in os.fspath(path)


def abspath(path) -> str:
    """A local path made absolute; a URL unchanged."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
    """``os.path.join`` that keeps a URL's ``scheme://``."""
    path = os.fspath(path)
    if is_remote(path):
        return "/".join([path.rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(path, *parts)


def dirname(path) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def basename(path) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path) -> bool:
    return Path(path).exists()


def isdir(path) -> bool:
    return Path(path).is_dir()


def isfile(path) -> bool:
    p = Path(path)
    return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
    """Names (not paths) of the entries of directory ``path``."""
    return sorted(p.name for p in Path(path).iterdir())


def makedirs(path) -> None:
    """Create ``path`` and its parents (object stores: checks the bucket only)."""
    check_bucket(path)
    Path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path) -> bytes:
    return Path(path).read_bytes()


def read_text(path) -> str:
    return Path(path).read_text()


def write_bytes(path, data: bytes) -> None:
    """Write a whole file. On an object store the upload is one object (all or nothing);
    locally a temporary file beside it is renamed over it."""
    if is_remote(path):
        Path(path).write_bytes(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def append_text(path, text: str) -> None:
    """Append ``text``. Objects cannot be appended to (gcsfs's mode 'a' silently
    replaces the object), so a URL's object is read and written back whole."""
    if is_remote(path):
        p = Path(path)
        old = p.read_bytes() if p.exists() else b""
        p.write_bytes(old + text.encode())
        return
    with open(path, "a") as f:
        f.write(text)


def open_file(path, mode: str = "r"):
    """A file object (``mode`` 'r', 'rb', 'w', 'wb'); use :func:`append_text` to append."""
    return Path(path).open(mode)


def readable(path):
    """What a reader that wants a file name or a file object takes: a local path as it
    is, a URL's object read whole into memory (``io.BytesIO``)."""
    if not is_remote(path):
        return os.fspath(path)
    import io  # noqa: PLC0415

    return io.BytesIO(read_bytes(path))


def staging_file(path) -> str:
    """A temporary local file to write ``path``'s content into before :func:`publish`:
    beside ``path`` on disk (same file system: the publish is a rename); in the
    system's temporary folder for a URL."""
    name = f".tmp-{os.getpid()}-{basename(path)}"
    if is_remote(path):
        import tempfile  # noqa: PLC0415

        return os.path.join(tempfile.gettempdir(), name)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, name)


def publish(staged: str, path) -> None:
    """Put the finished local file ``staged`` at ``path``: a rename on disk, one upload
    (one object, all or nothing) to a URL; ``staged`` is gone afterwards."""
    if not is_remote(path):
        os.replace(staged, path)
        return
    try:
        check_bucket(path)
        import fsspec  # noqa: PLC0415

        fs, remote = fsspec.core.url_to_fs(os.fspath(path))
        fs.put_file(staged, remote)
    finally:
        os.remove(staged)


def rmtree(path) -> None:
    Path(path).rmtree()


def walk_files(folder) -> list[tuple[str, list[str]]]:
    """(directory, sorted file names) for ``folder`` and every directory below it
    (local: symbolic links followed), directories in sorted path order."""
    folder = os.fspath(folder)
    if not is_remote(folder):
        return [(d, sorted(names)) for d, _, names in sorted(os.walk(folder, followlinks=True))]
    import fsspec  # noqa: PLC0415 - what epath uses for URLs

    # One paginated listing of every object below ``folder`` (not a request per folder).
    fs, root = fsspec.core.url_to_fs(folder)
    scheme = folder.split("://", 1)[0] + "://"
    by_dir: dict[str, list[str]] = {}
    for name in fs.find(root):
        d, base = name.rsplit("/", 1)
        by_dir.setdefault(scheme + d, []).append(base)
    return sorted((d, sorted(names)) for d, names in by_dir.items())


def move_tree(src, dst) -> None:
    """Move directory ``src`` to ``dst`` (``dst`` must not exist).

    Locally one atomic rename. An object store has no rename: every object is copied
    to ``dst`` first, then the originals are deleted, the ``skip_first`` names (for
    Orbax's ``commit_success.txt``: the step stops counting as complete) before the
    rest, so an interruption leaves either the untouched original or a full copy."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src):
        os.rename(src, dst)
        return
    src, dst = src.rstrip("/"), dst.rstrip("/")
    files = [join(d, n) for d, names in walk_files(src) for n in names]
    for f in files:
        Path(f).copy(Path(dst + f[len(src):]), overwrite=False)
    markers = [f for f in files if basename(f) == "commit_success.txt"]
    for f in markers + [f for f in files if basename(f) != "commit_success.txt"]:
        Path(f).unlink()
    if Path(src).exists():  # a directory placeholder object, if the store keeps one
        Path(src).rmtree()


def check_bucket(path) -> None:
    """For a ``gs://`` URL: one-line :class:`PathError` when its bucket does not exist
    or cannot be read with the credentials at hand; nothing for other paths."""
    path = os.fspath(path)
    if not path.startswith("gs://"):
        return
    bucket = path[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise PathError(f"{path}: no bucket name")
    try:
        import fsspec  # noqa: PLC0415 - gcsfs through fsspec, as epath does

        fsspec.filesystem("gs").info(f"gs://{bucket}")
    except FileNotFoundError:
        raise PathError(f"bucket gs://{bucket} does not exist (create it: gcloud storage buckets "
                        f"create gs://{bucket})") from None
    except Exception as e:  # noqa: BLE001 - 401/403, no credentials, network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        denied = isinstance(e, PermissionError) or "Forbidden" in first or "Unauthorized" in first
        raise PathError(f"{'access denied to' if denied else 'cannot use'} bucket gs://{bucket} "
                        f"({type(e).__name__}: {first}); check the credentials (gcloud auth "
                        f"application-default login) and the bucket's permissions") from None

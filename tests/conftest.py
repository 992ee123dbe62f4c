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


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS server emulator (gcp-storage-emulator, in memory) on 127.0.0.1, started here
    and stopped at the end of the session. Yields the environment that points every GCS
    client at it: the client libraries' own settings, nothing of dino_jax's
    (``STORAGE_EMULATOR_HOST``: gcsfs and google-cloud-storage; ``TENSORSTORE_GCS_HTTP_URL``
    and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: TensorStore). gcsfs's bucket-type lookup calls
    the Storage Control gRPC API, which the emulator does not serve:
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips it (it only warns when it fails). The
    environment is also set in this process while the session lasts."""
    pytest.importorskip("gcp_storage_emulator", reason="pip install 'dino_jax[test]' installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs_emulator") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory"], stdout=log, stderr=subprocess.STDOUT)
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

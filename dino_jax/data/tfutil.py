"""The one place TensorFlow is imported: CPU only, quiet, never on the accelerator."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no C++ info logs

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")  # tf.data must never take accelerator memory
except RuntimeError:  # already initialised by the caller: its choice stands
    pass

# tf.data parallelises over examples (parallel map); an op that also splits itself
# over the intra-op pool only adds contention, so each op runs on one thread
# (benchmarks/README.md). TF_NUM_INTRAOP_THREADS (read by TF itself) still overrides this.
if "TF_NUM_INTRAOP_THREADS" not in os.environ:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised by the caller: its choice stands
        pass

"""The one place TensorFlow is imported: CPU only, quiet, never on the accelerator."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")  # tf.data must never take accelerator memory
except RuntimeError:  # already initialised by the caller: its choice stands
    pass

# tf.data parallelises over examples (parallel map); an op that also splits itself
# over the intra-op pool only adds contention: on 2 cores the multi-crop pipeline ran
# at 89 img/s with the default (one intra-op thread per core) and 121 img/s with 1.
# TF_NUM_INTRAOP_THREADS (read by TF itself) still overrides this.
if "TF_NUM_INTRAOP_THREADS" not in os.environ:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised by the caller: its choice stands
        pass

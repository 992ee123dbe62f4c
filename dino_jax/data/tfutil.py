"""The one place TensorFlow is imported: CPU only, quiet, never on the accelerator."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")  # tf.data must never take accelerator memory
except RuntimeError:  # already initialised by the caller: its choice stands
    pass

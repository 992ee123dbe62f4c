import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dino_jax import runtime  # noqa: E402

# Keep TF/XLA quiet and single-process friendly on the 2-core CI machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Faster XLA:CPU for these small models; inherited by subprocess tests (which also
# re-execute themselves under tcmalloc when it is installed: dino_jax/runtime.py).
runtime.set_xla_cpu_defaults()

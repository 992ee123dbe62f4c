import os

# Keep TF/XLA quiet and single-process friendly on the 2-core CI machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

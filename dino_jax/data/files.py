"""Image-file facts shared by the training sources and the evaluation tools, free of
TensorFlow (importing this module does not import it): the ImageNet mean/std, the
image extensions read, and the one folder walk (local or ``gs://``, :mod:`dino_jax.paths`)."""
from __future__ import annotations

from dino_jax import paths

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_images(folder: str) -> list[str]:
    """Paths (``paths.join(dirpath, name)``) of the image files under ``folder``,
    recursively, following links: directories in sorted path order, files sorted by
    name within each (the order ImageFolder training and the evaluation tools use)."""
    out = []
    for dirpath, names in paths.walk_files(folder):
        out.extend(paths.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    return out

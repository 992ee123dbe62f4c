"""ViT-Ti/16: not an official release; the official code's defaults on vit_tiny.

    python -m dino_jax.main --config=configs/vit_t16.py --workdir=DIR \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

A cheap model for smaller budgets and ablations (100 epochs, global batch 512).
Sized for: 4-8 GPUs or a TPU v3-8 / v4-8 / v5e-8; on one GPU use
--config.batch_size=256 --config.momentum_teacher=0.9995 (see vit_s16_1gpu.py).
Official result: none (the official README reports no ViT-Ti model; its
smallest, ViT-S/16 for 100 epochs, reaches 69.3% k-NN / 74.0% linear).
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "vit_tiny"
    c.model.patch_size = 16
    c.model.dtype = "auto"            # bfloat16 on GPU/TPU, float32 on CPU
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.evals.knn.every_epochs = 0      # k-NN on ImageNet validation at the end of training
    return c

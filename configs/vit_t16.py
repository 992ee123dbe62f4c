"""ViT-Ti/16: not an official release; the official code's defaults on vit_tiny.

A cheap model for smaller budgets and ablations (100 epochs, batch 512).
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "vit_tiny"
    c.model.patch_size = 16
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.eval_split = "validation"
    return c

"""ViT-S/8 (released dino_deitsmall8 recipe).

Differences from the code defaults, from the released run's arguments (the
args.txt beside the official checkpoint) and the paper's appendix: 800 epochs,
teacher temperature 0.04 -> 0.07 over 30 epochs, norm_last_layer False (the
README: "only safe with vit_small"), 10 local crops, min_lr 1e-5,
global batch 1024 (patch 8 quadruples the tokens: use bfloat16 or remat on
small-memory accelerators).
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "vit_small"
    c.model.patch_size = 8
    c.model.norm_last_layer = False   # released ViT-S recipes
    c.epochs = 800                    # released ViT-S/8
    c.batch_size = 1024               # released runs: 1024 global
    c.teacher_temp = 0.07             # README "boost" settings
    c.warmup_teacher_temp_epochs = 30
    c.min_lr = 1e-5
    c.data.num_local_crops = 10       # paper: 2x224 + 10x96 for the released models
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.eval_split = "validation"
    c.knn_every_epochs = 10
    return c

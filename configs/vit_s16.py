"""ViT-S/16, the official README's "vanilla" run: 100 epochs, 8 GPUs x 64 = 512.

python main_dino.py --arch vit_small (all code defaults). Reaches 69.3% k-NN /
74.0% linear on ImageNet per the official README. The boosted 300-epoch variant
adds: --config.epochs=300 --config.teacher_temp=0.07
--config.warmup_teacher_temp_epochs=30 --config.model.norm_last_layer=False.
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "vit_small"
    c.model.patch_size = 16
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.eval_split = "validation"
    return c

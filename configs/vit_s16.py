"""ViT-S/16, the official README's "vanilla" run: 100 epochs, global batch 512.

    python -m dino_jax.main --config=configs/vit_s16.py --workdir=DIR \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Sized for: one node of 8 GPUs (8 x 64 = 512, the official run: 1.75 days on
8 V100s), or a TPU v5e-16 slice (every host runs the same command;
docs/tpu_memory.md). One GPU: configs/vit_s16_1gpu.py.
Official result (README, "Vanilla DINO training"): 69.3% k-NN, 74.0% linear on
ImageNet. The official command is ``main_dino.py --arch vit_small`` (all code
defaults); model.dtype 'auto' computes in bfloat16 on GPU/TPU (official: fp16).
The boosted 300-epoch variant (README: 73.3% k-NN, 76.0% linear) adds
--config.epochs=300 --config.teacher_temp=0.07
--config.warmup_teacher_temp_epochs=30 --config.model.norm_last_layer=False.
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "vit_small"
    c.model.patch_size = 16
    c.model.dtype = "auto"            # bfloat16 on GPU/TPU, float32 on CPU
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.evals.knn.every_epochs = 0      # k-NN on ImageNet validation at the end of training
    return c

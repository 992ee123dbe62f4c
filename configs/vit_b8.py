"""ViT-B/8 (released dino_vitbase8 recipe): the most expensive DINO model.

    python -m dino_jax.main --config=configs/vit_b8.py --workdir=DIR \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Sized for: global batch 1024 on 16+ GPUs of 32-80 GB, or a TPU v5e-16 slice with
--config.model.remat=True (every host runs the same command; docs/tpu_memory.md);
add --config.model.remat=True where memory is short.
Official result (README, pretrained models): 77.4% k-NN, 80.1% linear on
ImageNet (the released model; 300 epochs).

As ViT-B/16 (see vit_b16.py) with patch 8 and 300 epochs (released run). At
patch 8 a 224 crop is 785 tokens: plan on bfloat16 (model.dtype) and remat, or
fsdp (num_fsdp) for the optimiser state, on 16-40 GB accelerators.
"""
from dino_jax.config_defaults import sibling_config


def get_config():
    c = sibling_config(__file__, "vit_b16.py")
    c.model.patch_size = 8
    c.epochs = 300
    return c

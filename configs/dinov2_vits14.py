"""DINOv2 ViT-S/14 distilled (21 M parameters), as the DINOv2 hub builds it
(``torch.hub.load("facebookresearch/dinov2", "dinov2_vits14")``).

The released weights, converted (docs/dinov2.md lists every file):

    python -m dino_jax.convert torch2jax --input dinov2_vits14_pretrain.pth --output DIR

give a params dir that every evaluator and extract take with --checkpoint DIR. This
config gives the same architecture to the DINO trainer:

    python -m dino_jax.main --config=configs/dinov2_vits14.py --workdir=DIR \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

which trains with DINO's objective (DINOv2's own recipe, with iBOT, KoLeo and its
data, is not implemented) at DINO's 224 px global crops and 98 px local crops (DINOv2's
size for patch 14); the 37 x 37 position grid of the 518 px hub model is interpolated
to each crop.
Sized for: feature extraction and evaluation on one GPU or TPU host; a train step's memory per
chip: python benchmarks/tpu_aot.py --config configs/dinov2_vits14.py.
Official result (DINOv2 README, the released weights): 79.0% k-NN, 81.1% linear on
ImageNet.
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "vit_small"
    c.model.patch_size = 14
    c.model.img_size = 518            # the hub models' position grid: 37 x 37
    c.model.layerscale_init = 1.0     # hub: init_values=1.0
    c.model.mask_token = True         # a parameter of the released weights
    c.model.dtype = "auto"            # bfloat16 on GPU/TPU, float32 on CPU
    c.data.local_crop_size = 98       # a multiple of the patch (DINOv2's train configs for /14: 98)
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    return c

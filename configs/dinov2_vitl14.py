"""DINOv2 ViT-L/14 distilled (300 M parameters), as the DINOv2 hub builds it
(``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")``).

The released weights, converted (docs/dinov2.md lists every file):

    python -m dino_jax.convert torch2jax --input dinov2_vitl14_pretrain.pth --output DIR

give a params dir that every evaluator and extract take with --checkpoint DIR. This
config gives the same architecture to the DINO trainer:

    python -m dino_jax.main --config=configs/dinov2_vitl14.py --workdir=DIR \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

which trains with DINO's objective (DINOv2's own recipe, with iBOT, KoLeo and its
data, is not implemented) at DINO's 224 px global crops and 98 px local crops (DINOv2's
size for patch 14); the 37 x 37 position grid of the 518 px hub model is interpolated
to each crop.
Sized for: feature extraction and evaluation on one GPU or TPU host; a train step's memory per
chip: python benchmarks/tpu_aot.py --config configs/dinov2_vitl14.py.
Official result (DINOv2 README, the released weights): 83.5% k-NN, 86.3% linear on
ImageNet.
"""
from dino_jax.config_defaults import sibling_config


def get_config():
    c = sibling_config(__file__, "dinov2_vits14.py")   # the hub's shared settings (patch 14, 518 px, LayerScale)
    c.model.arch = "custom"           # DINOv2's vit_large:
    c.model.embed_dim = 1024
    c.model.depth = 24
    c.model.num_heads = 16
    return c

"""DINOv2 ViT-g/14 (1,100 M parameters), as the DINOv2 hub builds it
(``torch.hub.load("facebookresearch/dinov2", "dinov2_vitg14")``).

Convert the released weights (docs/dinov2.md lists every file) with
``python -m dino_jax.convert torch2jax --input dinov2_vitg14_pretrain.pth --output DIR``, or train
this architecture with DINO's objective as ``configs/dinov2_vits14.py`` explains:

    python -m dino_jax.main --config=configs/dinov2_vitg14.py --workdir=DIR

Sized for: feature extraction and evaluation on one GPU or TPU host (train-step memory:
docs/tpu_memory.md).
Official result (DINOv2 README, the released weights): 83.5% k-NN, 86.5% linear on
ImageNet.
"""
from dino_jax.config_defaults import sibling_config


def get_config():
    c = sibling_config(__file__, "dinov2_vits14.py")   # the hub's shared settings (patch 14, 518 px, LayerScale)
    c.model.arch = "custom"           # DINOv2's vit_giant2:
    c.model.embed_dim = 1536
    c.model.depth = 40
    c.model.num_heads = 24
    c.model.ffn = "swiglu"            # hub: ffn_layer="swiglufused"
    return c

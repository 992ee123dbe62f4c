"""DINOv2 ViT-B/14 distilled with 4 registers (86 M parameters), as the DINOv2 hub builds it
(``torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14_reg")``).

Convert the released weights (docs/dinov2.md lists every file) with
``python -m dino_jax.convert torch2jax --input dinov2_vitb14_reg4_pretrain.pth --output DIR``, or train
this architecture with DINO's objective as ``configs/dinov2_vits14.py`` explains:

    python -m dino_jax.main --config=configs/dinov2_vitb14_reg.py --workdir=DIR

Sized for: feature extraction and evaluation on one GPU or TPU host (train-step memory:
docs/tpu_memory.md).
Official result (DINOv2 README, the released weights): 82.0% k-NN, 84.6% linear on
ImageNet.
"""
from dino_jax.config_defaults import sibling_config


def get_config():
    c = sibling_config(__file__, "dinov2_vitb14.py")   # the same backbone ...
    c.model.num_register_tokens = 4                 # ... with 4 register tokens,
    c.model.interpolate_offset = 0.0                # hub _reg: resize to the exact grid ...
    c.model.interpolate_antialias = True            # ... with antialiasing
    return c

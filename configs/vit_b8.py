"""ViT-B/8 (released dino_vitbase8 recipe): the most expensive DINO model.

As ViT-B/16 (see vit_b16.py) with patch 8 and 300 epochs (released run). At
patch 8 a 224 crop is 785 tokens: plan on bfloat16 (model.dtype) and remat, or
fsdp (num_fsdp) for the optimiser state, on 16-40 GB accelerators.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "vit_b16_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_b16.py"))
_b16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_b16)


def get_config():
    c = _b16.get_config()
    c.model.patch_size = 8
    c.epochs = 300
    return c

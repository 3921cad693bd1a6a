"""CLIP ViT-L/14: FSDP over 8 devices per data replica, remat, bf16 compute. ``clip_l14:het`` for HET-XL.

Sized for hosts of 8 accelerators (each host one FSDP group, data parallel across hosts) at batch 32,768.
"""
from hetclip.configs._base import base_config, variants, imagenet_eval


def get_config(arg: str = ""):
    c = base_config("L/14", het="het" in variants(arg), remat=True, dtype="bfloat16")
    c.mesh.fsdp = 8
    c.optim.lr = 4e-4
    c.evals = [imagenet_eval()]  # set its dir: --config.evals.0.dir=/data/imagenet/val
    return c

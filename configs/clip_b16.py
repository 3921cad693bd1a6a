"""CLIP ViT-B/16 on image–text shards. ``clip_b16:het`` switches the HET-XL head on.

Sized like ``clip_b32`` (a TPU pod slice or several 8-GPU hosts, batch 32,768); 4x the image tokens, so
``accum_steps`` or ``model.remat`` sooner on smaller setups.
"""
from hetclip.configs._base import base_config, variants, imagenet_eval


def get_config(arg: str = ""):
    c = base_config("B/16", het="het" in variants(arg))
    c.evals = [imagenet_eval()]  # set its dir: --config.evals.0.dir=/data/imagenet/val
    return c

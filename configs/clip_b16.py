"""CLIP ViT-B/16 on image–text shards. ``clip_b16:het`` switches the HET-XL head on."""
from hetclip.configs._base import base_config, variants, imagenet_task


def get_config(arg: str = ""):
    c = base_config("B/16", het="het" in variants(arg))
    c.eval.tasks = [imagenet_task()]
    c.eval.every_steps = 5000
    return c

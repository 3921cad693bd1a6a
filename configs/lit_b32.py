"""LiT (Zhai et al. 2022): a locked, pretrained image tower and a text tower trained from scratch.

    hetclip-train --config lit_b32 --config.init_from_hf=/models/clip-vit-base-patch32 \
        --config.data.shards=... --config.data.tokenizer.path=/models/clip-vit-base-patch32

``lit_b32:het`` adds a HET-XL head on the locked image features (the head is trained).

Sized like ``clip_b32`` (batch 32,768 on a TPU pod slice or several 8-GPU hosts); the locked image tower
needs no gradients, so a step needs less memory and compute than clip_b32's.
"""
from hetclip.configs._base import base_config, variants, imagenet_eval


def get_config(arg: str = ""):
    c = base_config("B/32", het="het" in variants(arg))
    c.init_from_hf_groups = ("image",)  # the text tower, head and temperature start from scratch
    c.freeze.image = True
    c.optim.lr = 1e-3
    c.total_samples = 3_000_000_000
    c.evals = [imagenet_eval()]  # set its dir: --config.evals.0.dir=/data/imagenet/val
    return c

"""CLIP ViT-B/32 on image–text shards. ``clip_b32:het`` switches the HET-XL head on.

Sized for a TPU pod slice or several 8-GPU hosts: CLIP's global batch of 32,768 in fp32, no FSDP or
remat. On fewer devices keep the batch with ``accum_steps`` (or ``model.dtype=bfloat16``, ``model.remat``).

    hetclip-train --config clip_b32[:het] --config.data.shards='/data/laion/{00000..41407}.tar' \
        --config.data.tokenizer.path=/models/clip-tokenizer --config.evals.0.dir=/data/imagenet/val
"""
from hetclip.configs._base import base_config, variants, imagenet_eval


def get_config(arg: str = ""):
    c = base_config("B/32", het="het" in variants(arg))
    c.evals = [imagenet_eval()]  # set its dir: --config.evals.0.dir=/data/imagenet/val
    return c

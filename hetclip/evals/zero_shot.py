"""Zero-shot classification: a class-folder tree, ``.cls`` shards or ImageNet's validation folders, with
one prompt classifier built from the class names and templates (``hetclip.zero_shot.evaluate``)."""
from __future__ import annotations

from hetclip.config import ConfigError

DEFAULTS = {
    "dir": "",                # data: class folders, .cls shards, or ImageNet val (layout="imagenet")
    "layout": "auto",         # auto: folders or shards with their own class names; imagenet: WNID folders
    "classnames": "",         # a file or "" (the data's own)
    "templates": "clip80",    # a template set (clip80, clip7, bare) or a file
    "batch_size": 256,
    "mc_samples": 0,          # HET-XL Monte-Carlo samples for the predictive (0: deterministic only)
    "limit": 0,               # at most this many images (0: all)
    "canonicalize": False,    # lower-case and strip punctuation from class names and prompts
    "per_image": False,       # keep each image's prediction, confidence, entropy and noise size
    "text_batch_size": 256,
    "max_bad_fraction": 0.01, # more unusable images than this fraction is an error
    "cache_dir": "",          # cache the prompt classifier's weights here ("": no cache)
}
LAYOUTS = ("auto", "imagenet")


class Evaluator:
    def __init__(self, spec: dict, ctx):
        if spec["layout"] not in LAYOUTS:
            raise ConfigError(f"evaluator {spec['name']!r}: layout={spec['layout']!r} is not one of {LAYOUTS}")
        if spec["layout"] == "imagenet" and spec["classnames"]:
            raise ConfigError(f"evaluator {spec['name']!r}: layout='imagenet' uses the built-in ImageNet class "
                              "names; leave classnames empty")
        if spec["batch_size"] < 1 or spec["text_batch_size"] < 1 or spec["mc_samples"] < 0 or spec["limit"] < 0:
            raise ConfigError(f"evaluator {spec['name']!r}: batch sizes must be >= 1, mc_samples and limit >= 0")
        if spec["mc_samples"] and ctx.model_cfg is not None and not ctx.model_cfg.het.enabled:
            raise ConfigError(f"evaluator {spec['name']!r}: mc_samples={spec['mc_samples']} needs the HET-XL head "
                              "(model.het.enabled=False)")
        self.spec, self.ctx = spec, ctx

    def run(self, encoders) -> dict:
        from hetclip.zero_shot.evaluate import run_zero_shot

        s, ctx = self.spec, self.ctx
        return run_zero_shot(encoders, ctx.tokenizer, s["dir"], classnames=s["classnames"] or None,
                             templates=s["templates"], image_size=ctx.input_size, imagenet=s["layout"] == "imagenet",
                             canonicalize=s["canonicalize"], batch_size=s["batch_size"],
                             text_batch_size=s["text_batch_size"], mc_samples=s["mc_samples"],
                             limit=s["limit"] or None, seed=ctx.seed, workers=ctx.workers,
                             resize_size=ctx.resize_size, max_bad_fraction=s["max_bad_fraction"],
                             model_id=ctx.model_id, cache_dir=s["cache_dir"] or None, shard=ctx.shard,
                             progress=ctx.progress, per_image=s["per_image"], mesh=ctx.mesh)

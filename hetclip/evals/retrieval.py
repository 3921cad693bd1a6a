"""Image-text retrieval recall@{1,5,10} both ways on webdataset shards (``KEY.<image>`` + ``KEY.txt``,
one caption a line, or ``KEY.json``)."""
from __future__ import annotations

from hetclip.config import ConfigError

DEFAULTS = {
    "dir": "",          # shards (a brace pattern)
    "batch_size": 256,
    "text_batch_size": 256,
    "limit": 0,         # at most this many images (0: all)
    "max_bad_fraction": 0.01,
}


class Evaluator:
    def __init__(self, spec: dict, ctx):
        if spec["batch_size"] < 1 or spec["text_batch_size"] < 1 or spec["limit"] < 0:
            raise ConfigError(f"evaluator {spec['name']!r}: batch sizes must be >= 1 and limit >= 0")
        self.spec, self.ctx = spec, ctx

    def run(self, encoders) -> dict:
        from hetclip.zero_shot.evaluate import run_retrieval

        s, ctx = self.spec, self.ctx
        return run_retrieval(encoders, ctx.tokenizer, s["dir"], ctx.input_size, batch_size=s["batch_size"],
                             text_batch_size=s["text_batch_size"], limit=s["limit"] or None, workers=ctx.workers,
                             resize_size=ctx.resize_size, max_bad_fraction=s["max_bad_fraction"], shard=ctx.shard,
                             progress=ctx.progress, mesh=ctx.mesh)

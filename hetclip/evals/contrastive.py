"""The training loss on held-out image-text shards: the model's own contrastive loss (CLIP softmax,
SigLIP sigmoid or the HET-XL Monte-Carlo softmax, ``hetclip.losses.for_model``) over fixed-size batches of
the data, each batch its own set of negatives, averaged over the batches. A last batch smaller than
``batch_size`` is left out (its loss would use fewer negatives); the report says how many images that was."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hetclip.config import ConfigError

DEFAULTS = {
    "dir": "",          # image-text shards (KEY.<image> + KEY.txt or KEY.json; the first caption is used)
    "batch_size": 256,  # the negatives of each example, as in training
    "limit": 0,         # at most this many images (0: all)
}


class Evaluator:
    def __init__(self, spec: dict, ctx):
        from hetclip import distributed as dist
        from hetclip import losses
        from hetclip.model import DualEncoder, loss_embeddings, normalize_images

        if spec["batch_size"] < 2 or spec["limit"] < 0:
            raise ConfigError(f"evaluator {spec['name']!r}: batch_size must be >= 2 and limit >= 0")
        self.spec, self.ctx = spec, ctx
        self.mesh = ctx.mesh if ctx.mesh is not None else dist.make_mesh(-1, 1)
        if spec["batch_size"] % self.mesh.devices.size:
            raise ConfigError(f"evaluator {spec['name']!r}: batch_size={spec['batch_size']} must be a multiple of "
                              f"the {self.mesh.devices.size} devices")
        self.sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        model = DualEncoder(ctx.model_cfg)
        loss_of = losses.for_model(ctx.model_cfg, self.mesh, tuple(self.mesh.axis_names))

        def value(params, images, tokens, key):
            batch = {"image": normalize_images(images), "text": tokens}
            emb = loss_embeddings(model, params, batch, train=False)
            return loss_of(emb, model.apply({"params": params}, method=DualEncoder.loss_inputs), key)

        self._value = jax.jit(value)

    def run(self, encoders) -> dict:
        from hetclip.zero_shot import datasets as ds
        from hetclip.zero_shot.evaluate import put_batch

        s, ctx = self.spec, self.ctx
        source = ds.WdsRetrieval(s["dir"])
        batches = ds.eval_batches(source, ctx.input_size, s["batch_size"], workers=ctx.workers,
                                  limit=s["limit"] or None, resize_size=ctx.resize_size)
        key = jax.random.key(ctx.seed)
        losses_, left_out = [], 0
        try:
            for batch in batches:
                captions = batch["label"]
                if len(captions) < s["batch_size"]:
                    left_out += len(captions)
                    continue
                tokens = np.asarray(ctx.tokenizer([c[0] if not isinstance(c, str) else c for c in captions]),
                                    np.int32)
                value, _ = self._value(encoders.params, put_batch(np.asarray(batch["image"]), self.sharding),
                                       put_batch(tokens, self.sharding), jax.random.fold_in(key, len(losses_)))
                losses_.append(value)
        finally:
            batches.close()
        if not losses_:
            raise ValueError(f"evaluator {s['name']!r}: {s['dir']} holds fewer than batch_size={s['batch_size']} "
                             "usable samples")
        values = np.asarray(jax.device_get(losses_), np.float64)
        return {"metrics": {"loss": float(values.mean()), "loss_std_over_batches": float(values.std()),
                            "num_batches": int(values.size), "num_images": int(values.size * s["batch_size"]),
                            "images_left_out": int(left_out)},
                "dataset": dict(source.describe(), **ds.skipped_summary(batches)),
                "batch_size": int(s["batch_size"])}

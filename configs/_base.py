"""Shared defaults of every recipe; each recipe file changes what differs."""
import ml_collections

from hetclip.config import ConfigError
from hetclip.data.decode import DEFAULT_CROP_SCALE
from hetclip.model import preset
from hetclip.suggest import did_you_mean

VARIANTS = ("het",)


def variants(arg: str, allowed=VARIANTS) -> set:
    """The comma-separated variants after ``recipe:`` (``clip_b32:het``); an unknown one is an error."""
    flags = {a.strip() for a in (arg or "").split(",") if a.strip()}
    for flag in sorted(flags - set(allowed)):
        raise ConfigError(f"unknown recipe variant {flag!r}; this recipe knows {list(allowed)}"
                          + did_you_mean(flag, allowed))
    return flags


def base_config(model: str = "B/32", *, het: bool = False, **model_overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""  # default: runs/<recipe>
    c.batch_size = 32768
    c.accum_steps = 1  # micro-batches per step; the whole batch stays the negatives
    c.total_steps = 0  # 0: derived from total_samples
    c.total_samples = 12_800_000_000
    c.log_every = 50
    c.tensorboard = True

    # Model: a full ModelConfig; vocabulary/eos/context follow the tokenizer when model_from_tokenizer.
    # The HET-XL head's settings are HetConfig's defaults (hetclip.heads).
    if het:
        model_overrides.setdefault("het", dict(enabled=True))
    c.model = preset(model, **model_overrides).to_dict()
    c.model_from_tokenizer = True
    c.init_from_hf = ""  # a Hugging Face CLIP directory to initialise the towers from
    # ... which parameter groups it gives (the others keep their initialisation); ("image",) for LiT.
    c.init_from_hf_groups = ("image", "text", "head", "temperature")

    # Optimizer (HET-XL paper / big_vision defaults for contrastive pretraining).
    c.optim = dict(lr=5e-4, warmup_init_lr=1e-5, warmup_steps=10_000, schedule="cosine", end_lr=0.0,
                   rsqrt_timescale=10_000, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
                   lr_mults=dict(image=1.0, text=1.0, head=1.0, temperature=1.0),
                   # weight_decay x this per group (only matrices are decayed)
                   wd_mults=dict(image=1.0, text=1.0, head=1.0, temperature=1.0))
    # freeze.temperature keeps τ at its initial value (the "fixed temperature" baseline).
    c.freeze = dict(image=False, text=False, head=False, temperature=False)

    c.data = dict(
        shards="",  # brace pattern(s) of img2dataset shards
        epoch_size=0,  # samples per epoch; 0: from sizes.json
        image_size=preset(model).vision.image_size,
        caption_key="txt",
        crop_scale=DEFAULT_CROP_SCALE,  # the random resized crop's area range (hetclip.data.decode)
        shuffle_buffer=10_000,
        max_bad_fraction=0.01,  # of the samples read: undecodable, no caption ...
        max_bad_shard_fraction=0.01,  # of the shards: unreadable, truncated or empty (listed in summary.json)
        num_workers=2,  # data worker processes per host; batches depend on it (a resume needs the same count)
        epochs=1000,
        synthetic=False,
        tokenizer=dict(kind="hf", path="", context_length=77, lower_case=True),
    )
    c.mesh = dict(data=-1, fsdp=1)
    c.checkpoint = dict(every_steps=1000, keep=3, async_save=True)
    # Evaluators (hetclip.evals): each runs every `every_steps` steps (0: not during training) and at the end.
    c.evals = []
    c.export = dict(format="", dir="")
    c.demo = dict(enabled=False, dir="", params=dict())
    return c


def imagenet_eval(path: str = "", every_steps: int = 5000) -> dict:
    """Zero-shot ImageNet (its validation folders) with CLIP's 80 prompts."""
    return dict(kind="zero_shot", name="imagenet", dir=path, layout="imagenet", templates="clip80",
                every_steps=every_steps, at_end=True, batch_size=256, mc_samples=0, limit=0)

"""The README's main job: a tiny dual encoder on the built-in demo data, minutes on 2 CPU cores.

    hetclip-train --config demo                 # DET
    hetclip-train --config demo:het             # HET-XL head
    hetclip-train --config demo:het --config.demo.params.noise_prob=0.3

Generates the demo data if missing (``demo.dir``), trains, evaluates zero-shot on the held-out
split (by shape, colour, and shape+colour including unseen pairs) and exports to Hugging Face format.
"""
from hetclip.configs._base import base_config, variants
from hetclip.data.demo import DEFAULTS as DEMO_DEFAULTS, TASKS as DEMO_TASKS


def get_config(arg: str = ""):
    het = "het" in variants(arg)
    c = base_config(
        "tiny", het=het,
        # Sized so that the whole main job stays under 10 minutes on 2 AVX2 cores in fp32 (the captions
        # are short and use ~60 words, so the text tower is the smaller one). 16-pixel patches: 16 tokens
        # per image make a step ~3x cheaper than 8-pixel ones and a ViT this small learns the shapes
        # faster from them (measured on the demo data), so the budget buys ~3x the steps.
        vision=dict(width=160, layers=4, heads=5, patch_size=16, image_size=64),
        text=dict(width=128, layers=2, heads=2, context_length=24),
        embed_dim=128, dtype="auto")  # bf16 where it is fast (AMX, AVX-512 BF16, GPU, TPU)
    if het:
        c.model.het.update(num_factors=8, mc_samples=8, sample_chunk=8)
    c.batch_size = 128
    c.total_steps = 900
    c.log_every = 20
    # Peak 5e-4: zero-shot shape after 900 steps is 52 % at 1e-3, 64 % at 5e-4 and 61 % at 3e-4; 3e-3 is
    # still at 16 % at step 600 (one seed each; docs/PERFORMANCE.md): a high rate keeps the model on the
    # colour shortcut.
    c.optim.update(lr=5e-4, warmup_steps=50, weight_decay=0.1, grad_clip=1.0)
    c.data.update(image_size=64, crop_scale=(0.8, 1.0), shuffle_buffer=2000, num_workers=2,
                  tokenizer=dict(kind="hf", path="", context_length=24, lower_case=True))
    c.checkpoint.update(every_steps=300, keep=2)
    # Zero-shot on the demo's held-out tasks (by shape, colour, shape+colour); their dirs and prompts are
    # filled in from the generated data (hetclip.data.demo.configure).
    c.evals = [dict(kind="zero_shot", name=task, every_steps=0, at_end=True, batch_size=256,
                    mc_samples=16 if het else 0) for task in DEMO_TASKS]
    c.export.update(format="hf", dir="export_hf")
    c.demo.update(enabled=True, dir="demo_data", params=dict(DEMO_DEFAULTS))  # every generator knob
    return c

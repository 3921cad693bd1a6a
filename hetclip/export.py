"""``hetclip-export``: trained encoders for other software.

* ``--format hf``: a Hugging Face ``CLIPModel`` directory (``config.json``, ``model.safetensors``,
  tokenizer files, ``preprocessor_config.json``) that ``transformers.CLIPModel.from_pretrained`` and
  ``CLIPProcessor.from_pretrained`` load offline; the HET-XL head (not part of CLIP) goes beside it as
  ``het_head.safetensors`` + ``het_head.json``, explained in the directory's ``README.md``.
* ``--format stablehlo``: ``jax.export`` serialisations of the image and text encoders (normalised
  deterministic embeddings, symbolic batch dimension, weights embedded as constants) plus
  ``export_spec.json`` (input shapes/dtypes, preprocessing, tokenizer) and the tokenizer files.
  Load with ``jax.export.deserialize(bytes).call(x)``; no hetclip code is needed.

Output directories are written next to the target under a temporary name and renamed into place,
so a failed export leaves nothing behind; a non-empty target is refused unless ``force``.

    hetclip-export --checkpoint runs/b16 --format hf --out exports/b16-hf
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from hetclip import hf
from hetclip.data.decode import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

FORMATS = ("hf", "stablehlo")
TOKENIZER_SUBDIR = "tokenizer"
PROBE_TEXTS = ("a photo of a cat.", "A  RED Square, on the left!", "", "an image " * 40, "Ünïcödé café — 42 déjà vu")


# ------------------------------------------------------------------------------ output directory

@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False):
    """Yield a fresh temporary sibling of ``out_dir``; on success it replaces ``out_dir``, on any
    error it is removed (``out_dir`` untouched). A non-empty ``out_dir`` needs ``force``."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {str(out)!r} is not empty; pass --force (force=True) to replace it")
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):  # parents this call created, innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


# ------------------------------------------------------------------------------------ helpers

def resolve_tokenizer(tokenizer):
    """A hetclip ``Tokenizer`` from an instance, a spec dict or a tokenizer path."""
    if hasattr(tokenizer, "spec") and callable(tokenizer):
        return tokenizer
    from hetclip.data.tokenizers import load_tokenizer

    return load_tokenizer(tokenizer)


def effective_log_scale(model_cfg, params) -> float:
    """``log(1/τ)`` exactly as hetclip applies it (clamped CLIP scale or bounded form)."""
    from hetclip.heads import Temperature

    scale = Temperature(model_cfg.temperature).apply({"params": params["temperature"]})
    return float(math.log(float(scale)))


def preprocess_settings(model_cfg, preprocess: Optional[Mapping[str, Any]]) -> dict:
    """Evaluation preprocessing: resize shortest side (bicubic) + centre crop to ``image_size``, CLIP mean/std."""
    p = dict(preprocess or {})
    size = int(p.get("image_size", model_cfg.vision.image_size))
    if size != model_cfg.vision.image_size:
        raise ValueError(f"preprocess image_size={size} differs from the model's vision.image_size="
                         f"{model_cfg.vision.image_size}")
    mean, std = [float(x) for x in p.get("mean", CLIP_MEAN)], [float(x) for x in p.get("std", CLIP_STD)]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"preprocess mean={mean} / std={std} must be 3 numbers each (std > 0)")
    resize, crop = p.get("resize", "shortest_side_bicubic"), p.get("crop", "center")
    if resize != "shortest_side_bicubic" or crop != "center":
        raise ValueError(f"preprocess resize={resize!r} crop={crop!r}: only 'shortest_side_bicubic' + 'center' "
                         "(CLIP's evaluation transform) can be exported")
    return {"image_size": size, "resize": resize, "crop": crop, "interpolation": "bicubic",
            "mean": mean, "std": std, "input_range": "RGB in [0, 1] after /255, then (x - mean) / std",
            "layout": "NHWC"}


def image_processor_config(settings: Mapping[str, Any]) -> dict:
    """``preprocessor_config.json`` for ``CLIPImageProcessor``."""
    s = settings["image_size"]
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": True, "size": {"shortest_edge": s}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(settings["mean"]), "image_std": list(settings["std"]), "do_convert_rgb": True}


def _tokenizer_source(tok) -> Path:
    spec = tok.spec()
    if "path" not in spec:
        raise ValueError(f"tokenizer spec {spec} has no 'path' to copy files from")
    return Path(spec["path"])


def copy_tokenizer_files(tok, dst: Path) -> Path:
    """Copy the tokenizer's files (directory contents or the single file) into ``dst``; returns
    the path the copied spec should point to."""
    src = _tokenizer_source(tok)
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, dst / f.name)
        return dst
    shutil.copy2(src, dst / src.name)
    # a WordPiece/SentencePiece spec may point at one file; keep siblings such as vocab files too
    return dst / src.name


# ------------------------------------------------------------------------------------ HF export

def prepare_hf(model_cfg, params, tok) -> dict:
    """Everything the HF export writes, computed (and validated) without touching the disk."""
    if tok.kind != "hf":
        raise hf.UnsupportedForHF(f"tokenizer kind={tok.kind!r}: Hugging Face tokenizer files exist only for "
                                  "kind='hf' tokenizers (tokenizer.json); use --format stablehlo, which ships "
                                  "the tokenizer as it is")
    if tok.context_length > model_cfg.text.context_length:
        raise ValueError(f"tokenizer context_length={tok.context_length} exceeds the text tower's "
                         f"text.context_length={model_cfg.text.context_length}")
    if tok.vocab_size > model_cfg.text.vocab_size:
        raise ValueError(f"tokenizer vocab_size={tok.vocab_size} exceeds the model's text.vocab_size="
                         f"{model_cfg.text.vocab_size}")
    notes = hf.check_exportable(model_cfg, tok.eos_token_id)
    log_scale = effective_log_scale(model_cfg, params)
    if model_cfg.temperature.kind == "clip":
        raw = float(np.asarray(params["temperature"]["log_scale"]))
        if raw > log_scale + 1e-6:
            notes.append(f"the learned log_scale={raw:.4f} is clamped by max_scale={model_cfg.temperature.max_scale}; "
                         f"logit_scale is exported as the clamped value {log_scale:.4f}")
    config = hf.hf_config(model_cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, logit_scale=log_scale)
    state = hf.to_hf_state_dict(params, logit_scale=log_scale)
    hf.check_hf_state_dict(state, config)
    het = None
    if model_cfg.het.enabled:
        if "het_head" not in params:
            raise hf.WeightMismatch("model_cfg.het.enabled=True but params have no 'het_head'")
        het = hf.het_head_to_hf(params["het_head"])
    return {"config": config, "state": state, "het": het, "notes": notes, "logit_scale": log_scale}


def _write_tokenizer_hf(tok, out: Path) -> list[str]:
    """Tokenizer files at the top of the HF directory; returns notes on any mismatch with hetclip's ids."""
    copy_tokenizer_files(tok, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg.setdefault("tokenizer_class", "CLIPTokenizer")
    cfg["model_max_length"] = tok.context_length
    cfg.setdefault("eos_token", tok.eos_token)
    cfg.setdefault("pad_token", tok.pad_token)
    if tok.bos_token is not None:
        cfg.setdefault("bos_token", tok.bos_token)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return tokenizer_parity_notes(tok, out)


def tokenizer_parity_notes(tok, directory: Path) -> list[str]:
    """Compare hetclip's ids with ``AutoTokenizer`` from ``directory`` on probe captions."""
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        got = hf_tok(list(PROBE_TEXTS), padding="max_length", max_length=tok.context_length,
                     truncation=True, return_tensors="np")["input_ids"]
    except Exception as e:  # report, do not fail: the weights are still right
        return [f"the exported tokenizer files do not load with AutoTokenizer ({type(e).__name__}: {e})"]
    want = tok(list(PROBE_TEXTS))
    if got.shape != want.shape or not np.array_equal(got, want):
        return ["AutoTokenizer(padding='max_length', truncation=True) from this directory gives different ids "
                f"from hetclip's tokenizer {tok.spec()} on some probe captions; tokenize with hetclip "
                "(`hetclip.data.tokenizers.load_tokenizer`) for exact parity"]
    return []


def _hf_readme(model_cfg, notes: list[str], het: bool, settings: Mapping[str, Any], tok) -> str:
    lines = [
        "# hetclip export (Hugging Face CLIP format)",
        "",
        "A dual encoder trained with hetclip, in the `transformers.CLIPModel` layout.",
        "",
        "```python",
        "from transformers import CLIPModel, CLIPProcessor",
        "model = CLIPModel.from_pretrained(DIR)",
        "processor = CLIPProcessor.from_pretrained(DIR)",
        "inputs = processor(text=[\"a photo of a cat\"], images=image, return_tensors=\"pt\",",
        f"                   padding=\"max_length\", max_length={tok.context_length}, truncation=True)",
        "img = model.get_image_features(pixel_values=inputs[\"pixel_values\"]).pooler_output",
        "txt = model.get_text_features(input_ids=inputs[\"input_ids\"]).pooler_output",
        "```",
        "",
        f"Embedding width {model_cfg.embed_dim}; images {settings['image_size']}x{settings['image_size']} "
        "(resize shortest side, bicubic, centre crop, CLIP mean/std); text context length "
        f"{tok.context_length}, pooled at the first end-of-text token (id {tok.eos_token_id}).",
        "Text embeddings do not depend on padding (causal attention); no attention mask is needed.",
    ]
    if het:
        lines += [
            "",
            "## HET-XL head (`het_head.safetensors`, `het_head.json`)",
            "",
            "The model was trained with a heteroscedastic HET-XL image head: a Gaussian `N(0, V Vᵀ + diag(d²))`",
            "over the (unnormalised) image embedding, predicted from the vision tower's pooled output",
            "(`vision_model(...).pooler_output`, before `visual_projection`). CLIPModel ignores it; the mean",
            "embedding above is the deterministic prediction. For calibrated zero-shot probabilities,",
            "draw samples and average the softmax over them (formulas in `het_head.json`):",
            "",
            "```python",
            "from safetensors.torch import load_file",
            "w = load_file(f\"{DIR}/het_head.safetensors\")",
            "h = model.vision_model(pixel_values=px).pooler_output",
            "mean = model.visual_projection(h)",
            "d = torch.nn.functional.softplus(h @ w['diag.weight'].T + w['diag.bias']) + 1e-3",
        ]
        if model_cfg.het.param_efficient:
            lines += ["V = (h @ w['low_rank.weight'].T + w['low_rank.bias'])[:, :, None] * w['C'][None]"]
        else:
            lines += [f"V = (h @ w['low_rank.weight'].T + w['low_rank.bias']).reshape(len(h), "
                      f"{model_cfg.embed_dim}, {model_cfg.het.num_factors})"]
        if model_cfg.het.noise_space == "sphere":
            lines += ["# noise_space 'sphere': the noise is added to the unit mean, at 1/sqrt(embed_dim) scale",
                      "mean = mean / mean.norm(dim=-1, keepdim=True)",
                      f"d, V = d * {model_cfg.embed_dim ** -0.5:.6g}, V * {model_cfg.embed_dim ** -0.5:.6g}"]
        lines += [
            "e, e2 = torch.randn(len(h), V.shape[-1]), torch.randn_like(mean)",
            "z = mean + (V @ e[..., None])[..., 0] + d * e2   # one sample; normalise it like any embedding",
            "```",
        ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def export_hf(model_cfg, params, tokenizer, preprocess, out_dir, force: bool = False) -> Path:
    """Write a ``CLIPModel.from_pretrained``-loadable directory; returns its path.

    ``tokenizer``: a hetclip ``Tokenizer``, its spec, or a tokenizer directory. Errors (settings HF
    cannot express, bad shapes, an occupied ``out_dir`` without ``force``) leave nothing written.
    """
    from safetensors.numpy import save_file
    from transformers import CLIPConfig

    tok = resolve_tokenizer(tokenizer)
    settings = preprocess_settings(model_cfg, preprocess)
    prep = prepare_hf(model_cfg, params, tok)
    hf_cfg = CLIPConfig(**prep["config"])
    with atomic_output_dir(out_dir, force) as tmp:
        hf_cfg.to_json_file(str(tmp / "config.json"))
        save_file(prep["state"], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        notes = list(prep["notes"]) + _write_tokenizer_hf(tok, tmp)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(settings), indent=2), encoding="utf-8")
        if prep["het"] is not None:
            save_file(prep["het"], str(tmp / hf.HET_HEAD_WEIGHTS), metadata={"format": "pt"})
            (tmp / hf.HET_HEAD_CONFIG).write_text(json.dumps(hf.het_head_description(model_cfg), indent=2),
                                                  encoding="utf-8")
        (tmp / "README.md").write_text(_hf_readme(model_cfg, notes, prep["het"] is not None, settings, tok),
                                       encoding="utf-8")
    for n in notes:
        log.warning("hf export: %s", n)
    return Path(out_dir)


# ------------------------------------------------------------------------------ StableHLO export

def encoder_functions(model_cfg, params):
    """``(image_fn, text_fn)``: jitted pure functions of their inputs only (params closed over),
    returning L2-normalised deterministic embeddings ``[B, D]`` in float32 (``model.embedding_functions``)."""
    import jax
    import jax.numpy as jnp

    from hetclip.model import embedding_functions

    image_fn, text_fn = embedding_functions(model_cfg)
    consts = jax.tree.map(jnp.asarray, params)
    return jax.jit(lambda images: image_fn(consts, images)), jax.jit(lambda tokens: text_fn(consts, tokens))


def export_stablehlo(model_cfg, params, tokenizer, preprocess, out_dir, force: bool = False, *,
                     platforms: Optional[Sequence[str]] = None) -> Path:
    """Serialised ``jax.export`` image/text encoders with a symbolic batch dimension; returns the path."""
    import jax
    from jax import export as jax_export

    tok = resolve_tokenizer(tokenizer)
    settings = preprocess_settings(model_cfg, preprocess)
    if tok.context_length > model_cfg.text.context_length:
        raise ValueError(f"tokenizer context_length={tok.context_length} exceeds the text tower's "
                         f"text.context_length={model_cfg.text.context_length}")
    if tok.eos_token_id != model_cfg.text.eos_token_id:
        raise ValueError(f"tokenizer eos_token_id={tok.eos_token_id} differs from the model's "
                         f"text.eos_token_id={model_cfg.text.eos_token_id}")
    s, length = model_cfg.vision.image_size, tok.context_length
    (batch,) = jax_export.symbolic_shape("batch")
    image_fn, text_fn = encoder_functions(model_cfg, params)
    kw = {} if platforms is None else {"platforms": tuple(platforms)}
    image_exp = jax_export.export(image_fn, **kw)(jax.ShapeDtypeStruct((batch, s, s, 3), np.float32))
    text_exp = jax_export.export(text_fn, **kw)(jax.ShapeDtypeStruct((batch, length), np.int32))
    log_scale = effective_log_scale(model_cfg, params)
    if model_cfg.het.enabled:
        log.warning("stablehlo export: the HET-XL noise head is not exported; the image encoder returns the "
                    "deterministic mean embedding (--format hf keeps the head)")
    with atomic_output_dir(out_dir, force) as tmp:
        (tmp / "image_encoder.stablehlo").write_bytes(image_exp.serialize())
        (tmp / "text_encoder.stablehlo").write_bytes(text_exp.serialize())
        tok_path = copy_tokenizer_files(tok, tmp / TOKENIZER_SUBDIR)
        tok_spec = dict(tok.spec(), path=str(tok_path.relative_to(tmp)))
        spec = {
            "format": "hetclip-stablehlo",
            "version": 1,
            "jax_version": jax.__version__,
            "platforms": list(image_exp.platforms),
            "embed_dim": model_cfg.embed_dim,
            "logit_scale": math.exp(log_scale),
            "image_encoder": {
                "file": "image_encoder.stablehlo",
                "input": {"shape": ["batch", s, s, 3], "dtype": "float32",
                          "description": "RGB NHWC, preprocessed as in 'preprocess'"},
                "output": {"shape": ["batch", model_cfg.embed_dim], "dtype": "float32",
                           "description": "L2-normalised mean image embedding"},
            },
            "text_encoder": {
                "file": "text_encoder.stablehlo",
                "input": {"shape": ["batch", length], "dtype": "int32",
                          "description": "token ids from the tokenizer below ([bos] text [eos] pad...)"},
                "output": {"shape": ["batch", model_cfg.embed_dim], "dtype": "float32",
                           "description": "L2-normalised text embedding"},
            },
            "preprocess": settings,
            "tokenizer": tok_spec | {"path_relative_to": "this directory"},
            "context_length": length,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "model": model_cfg.to_dict(),
            "het_head": "not exported (the image encoder returns the mean embedding)" if model_cfg.het.enabled
            else None,
            "usage": "jax.export.deserialize(open(file, 'rb').read()).call(x)",
        }
        (tmp / "export_spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return Path(out_dir)


# ----------------------------------------------------------------------------------------- CLI

def export_checkpoint(checkpoint: str, fmt: str, out: str, force: bool = False, step: Optional[int] = None,
                      platforms: Optional[Sequence[str]] = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; choose one of {FORMATS}")
    from hetclip.checkpoint import load_run, run_dir
    from hetclip.workdir import check_output_dir

    # every argument is checked before anything is loaded
    if fmt == "hf" and platforms:
        raise ValueError("--platforms applies to --format stablehlo only")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"no checkpoint at --checkpoint {checkpoint!r}")
    check_output_dir(out, run_dir(checkpoint))
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise FileExistsError(f"--out {out!r} exists and is not a directory")
    if out_path.is_dir() and any(out_path.iterdir()) and not force:
        raise FileExistsError(f"--out {out!r} is not empty; pass --force to replace it")
    run = load_run(checkpoint, step)
    if fmt == "hf":
        return export_hf(run.model_cfg, run.params, run.tokenizer_spec, run.preprocess, out, force=force)
    return export_stablehlo(run.model_cfg, run.params, run.tokenizer_spec, run.preprocess, out, force=force,
                            platforms=platforms)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``hetclip-export``: exit status 0, or 2 with one message for a user error."""
    from hetclip.cli import guarded

    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded("hetclip-export", lambda: _run(argv), argv)


def _run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="hetclip-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training work directory or its checkpoints/ directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (never a run directory)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("--platforms", default=None,
                   help="stablehlo: comma-separated lowering platforms, e.g. cpu,cuda,tpu (default: this machine's)")
    args = p.parse_args(argv)
    platforms = [x.strip() for x in args.platforms.split(",") if x.strip()] if args.platforms else None
    out = export_checkpoint(args.checkpoint, args.format, args.out, force=args.force, step=args.step,
                            platforms=platforms)
    print(f"hetclip-export: wrote {args.format} export to {out}")
    return 0


if __name__ == "__main__":
    from hetclip.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()  # as the console script does (python -m is kept on re-execution)
    sys.exit(main())

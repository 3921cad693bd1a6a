"""Mapping between hetclip parameters and Hugging Face ``transformers.CLIPModel`` (PyTorch) weights.

The hetclip parameter tree (docs/ARCHITECTURE.md, "Parameter tree") was laid out to match HF CLIP
name for name, so the mapping is a table of ``(hetclip path, HF key, transform)`` rows:

* ``linear``: Flax Dense kernel ``[in, out]`` <-> torch Linear weight ``[out, in]`` (transpose);
* ``conv``: patch kernel ``[p, p, 3, W]`` (HWIO) <-> torch Conv2d weight ``[W, 3, p, p]`` (OIHW);
* ``copy``: everything else (LayerNorm ``scale`` <-> ``weight``, biases, embeddings);
* ``temperature/log_scale`` <-> ``logit_scale`` (both are ``log(1/τ)``).

Everything here works on nested dicts of numpy arrays (no model code needed), plus the two bridges
``hf_config(model_cfg, ...)`` / ``model_config_from_hf(config)`` between ``ModelConfig`` and
``CLIPConfig``. Settings HF CLIP cannot represent raise ``UnsupportedForHF`` naming the setting.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional

import numpy as np

# transformers advises "PyTorch was not found. Models won't be available ..." when imported without
# torch. hetclip uses only its configs and tokenizers, never its PyTorch models, so the advice does not
# apply to a base install; TRANSFORMERS_NO_ADVISORY_WARNINGS is transformers' own switch for such advice
# (``logger.warning_advice``; its real warnings still print). A value the user set is kept.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

log = logging.getLogger(__name__)

LN_EPS = 1e-5
HF_ACTIVATIONS = ("quick_gelu", "gelu")
HET_HEAD_WEIGHTS = "het_head.safetensors"
HET_HEAD_CONFIG = "het_head.json"
# Non-persistent buffers that older HF CLIP checkpoints carry; transformers ignores them too.
IGNORED_HF_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


class UnsupportedForHF(ValueError):
    """A hetclip setting that ``transformers.CLIPModel`` cannot express."""


class WeightMismatch(ValueError):
    """Missing / unexpected keys or wrong shapes when converting weights."""


# ----------------------------------------------------------------------------------- key mapping

def _norm_rows(path: str, key: str) -> tuple:
    """A LayerNorm's two rows: Flax ``scale``/``bias`` <-> HF ``weight``/``bias``."""
    return ((f"{path}/scale", f"{key}.weight", "copy"), (f"{path}/bias", f"{key}.bias", "copy"))


_LAYER_ROWS = (
    [row for i in (1, 2) for row in _norm_rows(f"layer_norm{i}", f"layer_norm{i}")]
    + [(f"self_attn/{p}/kernel", f"self_attn.{p}.weight", "linear") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    + [(f"self_attn/{p}/bias", f"self_attn.{p}.bias", "copy") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    + [(f"mlp/{p}/kernel", f"mlp.{p}.weight", "linear") for p in ("fc1", "fc2")]
    + [(f"mlp/{p}/bias", f"mlp.{p}.bias", "copy") for p in ("fc1", "fc2")]
)

_VISION_ROWS = (
    ("vision_model/embeddings/patch_embedding/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
    ("vision_model/embeddings/class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    ("vision_model/embeddings/position_embedding", "vision_model.embeddings.position_embedding.weight", "copy"),
    *_norm_rows("vision_model/pre_layrnorm", "vision_model.pre_layrnorm"),
    *_norm_rows("vision_model/post_layernorm", "vision_model.post_layernorm"),
    ("visual_projection/kernel", "visual_projection.weight", "linear"),
)

_TEXT_ROWS = (
    ("text_model/embeddings/token_embedding/embedding", "text_model.embeddings.token_embedding.weight", "copy"),
    ("text_model/embeddings/position_embedding", "text_model.embeddings.position_embedding.weight", "copy"),
    *_norm_rows("text_model/final_layer_norm", "text_model.final_layer_norm"),
    ("text_projection/kernel", "text_projection.weight", "linear"),
)

_SCALE_ROW = ("temperature/log_scale", "logit_scale", "copy")


def key_mapping(vision_layers: int, text_layers: int) -> list[tuple[str, str, str]]:
    """All ``(hetclip path, HF key, transform)`` rows for towers with the given depths."""
    rows = list(_VISION_ROWS) + list(_TEXT_ROWS) + [_SCALE_ROW]
    for tower, n in (("vision_model", vision_layers), ("text_model", text_layers)):
        for i in range(n):
            rows += [(f"{tower}/encoder/layers_{i}/{a}", f"{tower}.encoder.layers.{i}.{b}", t) for a, b, t in _LAYER_ROWS]
    return rows


# transform -> the axis order that turns a hetclip array into the HF one ("copy": none)
_TO_HF_AXES = {"linear": (1, 0), "conv": (3, 2, 0, 1)}


def _convert(x, axes) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if axes is None:
        return np.array(x, order="C")  # (ascontiguousarray would turn a scalar into shape [1])
    return np.ascontiguousarray(x.transpose(axes))


def to_hf_array(x, transform: str) -> np.ndarray:
    return _convert(x, _TO_HF_AXES.get(transform))


def from_hf_array(x, transform: str) -> np.ndarray:
    axes = _TO_HF_AXES.get(transform)
    return _convert(x, None if axes is None else tuple(int(a) for a in np.argsort(axes)))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """``{"a/b/c": leaf}`` -> nested dict."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def _count_layers(flat: Mapping[str, Any], tower: str) -> int:
    prefix = f"{tower}/encoder/layers_"
    ids = {int(k[len(prefix):].split("/", 1)[0]) for k in flat if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _list(items: Iterable[str], limit: int = 20) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def split_params(params: Mapping) -> tuple[dict, dict, dict]:
    """``(clip part, het_head subtree or {}, other top-level entries)`` of a hetclip param tree."""
    clip, other = {}, {}
    for k, v in params.items():
        if k == "het_head":
            continue
        (clip if k in ("vision_model", "text_model", "visual_projection", "text_projection", "temperature")
         else other)[k] = v
    return clip, dict(params.get("het_head", {})), other


def to_hf_state_dict(params: Mapping, *, logit_scale: Optional[float] = None) -> dict[str, np.ndarray]:
    """hetclip params -> HF ``CLIPModel`` state dict (fp32 numpy arrays, HF key layout).

    ``logit_scale`` (the effective ``log(1/τ)``) replaces ``temperature/...`` when given; it is
    required for the bounded temperature form (``temperature/t``), which HF cannot represent.
    The HET-XL head is not part of ``CLIPModel``: see ``het_head_to_hf``. Any other parameter
    (e.g. SigLIP's ``logit_bias``) raises ``UnsupportedForHF``.
    """
    clip, _, other = split_params(params)
    if other:
        raise UnsupportedForHF(f"parameters {_list(flatten(other))} have no place in transformers.CLIPModel "
                               "(logit_bias exists only for loss='sigmoid', which CLIPModel cannot represent)")
    flat = flatten(clip)
    if logit_scale is not None:
        flat = {k: v for k, v in flat.items() if not k.startswith("temperature/")}
        flat["temperature/log_scale"] = np.float32(logit_scale)
    elif "temperature/log_scale" not in flat and any(k.startswith("temperature/") for k in flat):
        raise UnsupportedForHF("the bounded temperature form (temperature/t) has no HF equivalent; pass "
                               "logit_scale=log(1/τ) to export its current value as CLIPModel.logit_scale")
    rows = key_mapping(_count_layers(flat, "vision_model"), _count_layers(flat, "text_model"))
    expected = {r[0] for r in rows}
    missing, unexpected = expected - set(flat), set(flat) - expected
    if missing or unexpected:
        raise WeightMismatch("hetclip params do not have the CLIP layout: "
                             + (f"missing {_list(missing)}" if missing else "")
                             + ("; " if missing and unexpected else "")
                             + (f"unexpected {_list(unexpected)}" if unexpected else ""))
    return {hf_key: to_hf_array(flat[path], t) for path, hf_key, t in rows}


def expected_hf_shapes(config: Mapping[str, Any]) -> dict[str, tuple]:
    """Shape of every ``CLIPModel`` weight for an HF CLIP config dict (``config.json`` contents)."""
    v, t = config["vision_config"], config["text_config"]
    dim = config["projection_dim"]
    p, w, n = v["patch_size"], v["hidden_size"], (v["image_size"] // v["patch_size"]) ** 2
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (w, v.get("num_channels", 3), p, p),
        "vision_model.embeddings.class_embedding": (w,),
        "vision_model.embeddings.position_embedding.weight": (n + 1, w),
        "visual_projection.weight": (dim, w),
        "text_model.embeddings.token_embedding.weight": (t["vocab_size"], t["hidden_size"]),
        "text_model.embeddings.position_embedding.weight": (t["max_position_embeddings"], t["hidden_size"]),
        "text_projection.weight": (dim, t["hidden_size"]),
        "logit_scale": (),
    }
    for tower, c in (("vision_model", v), ("text_model", t)):
        width, inter = c["hidden_size"], c["intermediate_size"]
        norms = ["pre_layrnorm", "post_layernorm"] if tower == "vision_model" else ["final_layer_norm"]
        for name in norms:
            shapes[f"{tower}.{name}.weight"] = shapes[f"{tower}.{name}.bias"] = (width,)
        for i in range(c["num_hidden_layers"]):
            pre = f"{tower}.encoder.layers.{i}."
            for ln in ("layer_norm1", "layer_norm2"):
                shapes[pre + ln + ".weight"] = shapes[pre + ln + ".bias"] = (width,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[pre + f"self_attn.{proj}.weight"] = (width, width)
                shapes[pre + f"self_attn.{proj}.bias"] = (width,)
            shapes[pre + "mlp.fc1.weight"], shapes[pre + "mlp.fc1.bias"] = (inter, width), (inter,)
            shapes[pre + "mlp.fc2.weight"], shapes[pre + "mlp.fc2.bias"] = (width, inter), (width,)
    return shapes


def check_hf_state_dict(state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Raise ``WeightMismatch`` listing every missing/unexpected key and shape mismatch."""
    want = expected_hf_shapes(config)
    have = {k: tuple(np.shape(v)) for k, v in state.items() if k not in IGNORED_HF_KEYS}
    missing = set(want) - set(have)
    unexpected = set(have) - set(want)
    wrong = [f"{k} {have[k]} (expected {want[k]})" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_list(wrong)}")
    if problems:
        raise WeightMismatch("HF CLIP weights do not match the config: " + "; ".join(problems))


def from_hf_state_dict(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """HF ``CLIPModel`` state dict (numpy or torch tensors) -> hetclip params (nested numpy dict).

    Strict: every key of the config's layout must be present with the right shape, nothing else."""
    state = {k: _to_numpy(v) for k, v in state.items()}
    check_hf_state_dict(state, config)
    rows = key_mapping(config["vision_config"]["num_hidden_layers"], config["text_config"]["num_hidden_layers"])
    return unflatten({path: from_hf_array(state[hf_key], t) for path, hf_key, t in rows})


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=np.float32)


# ------------------------------------------------------------------------------- HET-XL head

def het_head_to_hf(het_params: Mapping) -> dict[str, np.ndarray]:
    """HET-XL head params -> PyTorch-convention tensors (``Linear.weight [out, in]``, ``C [D, R]``)."""
    out = {}
    for path, v in flatten(het_params).items():
        if path.endswith("/kernel"):
            out[path[: -len("/kernel")].replace("/", ".") + ".weight"] = to_hf_array(v, "linear")
        else:
            out[path.replace("/", ".")] = to_hf_array(v, "copy")
    return out


def het_head_from_hf(tensors: Mapping[str, Any]) -> dict:
    flat = {}
    for k, v in tensors.items():
        v = _to_numpy(v)
        if k.endswith(".weight"):
            flat[k[: -len(".weight")].replace(".", "/") + "/kernel"] = from_hf_array(v, "linear")
        else:
            flat[k.replace(".", "/")] = v
    return unflatten(flat)


def het_head_description(model_cfg) -> dict:
    """``het_head.json``: the head's settings and the formulas to apply its weights."""
    het = model_cfg.het
    desc = {
        "format": "hetclip HET-XL embedding head",
        "form": "parameter_efficient" if het.param_efficient else "full",
        "input": "vision_model pooler_output (post_layernorm class token), width "
                 f"{model_cfg.vision.width}, before visual_projection",
        "embed_dim": model_cfg.embed_dim,
        "feature_dim": model_cfg.vision.width,
        "num_factors": het.num_factors,
        "mc_samples": het.mc_samples,
        "diag_floor": 1e-3,
        "weight_layout": "PyTorch Linear: weight [out, in], y = h @ weight.T + bias",
        "noise_space": het.noise_space,
        "formulas": {
            "d": "softplus(diag(h)) + diag_floor   # [B, D]",
            "low_rank": ("v = low_rank(h) [B, D]; V = v[:, :, None] * C[None]   # [B, D, R]"
                         if het.param_efficient else "V = low_rank(h).reshape(B, D, R)"),
            "sample": "z_s = mean + V @ e_s + d * e'_s, e_s ~ N(0, I_R), e'_s ~ N(0, I_D); z_s /= |z_s|",
        },
        "het_config": {k: getattr(het, k) for k in ("num_factors", "mc_samples", "param_efficient", "init_scale",
                                                    "noise_space", "estimator")},
    }
    if het.noise_space == "sphere":
        desc["formulas"]["sphere"] = ("before sampling: mean = mean / |mean|; d and V multiplied by "
                                      f"embed_dim ** -0.5 = {model_cfg.embed_dim ** -0.5:.6g}")
    return desc


# ---------------------------------------------------------------------------------- configs

def check_exportable(model_cfg, eos_token_id: Optional[int] = None) -> list[str]:
    """Raise ``UnsupportedForHF`` for settings CLIPModel cannot express; return notes on lossy ones."""
    notes = []
    if model_cfg.loss != "softmax":
        raise UnsupportedForHF(f"loss={model_cfg.loss!r}: the SigLIP logit_bias has no place in "
                               "transformers.CLIPModel (export with --format stablehlo instead)")
    for name, tower in (("vision", model_cfg.vision), ("text", model_cfg.text)):
        if tower.activation not in HF_ACTIVATIONS:
            raise UnsupportedForHF(f"{name}.activation={tower.activation!r} has no HF CLIP hidden_act")
    eos = model_cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    if eos != model_cfg.text.eos_token_id:
        raise UnsupportedForHF(f"the tokenizer's eos_token_id={eos} differs from the text tower's "
                               f"text.eos_token_id={model_cfg.text.eos_token_id} (the pooling token)")
    if eos == 2:
        raise UnsupportedForHF("text.eos_token_id=2: HF CLIP treats eos_token_id == 2 as a legacy config and pools "
                               "at the largest token id (argmax) instead of the first end-of-text token, so the "
                               "text embeddings would differ")
    if model_cfg.temperature.kind != "clip":
        notes.append(f"temperature.kind={model_cfg.temperature.kind!r} (bounded τ) has no HF form: its current "
                     "value 1/τ is exported as the fixed CLIPModel.logit_scale = log(1/τ)")
    if model_cfg.dtype not in ("float32", "auto"):
        notes.append(f"dtype={model_cfg.dtype!r}: weights are exported in float32 (they are stored in float32)")
    return notes


def hf_config(model_cfg, *, eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
              bos_token_id: Optional[int] = None, logit_scale: Optional[float] = None) -> dict:
    """``transformers.CLIPConfig`` keyword dict for ``model_cfg`` (token ids from the tokenizer)."""
    check_exportable(model_cfg, eos_token_id)
    v, t = model_cfg.vision, model_cfg.text
    for name, val in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id)):
        if val is not None and not 0 <= val < t.vocab_size:
            raise UnsupportedForHF(f"tokenizer {name}={val} is outside the vocabulary [0, {t.vocab_size})")
    text_config = {
        "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
        "projection_dim": model_cfg.embed_dim, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length, "hidden_act": t.activation, "layer_norm_eps": LN_EPS,
        "attention_dropout": 0.0, "eos_token_id": t.eos_token_id, "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
    }
    vision_config = {
        "hidden_size": v.width, "intermediate_size": v.mlp_dim, "projection_dim": model_cfg.embed_dim,
        "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3,
        "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.activation,
        "layer_norm_eps": LN_EPS, "attention_dropout": 0.0,
    }
    scale = math.log(1.0 / model_cfg.temperature.init) if logit_scale is None else float(logit_scale)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model_cfg.embed_dim,
            "logit_scale_init_value": scale, "text_config": text_config, "vision_config": vision_config}


def model_config_from_hf(config: Mapping[str, Any], het_desc: Optional[Mapping[str, Any]] = None):
    """HF CLIP config dict -> ``ModelConfig`` (CLIP temperature, HET-XL head from ``het_head.json`` if given)."""
    from hetclip.config import upgrade_stored
    from hetclip.heads import HetConfig, TemperatureConfig
    from hetclip.model import ModelConfig
    from hetclip.towers import TextConfig, VisionConfig

    if config.get("model_type", "clip") != "clip":
        raise UnsupportedForHF(f"model_type={config.get('model_type')!r}: only CLIP configs can be imported")
    v, t = config.get("vision_config"), config.get("text_config")
    if not isinstance(v, Mapping) or not isinstance(t, Mapping):
        raise UnsupportedForHF("the HF config has no vision_config/text_config sections")
    for name, c in (("vision_config", v), ("text_config", t)):
        act = c.get("hidden_act", "quick_gelu")
        if act not in HF_ACTIVATIONS:
            raise UnsupportedForHF(f"{name}.hidden_act={act!r}: hetclip supports {HF_ACTIVATIONS}")
        eps = c.get("layer_norm_eps", LN_EPS)
        if not math.isclose(eps, LN_EPS, rel_tol=1e-6):
            raise UnsupportedForHF(f"{name}.layer_norm_eps={eps}: hetclip's LayerNorm uses {LN_EPS}")
        if c.get("num_channels", 3) != 3:
            raise UnsupportedForHF(f"{name}.num_channels={c['num_channels']}: hetclip takes RGB images")
        if c["hidden_size"] % c["num_attention_heads"]:
            raise UnsupportedForHF(f"{name}: hidden_size={c['hidden_size']} is not divisible by "
                                   f"num_attention_heads={c['num_attention_heads']}")
    image_size, patch = v.get("image_size", 224), v.get("patch_size", 32)
    for key, val in (("image_size", image_size), ("patch_size", patch)):
        if not isinstance(val, int):
            if isinstance(val, (list, tuple)) and len(set(val)) == 1:
                continue
            raise UnsupportedForHF(f"vision_config.{key}={val!r}: hetclip needs a square size")
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    patch = patch if isinstance(patch, int) else patch[0]
    eos = t.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
        raise UnsupportedForHF(f"text_config.eos_token_id={eos!r}: hetclip pools at a single end-of-text token id")
    if eos == 2:
        # Legacy HF configs: pooling at the argmax token id, i.e. at the first occurrence of the
        # vocabulary's largest id (CLIP's <|endoftext|>) when every row contains it.
        log.warning("text_config.eos_token_id=2 is HF's legacy 'argmax' pooling; importing with "
                    "eos_token_id=vocab_size-1=%d (the original CLIP end-of-text token)", t["vocab_size"] - 1)
        eos = t["vocab_size"] - 1

    def mlp_ratio(c):
        r = c["intermediate_size"] / c["hidden_size"]
        if int(round(c["hidden_size"] * r)) != c["intermediate_size"]:
            raise UnsupportedForHF(f"intermediate_size={c['intermediate_size']} cannot be written as "
                                   f"hidden_size * mlp_ratio")
        return r

    vision = VisionConfig(width=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                          patch_size=patch, image_size=image_size, mlp_ratio=mlp_ratio(v),
                          activation=v.get("hidden_act", "quick_gelu"))
    text = TextConfig(width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                      vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                      mlp_ratio=mlp_ratio(t), activation=t.get("hidden_act", "quick_gelu"), eos_token_id=eos)
    het = HetConfig()
    if het_desc is not None:
        het = HetConfig(enabled=True, **upgrade_stored(het_desc["het_config"], "model.het."))
    return ModelConfig(embed_dim=config["projection_dim"], vision=vision, text=text, het=het,
                       temperature=TemperatureConfig(kind="clip"))


def normalize_hf_config(config: Mapping[str, Any]) -> dict:
    """Fill HF defaults into a (possibly partial) CLIP config dict via ``transformers.CLIPConfig``."""
    from transformers import CLIPConfig

    cfg = config if isinstance(config, CLIPConfig) else CLIPConfig(**dict(config))
    return cfg.to_dict()


# ----------------------------------------------------------------------------------- import

def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json; not a saved transformers model directory")
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


def read_het_head(path: str) -> tuple[Optional[dict], Optional[dict]]:
    """``(het head tensors, het_head.json)`` beside an exported model, or ``(None, None)``."""
    if not os.path.isfile(os.path.join(path, HET_HEAD_WEIGHTS)):
        return None, None
    from safetensors.numpy import load_file

    desc_path = os.path.join(path, HET_HEAD_CONFIG)
    if not os.path.isfile(desc_path):
        raise FileNotFoundError(f"{path!r} has {HET_HEAD_WEIGHTS} but no {HET_HEAD_CONFIG}")
    with open(desc_path, encoding="utf-8") as f:
        desc = json.load(f)
    return load_file(os.path.join(path, HET_HEAD_WEIGHTS)), desc


def _read_weights(path: str) -> dict:
    from safetensors.numpy import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        import torch

        return {k: _to_numpy(v) for k, v in torch.load(bin_path, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{path!r} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def params_from_hf(source, model_cfg=None, *, config: Optional[Mapping[str, Any]] = None):
    """Import HF CLIP weights into hetclip: ``(params, model_cfg)``.

    ``source``: a directory saved by ``CLIPModel.save_pretrained`` (or by ``hetclip-export --format
    hf``; a HET-XL head beside it is imported too) or a state dict (numpy arrays or torch tensors;
    then give ``config`` = the HF config dict, or ``model_cfg``). With ``model_cfg`` given, the HF
    config must describe the same architecture (differences are listed). Missing/unexpected keys and
    shape mismatches raise ``WeightMismatch`` listing them all.
    """
    het, het_desc, path = None, None, None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        config = read_hf_config(path)
        het, het_desc = read_het_head(path)
    else:
        state = dict(source)
        if config is None:
            if model_cfg is None:
                raise ValueError("params_from_hf(state_dict) needs config= (the HF config dict) or model_cfg=")
            config = hf_config(model_cfg)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    config = normalize_hf_config(config)
    derived = model_config_from_hf(config, het_desc)  # validates the config before any weights are read
    if path is not None:
        state = _read_weights(path)
    if model_cfg is not None:
        diffs = _arch_differences(model_cfg, derived)
        if diffs:
            raise UnsupportedForHF("the HF config does not match the given model_cfg: " + "; ".join(diffs))
        if model_cfg.temperature.kind != "clip":
            raise UnsupportedForHF(f"model_cfg.temperature.kind={model_cfg.temperature.kind!r}: HF CLIP "
                                   "weights carry a CLIP logit_scale; use temperature.kind='clip'")
        if model_cfg.loss != "softmax":
            raise UnsupportedForHF(f"model_cfg.loss={model_cfg.loss!r}: HF CLIP weights have no logit_bias")
        if model_cfg.het.enabled and het is None:
            raise WeightMismatch("model_cfg.het.enabled=True but the HF weights carry no HET-XL head "
                                 f"({HET_HEAD_WEIGHTS})")
    params = from_hf_state_dict(state, config)
    if het is not None:
        params["het_head"] = het_head_from_hf(het)
        _check_het_shapes(params["het_head"], derived)
    cfg = derived if model_cfg is None else model_cfg
    if model_cfg is not None and not model_cfg.het.enabled:
        params.pop("het_head", None)
    return params, cfg


def _check_het_shapes(het: Mapping, cfg) -> None:
    d, r, w = cfg.embed_dim, cfg.het.num_factors, cfg.vision.width
    low = d if cfg.het.param_efficient else d * r
    want = {"diag/kernel": (w, d), "diag/bias": (d,), "low_rank/kernel": (w, low), "low_rank/bias": (low,)}
    if cfg.het.param_efficient:
        want["C"] = (d, r)
    have = {k: tuple(np.shape(v)) for k, v in flatten(het).items()}
    problems = sorted(set(want) ^ set(have)) + [f"{k} {have[k]} (expected {want[k]})" for k in sorted(set(want) & set(have))
                                                if have[k] != want[k]]
    if problems:
        raise WeightMismatch(f"{HET_HEAD_WEIGHTS} does not match {HET_HEAD_CONFIG}: {_list(problems)}")


def _arch_differences(a, b) -> list[str]:
    out = []
    if a.embed_dim != b.embed_dim:
        out.append(f"embed_dim {a.embed_dim} != {b.embed_dim}")
    for sec in ("vision", "text"):
        ca, cb = getattr(a, sec), getattr(b, sec)
        for f in ca.__dataclass_fields__:
            va, vb = getattr(ca, f), getattr(cb, f)
            same = math.isclose(va, vb) if isinstance(va, float) else va == vb
            if not same:
                out.append(f"{sec}.{f} {va!r} != {vb!r} (HF)")
    return out


def init_groups(path: str, model_cfg, params, shardings, groups=None):
    """The parameter ``groups`` (``optim.GROUPS``) from a Hugging Face CLIP directory, the rest as initialised:
    all groups to fine-tune, ``("image",)`` for LiT (a pretrained image tower, the text tower from scratch).
    A HET-XL head comes from the directory when it holds one (``hetclip-export``), else it keeps its
    initialisation (a new head on pretrained towers)."""
    import jax

    from hetclip import config as config_lib
    from hetclip import distributed as dist
    from hetclip.optim import GROUPS, param_group

    groups = GROUPS if groups is None else groups
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        raise config_lib.ConfigError(f"init_from_hf_groups={tuple(groups)!r}: name one or more of {list(GROUPS)}")
    cfg = model_cfg
    with_head = os.path.isfile(os.path.join(path, HET_HEAD_WEIGHTS))
    if model_cfg.het.enabled and not (with_head and "head" in groups):
        cfg = dataclasses.replace(model_cfg, het=dataclasses.replace(model_cfg.het, enabled=False))
        if "head" in groups and dist.is_main_process():
            log.info("init_from_hf: %s holds no HET-XL head; the head starts from its initialisation", path)
    imported, _ = params_from_hf(path, cfg)
    merged = dict(jax.device_get(params))
    for k, v in imported.items():
        if k in merged and param_group((k,)) in groups:
            merged[k] = v
    return jax.device_put(merged, shardings)

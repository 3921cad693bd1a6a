"""Importing Hugging Face CLIPModel weights into hetclip (``hetclip.hf.params_from_hf``)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hetclip import hf  # noqa: E402
from hetclip.model import Encoders, preset  # noqa: E402

VOCAB, CTX, EOS = 64, 12, 63


def clip_config(**over):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=CTX, hidden_act="quick_gelu", eos_token_id=EOS, bos_token_id=62,
                pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=16,
                  patch_size=4, hidden_act="gelu")
    text.update(over.pop("text", {}))
    vision.update(over.pop("vision", {}))
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=over.pop("projection_dim", 24),
                                   logit_scale_init_value=over.pop("logit_scale_init_value", 2.9), **over)


def saved_clip(tmp_path, config=None, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config or clip_config()).eval()
    with torch.no_grad():  # move LayerNorms/biases off their 1/0 initialisation
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "clip"))
    return model, tmp_path / "clip"


def batch(image_size, seed=0, eos=EOS):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((3, image_size, image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, 60, size=(3, CTX))
    tokens[:, 0] = 62
    for row, end in enumerate((4, 11, 7)):
        tokens[row, end] = eos
        tokens[row, end + 1:] = 0
    tokens[2, 9] = eos  # a second eos after the first: pooling must take the first
    return images, tokens.astype(np.int32)


def torch_embeddings(model, images, tokens):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        txt = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return (torch.nn.functional.normalize(img, dim=-1).numpy(), torch.nn.functional.normalize(txt, dim=-1).numpy())


def assert_same_embeddings(model, params, cfg, eos=EOS):
    images, tokens = batch(cfg.vision.image_size, eos=eos)
    enc = Encoders(cfg, params)
    img, txt = torch_embeddings(model, images, tokens)
    np.testing.assert_allclose(np.asarray(enc.image_embeddings(images)), img, atol=1e-4)
    np.testing.assert_allclose(np.asarray(enc.text_embeddings(tokens)), txt, atol=1e-4)
    np.testing.assert_allclose(enc.logit_scale, model.logit_scale.exp().item(), rtol=1e-5)


def test_import_saved_clipmodel(tmp_path):
    model, path = saved_clip(tmp_path)
    params, cfg = hf.params_from_hf(str(path))
    assert cfg.embed_dim == 24 and cfg.vision.width == 48 and cfg.vision.heads == 3 and cfg.vision.patch_size == 4
    assert cfg.vision.activation == "gelu" and cfg.text.activation == "quick_gelu"
    assert cfg.text.context_length == CTX and cfg.text.eos_token_id == EOS and cfg.text.vocab_size == VOCAB
    assert cfg.temperature.kind == "clip" and not cfg.het.enabled
    assert_same_embeddings(model, params, cfg)


def test_import_state_dict_with_model_cfg(tmp_path):
    model, path = saved_clip(tmp_path, seed=1)
    _, cfg = hf.params_from_hf(str(path))
    params, cfg2 = hf.params_from_hf(model.state_dict(), cfg)  # torch tensors + a ModelConfig
    assert cfg2 == cfg
    assert_same_embeddings(model, params, cfg)


def test_import_then_export_gives_identical_weights(tmp_path):
    from safetensors.numpy import load_file

    model, path = saved_clip(tmp_path)
    params, _ = hf.params_from_hf(str(path))
    back = hf.to_hf_state_dict(params)
    orig = load_file(str(path / "model.safetensors"))
    assert set(back) == set(orig) - set(hf.IGNORED_HF_KEYS)
    for k, v in back.items():
        np.testing.assert_array_equal(v, orig[k], err_msg=k)


def test_legacy_eos_token_id_2_maps_to_argmax_pooling(tmp_path):
    # Old HF CLIP configs say eos_token_id=2, meaning "pool at the largest token id" (CLIP's <|endoftext|>).
    model, path = saved_clip(tmp_path, clip_config(text={"eos_token_id": 2, "bos_token_id": 1}))
    params, cfg = hf.params_from_hf(str(path))
    assert cfg.text.eos_token_id == VOCAB - 1
    assert_same_embeddings(model, params, cfg, eos=VOCAB - 1)


def _rewrite_weights(path, fn):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _, path = saved_clip(tmp_path)

    def edit(state):
        state["text_model.encoder.layers.1.mlp.fc_extra.weight"] = state.pop("text_model.encoder.layers.1.mlp.fc1.weight")
        del state["vision_model.post_layernorm.bias"]

    _rewrite_weights(path, edit)
    with pytest.raises(hf.WeightMismatch) as e:
        hf.params_from_hf(str(path))
    msg = str(e.value)
    assert "missing keys: text_model.encoder.layers.1.mlp.fc1.weight, vision_model.post_layernorm.bias" in msg
    assert "unexpected keys: text_model.encoder.layers.1.mlp.fc_extra.weight" in msg


def test_shape_mismatch_is_listed(tmp_path):
    _, path = saved_clip(tmp_path)
    _rewrite_weights(path, lambda s: s.update({"text_projection.weight": np.zeros((20, 32), np.float32)}))
    with pytest.raises(hf.WeightMismatch, match=r"shape mismatches: text_projection.weight \(20, 32\) "
                                                r"\(expected \(24, 32\)\)"):
        hf.params_from_hf(str(path))


def test_model_cfg_mismatch_lists_differences(tmp_path):
    _, path = saved_clip(tmp_path)
    other = preset("tiny", embed_dim=24, vision=dict(width=48, layers=2, heads=3, patch_size=4, image_size=16),
                   text=dict(width=32, layers=3, heads=2, vocab_size=VOCAB, context_length=CTX, eos_token_id=EOS,
                             activation="quick_gelu", mlp_ratio=2.0))
    with pytest.raises(hf.UnsupportedForHF, match=r"text.layers 3 != 2 \(HF\)") as e:
        hf.params_from_hf(str(path), other)
    assert "vision.mlp_ratio 4.0 != 2.0" in str(e.value)


@pytest.mark.parametrize("over,match", [
    ({"text": {"hidden_act": "gelu_new"}}, "text_config.hidden_act='gelu_new'"),
    ({"vision": {"layer_norm_eps": 1e-6}}, "vision_config.layer_norm_eps=1e-06"),
    ({"text": {"eos_token_id": [5, 6]}}, r"text_config.eos_token_id=\[5, 6\]"),
])
def test_incompatible_config_is_named(tmp_path, over, match):
    config = clip_config().to_dict()
    for sec, key in (("text", "text_config"), ("vision", "vision_config")):
        config[key].update(over.get(sec, {}))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.UnsupportedForHF, match=match):
        hf.params_from_hf(str(tmp_path / "clip"))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.params_from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(clip_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.params_from_hf(str(tmp_path))


def test_a_het_head_json_with_the_old_sample_key_still_imports():
    from hetclip.heads import HetConfig

    config = hf.normalize_hf_config(clip_config().to_dict())
    old = {"num_factors": 3, "num_samples": 5, "param_efficient": False, "init_scale": 0.2}
    cfg = hf.model_config_from_hf(config, {"het_config": old})
    assert cfg.het == HetConfig(enabled=True, num_factors=3, mc_samples=5, param_efficient=False, init_scale=0.2)
    assert hf.model_config_from_hf(config, {"het_config": hf.het_head_description(cfg)["het_config"]}).het == cfg.het

"""Parameter counts (DET/HET/HET-XL, towers), the hetclip-params CLI, ModelConfig round trip and presets."""
import json

import jax
import pytest

from hetclip import heads as H
from hetclip import supervised_heads as SH
from hetclip import params as P
from hetclip.model import PRESETS, ModelConfig, abstract_params, count_params, preset


def test_jft4b_headline_ratio():
    ratio = P.extra_ratio(**P.SCALES["jft4b"])
    assert 14.0 < ratio < 15.0
    assert ratio == pytest.approx(29593 / 2048, rel=1e-3)
    counts = {c.method: c for c in P.head_counts(**P.SCALES["jft4b"])}
    assert counts["DET"].extra == 0
    assert counts["DET"].classifier == 2048 * 29593 + 29593
    # HET-XL PE extra: A_d, b_d, A_v, b_v, C [D, R], temperature.
    assert counts["HET-XL"].extra == 2 * (2048 * 2048 + 2048) + 2048 * 50 + 1


@pytest.mark.parametrize("pe", [True, False])
def test_counts_match_flax_classifiers(pe):
    k, d, r = 11, 6, 3
    x = jax.ShapeDtypeStruct((2, d), "float32")
    key = jax.random.key(0)
    got = {}
    for name, mod in (("DET", SH.DetClassifier(num_classes=k)),
                      ("HET", SH.HetClassifier(num_classes=k, num_factors=r, param_efficient=pe, mc_samples=2)),
                      ("HET-XL", SH.HetXLClassifier(num_classes=k, num_factors=r, param_efficient=pe, mc_samples=2))):
        args = (x,) if name == "DET" else (x, key)
        got[name] = count_params(jax.eval_shape(mod.init, key, *args)["params"])
    for c in P.head_counts(k, d, r, pe):
        assert c.total == got[c.method], c


def test_presets_by_tower():
    for name in PRESETS:
        counts = P.tower_counts(PRESETS[name])
        assert counts["total"] == count_params(abstract_params(PRESETS[name]))
        assert counts["total"] == sum(v for g, v in counts.items() if g != "total")
    b32 = P.tower_counts(preset("B/32"))
    assert b32["total"] == 151_277_313  # OpenAI ViT-B/32
    assert b32["vision_model"] == 87_456_000 and b32["text_model"] == 63_165_952
    het = P.tower_counts(preset("B/32", het={"enabled": True, "num_factors": 8}))
    assert het["het_head"] == 2 * (768 * 512 + 512) + 512 * 8
    assert het["total"] == 151_277_313 + het["het_head"]


def test_tiny_count_matches_transformers_clip():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny", embed_dim=24,
                 vision={"width": 32, "layers": 2, "heads": 2, "patch_size": 8, "image_size": 32},
                 text={"width": 16, "layers": 3, "heads": 2, "vocab_size": 100, "context_length": 12,
                       "eos_token_id": 99})
    hf = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=12, eos_token_id=99),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24)
    with torch.device("meta"):
        model = transformers.CLIPModel(hf)
    assert sum(p.numel() for p in model.parameters()) == count_params(abstract_params(cfg))


def test_cli_tables(capsys):
    assert P.main(["--scale", "jft4b"]) == 0
    out = capsys.readouterr().out
    assert "K=29,593" in out and "HET extra / HET-XL extra = 14.45x" in out
    assert P.main(["--classes", "100", "--dim", "10", "--factors", "2", "--full", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["het_over_hetxl_extra"] == pytest.approx(P.extra_ratio(100, 10, 2, False))
    assert data["settings"]["param_efficient"] is False
    assert P.main(["--preset", "B/32"]) == 0
    out = capsys.readouterr().out
    assert "151,277,313" in out and "vision_model" in out and "text_projection" in out


def test_cli_errors(capsys):
    assert P.main(["--classes", "10"]) == 2
    assert "missing dim" in capsys.readouterr().err
    assert P.main(["--preset", "B/33"]) == 2
    assert "unknown model preset 'B/33'; did you mean" in capsys.readouterr().err
    assert P.main(["--classes", "0", "--dim", "4"]) == 2
    assert "num_classes=0 must be a positive integer" in capsys.readouterr().err


# ---------- ModelConfig ----------

def test_model_config_json_round_trip():
    for name in PRESETS:
        cfg = preset(name, het={"enabled": True, "param_efficient": False}, loss="sigmoid",
                     temperature={"kind": "bounded"}, dtype="bfloat16", remat=True)
        back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg
        assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_model_config_errors():
    d = preset("tiny").to_dict()
    with pytest.raises(ValueError, match="ModelConfig: unknown key 'embed'; did you mean 'embed_dim'"):
        ModelConfig.from_dict({**d, "embed": 3})
    bad = {**d, "vision": {**d["vision"], "widht": 3}}
    with pytest.raises(ValueError, match="ModelConfig.vision: unknown key 'widht'; did you mean 'width'"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ValueError, match="preset 'tiny'.het: unknown key 'samples'"):
        preset("tiny", het={"samples": 3})
    with pytest.raises(ValueError, match="loss='hinge'"):
        preset("tiny", loss="hinge")
    with pytest.raises(ValueError, match="dtype='float16'"):
        preset("tiny", dtype="float16")


def test_preset_dimensions_and_overrides():
    b16, l14 = preset("B/16"), preset("L/14")
    assert (b16.vision.width, b16.vision.patch_size, b16.embed_dim) == (768, 16, 512)
    assert (l14.vision.width, l14.vision.layers, l14.vision.heads, l14.text.width, l14.embed_dim) == \
        (1024, 24, 16, 768, 768)
    assert all(PRESETS[n].text.vocab_size == 49408 and PRESETS[n].text.context_length == 77
               for n in ("S/16", "B/32", "B/16", "L/14"))
    tiny = preset("tiny", het={"enabled": True}, text={"vocab_size": 1000, "eos_token_id": 999})
    assert tiny.het.enabled and tiny.het.num_factors == H.HetConfig().num_factors
    assert (tiny.text.vocab_size, tiny.text.width, tiny.vision.image_size) == (1000, 256, 64)
    assert PRESETS["tiny"].het.enabled is False  # presets are not mutated

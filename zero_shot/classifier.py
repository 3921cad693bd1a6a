"""Zero-shot classifier weights from class names and prompt templates.

For each class ``c`` and template ``t`` the prompt is tokenised and embedded; each prompt embedding is
L2-normalised, the ``T`` embeddings of a class are averaged and the mean is L2-normalised again, giving
``W [C, D]``. Text is encoded in fixed-size batches (the last one padded) so a jitted encoder compiles once.

Weights can be cached in memory (a dict the caller owns) and/or on disk (``.npy`` in a directory),
keyed by a SHA-256 of (model identity, class names, templates, tokenizer spec, canonicalisation).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Dict, MutableMapping, Optional, Sequence

import numpy as np

from hetclip.noise import l2_normalize
from hetclip.zero_shot.templates import prompts as make_prompts

EncodeText = Callable[[np.ndarray], np.ndarray]


def tokenizer_spec(tokenizer) -> object:
    """The tokenizer's ``spec()`` if it has one, otherwise its class name (for cache keys and results)."""
    spec = getattr(tokenizer, "spec", None)
    return spec() if callable(spec) else type(tokenizer).__name__


def cache_key(model_id: str, classnames: Sequence[str], templates: Sequence[str], tok_spec,
              canonical: bool) -> str:
    payload = json.dumps({"model": str(model_id), "classnames": list(classnames),
                          "templates": list(templates), "tokenizer": tok_spec,
                          "canonical": bool(canonical)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def trim_tokens(tokens: np.ndarray, eos_token_id: Optional[int], multiple: int = 8) -> np.ndarray:
    """Drop the columns after the last first-end-of-text position of the batch (rounded up to
    ``multiple`` to bound recompiles). The text tower is causal and pools at the first end-of-text
    token, so those columns cannot change the embeddings; prompts are short, so this saves most of
    the text tower's work when building a classifier."""
    if eos_token_id is None or tokens.ndim != 2 or tokens.size == 0:
        return tokens
    is_eos = tokens == eos_token_id
    if not is_eos.any(axis=1).all():
        return tokens  # let the model report rows without an end-of-text token
    needed = int(is_eos.argmax(axis=1).max()) + 1
    keep = min(tokens.shape[1], -(-needed // multiple) * multiple)
    return tokens[:, :keep]


def encode_texts(encode_text: EncodeText, tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Embed ``texts`` in fixed-size batches (last batch padded by repeating its first text); ``[N, D]``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for s in range(0, len(texts), batch_size):
        chunk = list(texts[s:s + batch_size])
        n = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n) if len(texts) > batch_size else chunk
        tokens = trim_tokens(np.asarray(tokenizer(chunk), np.int32), getattr(tokenizer, "eos_token_id", None))
        emb = np.asarray(encode_text(tokens), np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(chunk):
            raise ValueError(f"encode_text returned shape {emb.shape} for {len(chunk)} texts; expected [B, D]")
        out.append(emb[:n])
    return np.concatenate(out, 0)


def average_templates(prompt_embeddings: np.ndarray) -> np.ndarray:
    """``[C, T, D]`` prompt embeddings -> ``[C, D]``: normalise each, average over T, renormalise."""
    e = l2_normalize(np.asarray(prompt_embeddings, np.float32))
    return np.asarray(l2_normalize(e.mean(axis=1)))


def build_classifier(encode_text: EncodeText, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                     *, canonical: bool = False, batch_size: int = 256, model_id: Optional[str] = None,
                     cache_dir: Optional[str] = None,
                     memory_cache: Optional[MutableMapping[str, np.ndarray]] = None) -> np.ndarray:
    """Zero-shot weights ``[C, D]`` (float32, unit rows). Caching needs ``model_id`` (any string that
    changes whenever the text tower's parameters do); without it nothing is cached."""
    if not classnames:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError("no templates given")
    key = None
    if model_id is not None and (cache_dir or memory_cache is not None):
        key = cache_key(model_id, classnames, templates, tokenizer_spec(tokenizer), canonical)
        if memory_cache is not None and key in memory_cache:
            return memory_cache[key]
        if cache_dir:
            path = os.path.join(cache_dir, f"zeroshot_{key[:32]}.npy")
            if os.path.isfile(path):
                w = np.load(path)
                if w.shape[0] != len(classnames):
                    raise ValueError(f"cached classifier {path} has {w.shape[0]} rows, "
                                     f"expected {len(classnames)}; delete it")
                if memory_cache is not None:
                    memory_cache[key] = w
                return w
    grid = make_prompts(classnames, templates, canonical=canonical)
    flat = [p for row in grid for p in row]
    emb = encode_texts(encode_text, tokenizer, flat, batch_size)
    w = average_templates(emb.reshape(len(classnames), len(templates), -1))
    if key is not None:
        if memory_cache is not None:
            memory_cache[key] = w
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, w)
            os.replace(tmp, os.path.join(cache_dir, f"zeroshot_{key[:32]}.npy"))
    return w


def classifier_info(classnames: Sequence[str], templates: Sequence[str], tokenizer, canonical: bool) -> Dict:
    """What the weights depend on, for results JSON."""
    return {"num_classes": len(classnames), "num_templates": len(templates),
            "tokenizer": tokenizer_spec(tokenizer), "canonicalize": bool(canonical),
            "context_length": getattr(tokenizer, "context_length", None)}

"""Train a CLIP-style byte-level BPE tokenizer on captions and save it in the Hugging Face format.

The saved directory (``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``) loads offline with ``transformers.CLIPTokenizerFast.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)`` and ``hetclip.data.tokenizers.HFTokenizer(dir)``, all giving the same
ids. The pipeline is CLIP's: NFC + whitespace folding + lower-casing, CLIP's word regex, byte-level
symbols, ``</w>`` end-of-word suffix, and the vocabulary laid out as CLIP's (256 byte symbols, the same
256 with ``</w>``, one token per merge, then ``<|startoftext|>``, ``<|endoftext|>``).

Console script: ``hetclip-train-bpe --shards 'train/{00000..00007}.tar' --vocab-size 4096 --out tok/``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = ["train_bpe", "build_clip_bpe", "iter_shard_captions", "iter_text_lines", "expand_braces", "main",
           "BOS", "EOS", "CLIP_PATTERN"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SUFFIX = "</w>"
# CLIP's word split (specials, contractions, letter runs, single digits, other non-space runs)
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_BASE = 512  # 256 byte symbols + 256 with the end-of-word suffix
_MIN_VOCAB = _NUM_BASE + 2


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and zero-padded ``{000..009}`` ranges (left to right, all combinations)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} is empty (end < start)")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def _shard_files(specs: Sequence[str]) -> list[str]:
    files: list[str] = []
    for spec in specs:
        for item in expand_braces(spec):
            if os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(item, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"shard directory {item} holds no *.tar files")
                files.extend(found)
            elif any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"shard pattern {item!r} matches no files")
                files.extend(found)
            elif os.path.isfile(item):
                files.append(item)
            else:
                raise FileNotFoundError(f"shard {item} does not exist")
    return files


def iter_shard_captions(specs: Sequence[str] | str, *, caption_ext: str = "txt") -> Iterator[str]:
    """Captions (``KEY.<caption_ext>`` members, UTF-8) of webdataset tar shards: paths, dirs, globs, braces."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [os.fspath(specs)]
    suffix = "." + caption_ext.lstrip(".")
    for path in _shard_files(list(specs)):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(suffix):
                        data = tar.extractfile(member).read()
                        try:
                            yield data.decode("utf-8").strip()
                        except UnicodeDecodeError as e:
                            raise ValueError(f"{path}: member {member.name} is not UTF-8 text ({e})") from e
        except tarfile.TarError as e:
            raise ValueError(f"{path}: not a readable tar file ({e})") from e


def iter_text_lines(paths: Sequence[str] | str) -> Iterator[str]:
    """Non-empty lines of plain-text caption files (one caption per line)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption text file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line


def _pipeline(tokenizer) -> None:
    """Install CLIP's normaliser, pre-tokeniser and decoder (the ones transformers' CLIPTokenizer uses)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


def build_clip_bpe(merges: Sequence[tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` with CLIP's pipeline and vocabulary layout for the given merges."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _BYTE_ORDER[ch])
    vocab: dict[str, int] = {}
    for tok in alphabet + [ch + SUFFIX for ch in alphabet]:
        vocab[tok] = len(vocab)
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if a not in vocab or b not in vocab:
            raise ValueError(f"merge ({a!r}, {b!r}) uses a symbol that no earlier merge produced")
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        kept.append((a, b))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=kept, continuing_subword_prefix="", end_of_word_suffix=SUFFIX,
                        fuse_unk=False, unk_token=EOS, dropout=None))
    _pipeline(tok)
    tok.add_special_tokens([AddedToken(BOS, special=True, normalized=False),
                            AddedToken(EOS, special=True, normalized=False)])
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def _byte_order() -> dict[str, int]:
    # GPT-2/CLIP byte -> printable-unicode table order: printable latin-1 ranges first, then the rest.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): i for i, c in enumerate(chars)}


_BYTE_ORDER = _byte_order()


def train_bpe(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 4096, min_frequency: int = 2,
              context_length: int = 77) -> dict:
    """Train byte-level BPE on ``texts`` and save a Hugging Face CLIP tokenizer directory.

    ``vocab_size`` counts the 512 byte symbols and the two special tokens (so at most ``vocab_size - 514``
    merges; fewer when the corpus runs out of pairs seen ``min_frequency`` times). Returns a summary dict.
    """
    from tokenizers import Tokenizer, trainers
    from tokenizers.models import BPE

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level CLIP BPE needs at least "
                         f"{_MIN_VOCAB} entries (512 byte symbols + 2 special tokens)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    count = 0

    def counted():
        nonlocal count
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"BPE training text must be str, got {type(t).__name__}")
            count += 1
            yield t

    scratch = Tokenizer(BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix=SUFFIX))
    _pipeline(scratch)
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[BOS, EOS], end_of_word_suffix=SUFFIX,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    scratch.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("no training text: the caption source is empty")
    merges = json.loads(scratch.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    merges = merges[: vocab_size - _MIN_VOCAB]
    tok = build_clip_bpe(merges)
    return save_clip_tokenizer(tok, out_dir, context_length=context_length, num_texts=count)


def save_clip_tokenizer(tok, out_dir: str | os.PathLike, *, context_length: int = 77, num_texts: int = 0) -> dict:
    """Write ``tok`` (from ``build_clip_bpe``) as a Hugging Face CLIP tokenizer directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, "errors": "replace", **specials}
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
    return {"path": str(out), "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "num_merges": len(model["merges"]), "num_texts": num_texts}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hetclip-train-bpe", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", nargs="*", default=[],
                   help="webdataset tar shards: paths, directories, globs or brace patterns")
    p.add_argument("--text", nargs="*", default=[], help="plain-text caption files, one caption per line")
    p.add_argument("--caption-ext", default="txt", help="caption member extension in the shards (default txt)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--context-length", type=int, default=77, help="model_max_length written to the config")
    p.add_argument("--out", required=True, help="output directory (Hugging Face tokenizer files)")
    args = p.parse_args(argv)
    if not args.shards and not args.text:
        p.error("give captions with --shards and/or --text")

    def texts():
        if args.shards:
            yield from iter_shard_captions(args.shards, caption_ext=args.caption_ext)
        if args.text:
            yield from iter_text_lines(args.text)

    try:
        summary = train_bpe(texts(), args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                            context_length=args.context_length)
    except (FileNotFoundError, ValueError) as e:
        print(f"hetclip-train-bpe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CLIP BPE tokenizer files: a small word-level vocabulary for the shipped models, and the real
CLIP vocabulary converted from the copy that the open_clip package ships.

Both produce the files transformers' CLIPTokenizer reads (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json), so diffusers pipelines load them unchanged.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in codes)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges to one word (lowest rank first), the way CLIP's tokenizer does."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def word_level_bpe(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges in which each given (lowercase ASCII) word is a single token.

    The vocabulary also holds every byte character with and without </w>, so any other text
    still tokenizes (character by character). Merges are added one at a time, always joining
    the first two symbols of a word that is not yet one token; a merge appended later never
    changes a word that is already a single token, so the result is consistent.
    """
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"vocabulary words must be lowercase ASCII letters, got {word!r}")
        while len(symbols := _bpe(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def open_clip_bpe_path() -> Path | None:
    """The CLIP BPE merges file inside an installed open_clip package, found without importing
    open_clip (which would pull torchvision)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("open_clip_torch")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "bpe_simple_vocab_16e6.txt.gz":
            path = Path(dist.locate_file(file))
            return path if path.is_file() else None
    return None


def clip_bpe(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-token CLIP vocabulary from open_clip's merges file (as OpenAI/OpenCLIP build it)."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(
    directory: str | Path,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    model_max_length: int = 77,
    pad_token: str = EOS,
) -> Path:
    """Write CLIPTokenizer files into directory (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory

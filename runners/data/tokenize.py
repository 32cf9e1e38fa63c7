"""Tokenizers: bytes (256 + end-of-document), byte-level BPE trained with `tokenizers`, or a tokenizer.json file.

Each one turns documents into token id arrays, appends nothing itself (runners.data.store ends every document
with `eod`), decodes ids back to text, and counts the UTF-8 bytes a run of ids stands for (for
bits per byte).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from runners.data.corpus import DataError

END_OF_DOCUMENT = "<|endoftext|>"
# Names other tokenizer.json files give their end-of-document token, tried in this order.
EOD_NAMES = (END_OF_DOCUMENT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a document."""

    name = "byte"
    vocab_size = 257
    eod = 256

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._bytes(ids).decode("utf-8", errors="replace")

    def utf8_bytes(self, ids: Iterable[int]) -> int:
        return len(self._bytes(ids))

    def _bytes(self, ids: Iterable[int]) -> bytes:
        ids = np.asarray(ids)
        return ids[ids != self.eod].astype(np.uint8).tobytes()


class HFTokenizer:
    """A `tokenizers.Tokenizer` with a known end-of-document token; text is encoded as plain text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, name: str, eod: int):
        # A literal "<|endoftext|>" inside a document is text, not a document end.
        tokenizer.encode_special_tokens = True
        self.tokenizer, self.name, self.eod = tokenizer, name, eod
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # the same ids as encode_batch without the offsets it tracks: 1.5x faster on 40 MB of Gutenberg
        # (2 cores; runners.bench.tokenize, results/benchmarks.jsonl), and tokenizing is what a GPU call waits on first
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def utf8_bytes(self, ids: Iterable[int]) -> int:
        """Bytes of the decoded text: exact for byte-level BPE except a character cut at either end of `ids`."""
        return len(self.decode(ids).encode("utf-8"))

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))


def train_bpe(documents: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style: every byte in the base alphabet, so any text encodes) with `vocab_size` ids."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    return HFTokenizer(tokenizer, f"bpe{vocab_size}", tokenizer.token_to_id(END_OF_DOCUMENT))


def load_tokenizer_file(path: Path, name: str | None = None) -> HFTokenizer:
    """A saved tokenizer.json; its end-of-document token is the first of EOD_NAMES it has."""
    tokenizer = _read_tokenizer_file(path)
    eod = next((i for i in map(tokenizer.token_to_id, EOD_NAMES) if i is not None), None)
    if eod is None:
        raise DataError(f"data.tokenizer: {path} has none of the end-of-document tokens {list(EOD_NAMES)}; "
                        "add one as a special token")
    return HFTokenizer(tokenizer, name or f"file:{path.name}", eod)


def file_vocab_size(path: Path) -> int:
    return _read_tokenizer_file(path).get_vocab_size(with_added_tokens=True)


def _read_tokenizer_file(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise DataError(f"data.tokenizer: no file {path}; give 'byte', 'bpe' or the path of a tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises bare Exception subclasses for every parse problem
        raise DataError(f"data.tokenizer: {path} is not a tokenizer.json the tokenizers library reads "
                        f"({str(e).splitlines()[0]}); save one with Tokenizer.save") from None

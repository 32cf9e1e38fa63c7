"""Data for a trial: documents -> train/validation split by document -> tokens, cached as memory-mapped files.

`prepare_data(cfg)` reads the source (runners.data.corpus), holds out as validation the documents whose text hashes
lowest until they make up `val_fraction` of the bytes, trains the BPE tokenizer on the training split when asked
(runners.data.tokenize), and writes every document's tokens followed by an end-of-document token to
`train.bin` / `val.bin` (uint16 below 65536 ids, else uint32). The folder is keyed by (content hash,
tokenizer, vocab size, val_fraction, separator, text_field) and built once: concurrent callers wait on a
file lock, and a finished folder appears by one atomic rename, so a reader never sees a half-built one.

Batches are a pure function of their position, so a resumed trial needs no iterator state: the
training tokens are cut into non-overlapping windows of seq_len + 1 tokens, every epoch visits them in a
permutation seeded by (seed, epoch), and window number k of the run is window perm_{k // n}[k % n]. A trial
with data.unique_tokens U draws from the first U / seq_len windows only, so it repeats them after U tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from runners.data.corpus import DataError, read_documents, source_files
from runners.data.tokenize import ByteTokenizer, HFTokenizer, file_vocab_size, load_tokenizer_file, train_bpe
from sweeps.trial import DataConfig

__all__ = ["DataError", "TokenData", "content_hash", "default_cache_dir", "prepare_data", "vocab_size_of"]

FORMAT = 1  # bump when the token files' layout or the split rule changes: old caches are then ignored
META, TRAIN, VAL, TOKENIZER = "meta.json", "train.bin", "val.bin", "tokenizer.json"
CHUNK_CHARS = 4 << 20  # characters of text handed to the tokenizer at once (it encodes a batch in parallel)

Tokenizer = ByteTokenizer | HFTokenizer


def default_cache_dir() -> Path:
    """$SCALING_CACHE/tokens, else ~/.cache/scaling-harness/tokens."""
    if os.environ.get("SCALING_CACHE"):
        return Path(os.environ["SCALING_CACHE"]) / "tokens"
    return Path.home() / ".cache" / "scaling-harness" / "tokens"


def vocab_size_of(cfg: DataConfig) -> int:
    """Ids the model needs, without tokenizing anything."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if cfg.tokenizer == "bpe":
        assert cfg.vocab_size is not None  # DataConfig guarantees it for 'bpe'
        return cfg.vocab_size
    return file_vocab_size(Path(cfg.tokenizer).expanduser())


def content_hash(cfg: DataConfig, cache_dir: Path | None = None) -> str:
    """16 hex digits of a hash of the selected documents' UTF-8 bytes, the separator and the text field.

    Reading a large compressed corpus takes seconds, so the answer is remembered in the cache, keyed by the
    files' paths, sizes and modification times (any edit changes those)."""
    memo = (cache_dir or default_cache_dir()) / "hashes" / f"{_selection_key(cfg)}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hash_documents(read_documents(cfg), cfg)
    _write_atomically(memo, digest.encode())
    return digest


def hash_documents(documents: Iterable[str], cfg: DataConfig) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([cfg.separator, cfg.text_field]).encode())
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # the length keeps document boundaries in the hash
        h.update(data)
    return h.hexdigest()


def split_hash(document: str) -> int:
    """A 64-bit hash of a document's text: the order in which documents are drawn for validation."""
    return int.from_bytes(hashlib.blake2b(document.encode("utf-8"), digest_size=8, person=b"val-split").digest(), "big")


def validation_threshold(documents: Iterable[str], val_fraction: float) -> int:
    """The split hash at or below which documents are held out: the lowest-hashing documents that together hold
    at least `val_fraction` of the bytes. Counting bytes rather than hashing each document into a fixed share
    keeps a small corpus (a few dozen files) from getting an empty or tiny validation split by chance."""
    hashes, sizes = [], []
    for doc in documents:
        hashes.append(split_hash(doc))
        sizes.append(len(doc.encode("utf-8")))
    if not hashes:
        return -1
    order = np.argsort(np.array(hashes, dtype=np.uint64), kind="stable")
    held = np.cumsum(np.array(sizes, dtype=np.int64)[order])
    last = int(np.searchsorted(held, val_fraction * held[-1]))
    return hashes[order[last]]


@dataclass(frozen=True, eq=False)
class TokenData:
    """A prepared corpus: memory-mapped token arrays, each document ending with the end-of-document id."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    content_hash: str
    val_bytes_per_token: float  # UTF-8 bytes / tokens of the fixed validation set: bpb = nats / ln 2 / this
    tokenizer_name: str
    tokenizer: Tokenizer
    directory: Path  # the cache folder holding the token files

    def n_windows(self, seq_len: int) -> int:
        """Non-overlapping training windows of seq_len + 1 tokens (inputs and their shifted targets)."""
        n = len(self.train) // (seq_len + 1)
        if n == 0:
            raise DataError(f"data.max_bytes: the training split has {len(self.train)} tokens, less than one "
                            f"sequence of {seq_len + 1}; read more text or use a shorter seq_len")
        return n

    def with_unique_tokens(self, unique_tokens: int | None, seq_len: int) -> TokenData:
        """This corpus with training cut to its first unique_tokens // seq_len windows (data.unique_tokens):
        exactly that many distinct input tokens when seq_len divides it, repeated in epochs as any split is.
        None: unchanged."""
        if unique_tokens is None:
            return self
        n, available = unique_tokens // seq_len, self.n_windows(seq_len)
        if not 1 <= n <= available:
            raise DataError(f"data.unique_tokens: {unique_tokens} is not between one sequence ({seq_len}) and the "
                            f"training split's {available * seq_len} tokens in whole sequences; change it or read "
                            f"more text")
        return dataclasses.replace(self, train=self.train[: n * (seq_len + 1)])

    def train_batch(self, first_window: int, n_seqs: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows first_window .. first_window + n_seqs - 1 of the run as int64 (x, y), each [n_seqs, seq_len].

        A trainer with S sequences per step and micro-batches of m passes first_window = step * S + j * m
        for micro-batch j, so the batch depends on the step and seed alone."""
        tokens = self.gather(self.train_windows(first_window, n_seqs, seq_len, seed), seq_len)
        return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])

    def train_windows(self, first_window: int, n_seqs: int, seq_len: int, seed: int) -> np.ndarray:
        """Which windows train_batch reads, in order ([n_seqs] int64): the run's positions through its seed's
        shuffled epochs."""
        n = self.n_windows(seq_len)
        epoch, position = np.divmod(first_window + np.arange(n_seqs), n)
        windows = np.empty(n_seqs, dtype=np.int64)
        for e in np.unique(epoch):
            at = epoch == e
            windows[at] = _permutation(n, seed, int(e))[position[at]]
        return windows

    def gather(self, windows: np.ndarray, seq_len: int) -> np.ndarray:
        """The tokens of training windows (any shape of indices) as int64 [..., seq_len + 1]; a corpus cut by
        with_unique_tokens reads its windows where the whole one has them, so one gather serves a pack whose
        members repeat different amounts."""
        return self.train[windows[..., None] * (seq_len + 1) + np.arange(seq_len + 1)].astype(np.int64)

    def epochs(self, tokens_seen: int, seq_len: int) -> float:
        """Passes over the unique training tokens: tokens_seen over the input tokens of all windows."""
        return tokens_seen / (self.n_windows(seq_len) * seq_len)

    def val_batches(self, seq_len: int, val_tokens: int, n_seqs: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The fixed validation set: val[:k*seq_len + 1] as k = val_tokens // seq_len consecutive sequences
        (x, y shifted by one), in int64 batches of n_seqs (the last may be smaller). The same every call."""
        k = val_tokens // seq_len
        if k == 0:
            raise DataError(f"data.val_tokens: {val_tokens} is less than one sequence of {seq_len}; "
                            "raise val_tokens to at least seq_len")
        tokens = np.asarray(self.val[: k * seq_len + 1], dtype=np.int64)
        x, y = tokens[:-1].reshape(k, seq_len), tokens[1:].reshape(k, seq_len)
        for start in range(0, k, n_seqs):
            yield x[start:start + n_seqs], y[start:start + n_seqs]


@functools.lru_cache(maxsize=256)  # every member of a pack, each its own seed, across an epoch's turn
def _permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one seed's epoch, int32 (0.4 MB per 100K windows)."""
    return np.random.default_rng([seed % 2**64, epoch]).permutation(n_windows).astype(np.int32)


def prepare_data(cfg: DataConfig, cache_dir: Path | None = None) -> TokenData:
    """Tokenize the source once (whoever comes first builds, the others wait and open) and open it."""
    root = cache_dir or default_cache_dir()
    digest = content_hash(cfg, root)
    folder = root / f"{digest}-{_cache_key(cfg, digest)}"
    if not folder.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{folder}.lock"):
            if not folder.is_dir():
                _build(cfg, digest, folder)
    return open_tokens(cfg, folder)


def open_tokens(cfg: DataConfig, folder: Path) -> TokenData:
    """The TokenData of a built folder, checked against what the config's evaluation needs."""
    meta = json.loads((folder / META).read_text())
    if meta["train_tokens"] == 0:
        raise DataError(f"data.source: the training split of '{cfg.source}' is empty "
                        f"({meta['documents']} documents); give more text or lower val_fraction")
    if meta["val_tokens"] < cfg.val_tokens + 1:
        raise DataError(f"data.val_fraction: the validation split has {meta['val_tokens']} tokens "
                        f"({meta['val_documents']} documents), fewer than val_tokens + 1 = {cfg.val_tokens + 1}; "
                        "raise val_fraction or max_bytes, or lower val_tokens")
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / TRAIN, dtype=dtype, mode="r")
    val = np.memmap(folder / VAL, dtype=dtype, mode="r")
    tokenizer = _tokenizer_of(cfg, folder)
    # The fixed set predicts val[1 : val_tokens + 1] (exactly when seq_len divides val_tokens).
    bytes_per_token = tokenizer.utf8_bytes(val[1:cfg.val_tokens + 1]) / cfg.val_tokens
    return TokenData(train=train, val=val, vocab_size=meta["vocab_size"], content_hash=meta["content_hash"],
                     val_bytes_per_token=bytes_per_token, tokenizer_name=meta["tokenizer"],
                     tokenizer=tokenizer, directory=folder)


def _build(cfg: DataConfig, digest: str, folder: Path) -> None:
    """Write the token files into a side folder, then rename it into place (the caller holds the lock)."""
    started = time.monotonic()
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)  # left by a builder that died holding the lock
    building.mkdir(parents=True)
    threshold = validation_threshold(read_documents(cfg), cfg.val_fraction)
    tokenizer = _new_tokenizer(cfg, threshold)
    if isinstance(tokenizer, HFTokenizer) and cfg.tokenizer == "bpe":
        tokenizer.save(building / TOKENIZER)
    ready = time.monotonic()
    # The model is sized by the config (vocab_size_of); a small corpus may teach BPE fewer ids than that.
    vocab_size = vocab_size_of(cfg)
    dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    counts = _write_tokens(read_documents(cfg), tokenizer, threshold, dtype, building)
    meta = {"format": FORMAT, "content_hash": digest, "tokenizer": tokenizer.name, "vocab_size": vocab_size,
            "tokenizer_vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, **counts,
            "documents": counts["train_documents"] + counts["val_documents"], "val_fraction": cfg.val_fraction,
            "val_hash_threshold": threshold, "separator": cfg.separator, "text_field": cfg.text_field,
            "source": cfg.source, "built_by_pid": os.getpid(), "split_and_tokenizer_seconds": round(ready - started, 3),
            "tokenize_seconds": round(time.monotonic() - ready, 3)}
    (building / META).write_text(json.dumps(meta, indent=1))
    os.rename(building, folder)


def _write_tokens(documents: Iterable[str], tokenizer: Tokenizer, val_threshold: int, dtype: type,
                  folder: Path) -> dict[str, int]:
    """Append each document's tokens and an end-of-document id to train.bin or val.bin; returns the counts."""
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    with open(folder / TRAIN, "wb") as train, open(folder / VAL, "wb") as val:
        for docs in document_chunks(documents, CHUNK_CHARS):
            for doc, ids in zip(docs, tokenizer.encode_batch(docs)):
                split = "val" if split_hash(doc) <= val_threshold else "train"
                np.append(ids, tokenizer.eod).astype(dtype).tofile(val if split == "val" else train)
                counts[f"{split}_tokens"] += len(ids) + 1
                counts[f"{split}_documents"] += 1
    return counts


def _new_tokenizer(cfg: DataConfig, val_threshold: int) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        assert cfg.vocab_size is not None
        training = (doc for doc in read_documents(cfg) if split_hash(doc) > val_threshold)
        return train_bpe(training, cfg.vocab_size)
    return load_tokenizer_file(Path(cfg.tokenizer).expanduser())


def _tokenizer_of(cfg: DataConfig, folder: Path) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return load_tokenizer_file(folder / TOKENIZER, name=f"bpe{cfg.vocab_size}")
    return load_tokenizer_file(Path(cfg.tokenizer).expanduser())


def document_chunks(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive documents grouped until a group holds about max_chars characters."""
    group: list[str] = []
    size = 0
    for doc in documents:
        group.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def _cache_key(cfg: DataConfig, digest: str) -> str:
    """12 hex digits over everything besides the text that changes the token files."""
    if cfg.tokenizer in ("byte", "bpe"):
        tokenizer = cfg.tokenizer
    else:  # a tokenizer file counts by its content, not its path
        path = Path(cfg.tokenizer).expanduser()
        file_vocab_size(path)  # raises the one-line DataError for a missing or unreadable file
        tokenizer = hashlib.sha256(path.read_bytes()).hexdigest()
    parts = [FORMAT, digest, tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.separator, cfg.text_field]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _selection_key(cfg: DataConfig) -> str:
    """What decides the selected documents without reading them: files (path, size, mtime) and the options."""
    files = [(str(p.resolve()), (s := p.stat()).st_size, s.st_mtime_ns) for p in source_files(cfg.source)]
    parts = [FORMAT, files, cfg.max_bytes, cfg.separator, cfg.text_field]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
        f.write(data)
    os.replace(f.name, path)

"""Data layer on real files: reading every source kind, the split, tokenizers, the token cache, batches."""

from __future__ import annotations

import gzip
import json
import lzma
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from runners.data import store as data_module
from runners.data.corpus import read_documents, stdlib_files
from runners.data.resident import TrainTokens
from runners.data.store import DataError, TokenData, content_hash, prepare_data, split_hash, vocab_size_of
from runners.data.tokenize import END_OF_DOCUMENT, ByteTokenizer, load_tokenizer_file, train_bpe
from sweeps.trial import DataConfig

GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg-en-400m"
WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea".split()


def documents(n: int, words: int = 60) -> list[str]:
    """n distinct documents of prose-like text, with a non-ASCII character and inner blank lines."""
    rng = np.random.default_rng(n)
    return [f"doc {i} café\n\n" + " ".join(rng.choice(WORDS, words)) + f"\nend {i}" for i in range(n)]


def write_text(path: Path, text: str) -> Path:
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def with_separators(docs: list[str]) -> str:
    return "".join(f"{d}\n{END_OF_DOCUMENT}\n" for d in docs)


def split_docs(tokens: np.ndarray, tokenizer) -> list[str]:
    """Decode a token array back into its documents (each ends with the end-of-document id)."""
    ends = np.flatnonzero(np.asarray(tokens) == tokenizer.eod)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends)]


def utf8_size(docs: list[str]) -> int:
    return sum(len(d.encode()) for d in docs)


def corpus(tmp_path: Path, n: int = 60) -> tuple[list[str], DataConfig]:
    docs = documents(n)
    write_text(tmp_path / "corpus.txt", with_separators(docs))
    return docs, DataConfig(source=str(tmp_path / "corpus.txt"), separator=END_OF_DOCUMENT,
                            val_fraction=0.2, val_tokens=256)


# --- sources ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz", "c.txt.xz"])
def test_text_files_split_at_separator_lines(tmp_path, name):
    docs = documents(5)
    write_text(tmp_path / name, with_separators(docs[:4]) + docs[4])  # the last one has no separator after it
    cfg = DataConfig(source=str(tmp_path / name), separator=END_OF_DOCUMENT)
    assert list(read_documents(cfg)) == docs


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.xz"])
def test_json_lines_read_their_text_field(tmp_path, name):
    docs = documents(4)
    write_text(tmp_path / name, "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    assert list(read_documents(DataConfig(source=str(tmp_path / name), text_field="body"))) == docs
    with pytest.raises(DataError, match=r"^data\.text_field: .*c\.jsonl.*:1 has no string field 'text'"):
        list(read_documents(DataConfig(source=str(tmp_path / name))))
    write_text(tmp_path / f"bad-{name}", json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"^data\.source: .*bad-c\.jsonl.*:2 is not valid JSON"):
        list(read_documents(DataConfig(source=str(tmp_path / f"bad-{name}"))))


def test_parquet_reads_its_text_column(tmp_path):
    docs = documents(4)
    pq.write_table(pa.table({"text": docs, "n": list(range(4))}), tmp_path / "c.parquet", row_group_size=3)
    assert list(read_documents(DataConfig(source=str(tmp_path / "c.parquet")))) == docs
    with pytest.raises(DataError, match=r"^data\.text_field: .* has no column 'body'"):
        list(read_documents(DataConfig(source=str(tmp_path / "c.parquet"), text_field="body")))


def test_globs_directories_and_comma_lists_keep_a_fixed_order(tmp_path):
    docs = documents(4)
    for i, d in enumerate(docs):
        write_text(tmp_path / f"part{i}.txt", d)  # no separator: one document a file
    (tmp_path / "notes.md").write_text("not a corpus file")
    assert list(read_documents(DataConfig(source=str(tmp_path / "part*.txt")))) == docs
    assert list(read_documents(DataConfig(source=str(tmp_path)))) == docs
    listed = f"{tmp_path / 'part3.txt'}, {tmp_path / 'part*.txt'}"
    assert list(read_documents(DataConfig(source=listed))) == [docs[3], *docs[:3]]


def test_max_bytes_keeps_whole_documents_until_reached(tmp_path):
    docs = documents(6)
    write_text(tmp_path / "c.txt", with_separators(docs))
    limit = len(docs[0].encode()) + 1  # reached inside the second document, which is kept whole
    cfg = DataConfig(source=str(tmp_path / "c.txt"), separator=END_OF_DOCUMENT, max_bytes=limit)
    assert list(read_documents(cfg)) == docs[:2]


def test_stdlib_is_this_pythons_library_one_document_a_file():
    files = stdlib_files()
    assert len(files) > 500 and not any("site-packages" in f.parts for f in files)
    relative = [f.relative_to(files[0].parent).as_posix() for f in files]
    assert relative[0] == "__future__.py" and relative == sorted(relative)
    first = next(read_documents(DataConfig(max_bytes=1)))
    assert first == files[0].read_text(encoding="utf-8")


@pytest.mark.parametrize("source, message", [
    ("/no/such/dir/*.txt", r"^data\.source: no files match '/no/such/dir/\*\.txt'; give a path or glob of"),
    ("/no/such/file.txt", r"^data\.source: no files match '/no/such/file\.txt'"),
])
def test_missing_sources_raise_one_line(source, message):
    with pytest.raises(DataError, match=message) as e:
        content_hash(DataConfig(source=source))
    assert "\n" not in str(e.value)


def test_unsupported_file_and_bad_tokenizer_raise_one_line(tmp_path):
    (tmp_path / "notes.md").write_text("text")
    with pytest.raises(DataError, match=r"^data\.source: '.*notes\.md' is not a \.txt/\.gz/\.xz/\.jsonl/\.parquet"):
        content_hash(DataConfig(source=str(tmp_path / "notes.md")))
    with pytest.raises(DataError, match=r"^data\.tokenizer: no file .*missing\.json"):
        vocab_size_of(DataConfig(tokenizer=str(tmp_path / "missing.json")))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"^data\.tokenizer: .*bad\.json is not a tokenizer\.json") as e:
        vocab_size_of(DataConfig(tokenizer=str(tmp_path / "bad.json")))
    assert "\n" not in str(e.value)


# --- content hash ----------------------------------------------------------------------------------

def test_content_hash_follows_the_selected_text_not_the_tokenizer(tmp_path):
    docs, cfg = corpus(tmp_path)
    first = content_hash(cfg, tmp_path / "cache")
    assert len(first) == 16 and int(first, 16) >= 0
    assert content_hash(cfg, tmp_path / "cache") == first
    assert content_hash(cfg.model_copy(update={"tokenizer": "bpe", "vocab_size": 300}), tmp_path / "cache") == first
    assert content_hash(cfg.model_copy(update={"max_bytes": 10}), tmp_path / "cache") != first
    # The same text in another format and file hashes the same; the separator and text field are part of it.
    write_text(tmp_path / "other.txt.gz", with_separators(docs))
    assert content_hash(cfg.model_copy(update={"source": str(tmp_path / "other.txt.gz")}), tmp_path / "c2") == first
    write_text(tmp_path / "corpus.txt", with_separators(docs[:-1] + ["changed"]))
    assert content_hash(cfg, tmp_path / "cache") != first


# --- tokenizers ------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_utf8():
    text = "naïve café — 日本語 ✓\n\ttabs"
    ids = ByteTokenizer().encode_batch([text])[0]
    assert len(ids) == len(text.encode()) and ByteTokenizer().decode(ids) == text
    assert vocab_size_of(DataConfig()) == 257


def test_bpe_learns_merges_and_round_trips(tmp_path):
    docs = documents(40)
    bpe = train_bpe(docs, 320)
    assert bpe.vocab_size == 320
    text = "the quiet cat — naïve 日本 " + END_OF_DOCUMENT + " text"
    ids = bpe.encode_batch([text, docs[0]])
    assert bpe.decode(ids[0]) == text and bpe.decode(ids[1]) == docs[0]
    assert bpe.eod not in ids[0]  # a literal end-of-document string inside a document is plain text
    assert len(ids[1]) < len(docs[0].encode()) / 2  # frequent words became single tokens
    bpe.save(tmp_path / "tokenizer.json")
    assert vocab_size_of(DataConfig(tokenizer=str(tmp_path / "tokenizer.json"))) == 320
    assert load_tokenizer_file(tmp_path / "tokenizer.json").encode_batch([text])[0].tolist() == ids[0].tolist()


def test_prepared_bpe_is_trained_on_training_documents_only(tmp_path):
    docs, byte_cfg = corpus(tmp_path)
    cfg = byte_cfg.model_copy(update={"tokenizer": "bpe", "vocab_size": 300})
    data = prepare_data(cfg, tmp_path / "cache")
    assert data.vocab_size == vocab_size_of(cfg) == 300 and data.tokenizer_name == "bpe300"
    assert data.train.dtype == np.uint16
    assert sorted(split_docs(data.train, data.tokenizer) + split_docs(data.val, data.tokenizer)) == sorted(docs)
    # Trained on the training split only: the same BPE as training directly on those documents.
    reference = train_bpe(split_docs(data.train, data.tokenizer), 300)
    assert reference.tokenizer.get_vocab() == data.tokenizer.tokenizer.get_vocab()
    # A tokenizer.json file gives the same tokens as the BPE it was saved from.
    data.tokenizer.save(tmp_path / "tok.json")
    from_file = prepare_data(byte_cfg.model_copy(update={"tokenizer": str(tmp_path / "tok.json")}), tmp_path / "cache")
    assert np.array_equal(from_file.train, data.train) and from_file.directory != data.directory


# --- split and cache -------------------------------------------------------------------------------

def test_split_is_by_document_deterministic_and_holds_the_fraction(tmp_path):
    docs, cfg = corpus(tmp_path)
    data = prepare_data(cfg, tmp_path / "cache")
    train, val = split_docs(data.train, data.tokenizer), split_docs(data.val, data.tokenizer)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert [d for d in docs if d in set(val)] == val  # each split keeps the source order
    # Validation is the lowest-hashing documents, just enough of them to hold val_fraction of the bytes.
    assert max(map(split_hash, val)) < min(map(split_hash, train))
    highest = max(val, key=split_hash)
    assert utf8_size(val) >= 0.2 * utf8_size(docs) > utf8_size(val) - utf8_size([highest])
    again = prepare_data(cfg, tmp_path / "elsewhere")
    assert np.array_equal(again.val, data.val) and np.array_equal(again.train, data.train)


def test_second_prepare_opens_the_cache_without_rebuilding(tmp_path):
    _, cfg = corpus(tmp_path)
    first = prepare_data(cfg, tmp_path / "cache")
    stamp = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    second = prepare_data(cfg, tmp_path / "cache")
    assert second.directory == first.directory
    assert {p.name: p.stat().st_mtime_ns for p in second.directory.iterdir()} == stamp
    assert isinstance(second.train, np.memmap) and second.content_hash == content_hash(cfg)


def test_cache_dir_defaults_to_scaling_cache(tmp_path, monkeypatch):
    _, cfg = corpus(tmp_path)
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "env"))
    assert prepare_data(cfg).directory.parent == tmp_path / "env" / "tokens"


def _prepare_in_child(cfg_json: str, cache: str, barrier, results) -> None:
    barrier.wait()  # both processes ask at the same moment
    data = prepare_data(DataConfig.model_validate_json(cfg_json), Path(cache))
    meta = json.loads((data.directory / "meta.json").read_text())
    results.put((os.getpid(), meta["built_by_pid"], len(data.train)))


def test_two_processes_preparing_at_once_build_once(tmp_path):
    docs = documents(200, words=200)
    write_text(tmp_path / "corpus.txt", with_separators(docs))
    cfg = DataConfig(source=str(tmp_path / "corpus.txt"), separator=END_OF_DOCUMENT, tokenizer="bpe", vocab_size=400,
                    val_tokens=256)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (cfg.model_dump_json(), str(tmp_path / "cache"), barrier, results)
    procs = [ctx.Process(target=_prepare_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)  # each result is a few bytes, so a child can exit before its result is read
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = [results.get(timeout=5) for _ in procs]
    (pid_a, builder_a, n_a), (pid_b, builder_b, n_b) = outcomes
    assert builder_a == builder_b in {pid_a, pid_b} and n_a == n_b > 0
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "hashes"] == [
        prepare_data(cfg, tmp_path / "cache").directory.name]  # one folder, nothing half-built left


def test_too_small_validation_split_says_what_to_raise(tmp_path):
    _, cfg = corpus(tmp_path)
    with pytest.raises(DataError, match=r"^data\.val_fraction: the validation split has \d+ tokens .* fewer than "
                                        r"val_tokens \+ 1 = 1000001; raise val_fraction or max_bytes"):
        prepare_data(cfg.model_copy(update={"val_tokens": 1_000_000}), tmp_path / "cache")
    write_text(tmp_path / "one.txt", "a single document")
    with pytest.raises(DataError, match=r"^data\.source: the training split of .* is empty"):
        prepare_data(DataConfig(source=str(tmp_path / "one.txt"), val_tokens=256), tmp_path / "cache")


# --- batches ---------------------------------------------------------------------------------------

@pytest.fixture
def byte_data(tmp_path) -> TokenData:
    return prepare_data(corpus(tmp_path)[1], tmp_path / "cache")


def counting_data(n_tokens: int) -> TokenData:
    """Token i is i, so a row of a batch tells which part of the training tokens it is."""
    tokens = np.arange(n_tokens, dtype=np.uint32)
    return TokenData(train=tokens, val=tokens, vocab_size=n_tokens, content_hash="0" * 16, val_bytes_per_token=1.0,
                     tokenizer_name="counting", tokenizer=ByteTokenizer(), directory=Path("."))


def test_train_batches_are_shifted_windows_each_epoch_a_permutation():
    seq_len, n_seqs = 16, 8
    data = counting_data(17 * 100 + 5)  # 100 windows of 17 tokens, 5 tokens left over
    n = data.n_windows(seq_len)
    assert n == 100
    starts = []
    for step in range(25):  # two and a half epochs
        x, y = data.train_batch(step * n_seqs, n_seqs, seq_len, seed=3)
        assert x.shape == y.shape == (n_seqs, seq_len) and x.dtype == y.dtype == np.int64
        assert (x[:, 0] % (seq_len + 1) == 0).all()  # rows start on window boundaries
        assert np.array_equal(x, x[:, :1] + np.arange(seq_len)) and np.array_equal(y, x + 1)
        starts += list(x[:, 0] // (seq_len + 1))
    epochs = [starts[:100], starts[100:200]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(100)) and epochs[0] != epochs[1]
    other_seed = data.train_batch(0, n_seqs, seq_len, seed=4)[0][:, 0] // (seq_len + 1)
    assert list(other_seed) != starts[:n_seqs]


def test_resident_tokens_give_the_batches_the_host_gathers(byte_data):
    """runners.data.resident: the gather on the device's copy of the tokens reads exactly TokenData.gather's
    tokens, for a pack whose members repeat different amounts (windows of their own cut corpora)."""
    seq_len = 16
    members = [byte_data, byte_data.with_unique_tokens(5 * seq_len, seq_len)]
    windows = np.stack([m.train_windows(first_window=7, n_seqs=9, seq_len=seq_len, seed=s)
                        for s, m in enumerate(members)])
    host, resident = (TrainTokens(byte_data, torch.device("cpu"), resident=r) for r in (False, True))
    assert host.tokens is None and resident.tokens is not None
    expected = torch.from_numpy(byte_data.gather(windows, seq_len))
    for gathered in (host.batch(windows, seq_len), resident.batch(windows, seq_len)):
        assert gathered.dtype == torch.int64 and torch.equal(gathered, expected)
    assert windows[1].max() < 5  # the cut member read only its first five windows
    assert TrainTokens(byte_data, torch.device("cpu")).tokens is None  # on a CPU the memory map serves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by runners/bench/device/run.sh)")
def test_resident_tokens_on_the_gpu(byte_data):
    windows = byte_data.train_windows(first_window=3, n_seqs=8, seq_len=16, seed=1)
    on_gpu = TrainTokens(byte_data, torch.device("cuda"))
    assert on_gpu.tokens is not None  # a small corpus is held on the GPU by default
    assert torch.equal(on_gpu.batch(windows, 16).cpu(), torch.from_numpy(byte_data.gather(windows, 16)))


def test_train_batches_depend_on_position_and_seed_alone(byte_data, tmp_path):
    seq_len, per_step, micro = 16, 8, 2
    run = [byte_data.train_batch(step * per_step, per_step, seq_len, seed=0) for step in range(40)]  # crosses epochs
    data_module._permutation.cache_clear()
    fresh = prepare_data(corpus(tmp_path)[1], tmp_path / "cache")  # as after a restart
    step = 37
    resumed = [fresh.train_batch(step * per_step + j * micro, micro, seq_len, seed=0) for j in range(per_step // micro)]
    assert np.array_equal(np.concatenate([x for x, _ in resumed]), run[step][0])
    assert np.array_equal(np.concatenate([y for _, y in resumed]), run[step][1])


def test_epochs_count_passes_over_the_training_windows(byte_data):
    seq_len = 32
    one_pass = byte_data.n_windows(seq_len) * seq_len
    assert byte_data.n_windows(seq_len) == len(byte_data.train) // 33
    assert byte_data.epochs(one_pass, seq_len) == 1.0
    assert byte_data.epochs(one_pass // 4, seq_len) == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(DataError, match=r"^data\.max_bytes: the training split has \d+ tokens, less than one sequence"):
        byte_data.n_windows(10**9)


def test_validation_batches_are_the_fixed_first_tokens(byte_data):
    seq_len, val_tokens = 16, 200  # 12 sequences of 16, in batches of 5, 5 and 2
    batches = list(byte_data.val_batches(seq_len, val_tokens, n_seqs=5))
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    assert np.array_equal(x.ravel(), byte_data.val[:192]) and np.array_equal(y.ravel(), byte_data.val[1:193])
    again = np.concatenate([x for x, _ in byte_data.val_batches(seq_len, val_tokens, n_seqs=12)])
    assert np.array_equal(again, x)


def test_val_bytes_per_token_counts_the_fixed_sets_text(tmp_path):
    docs, cfg = corpus(tmp_path)
    data = prepare_data(cfg, tmp_path / "cache")
    fixed = np.asarray(data.val[1:cfg.val_tokens + 1])
    # Byte tokens are one byte each, except the end-of-document tokens, which stand for no text.
    assert data.val_bytes_per_token == (cfg.val_tokens - (fixed == 256).sum()) / cfg.val_tokens
    bpe = prepare_data(cfg.model_copy(update={"tokenizer": "bpe", "vocab_size": 300}), tmp_path / "cache")
    text = bpe.tokenizer.decode(bpe.val[1:cfg.val_tokens + 1])
    assert bpe.val_bytes_per_token == pytest.approx(len(text.encode()) / cfg.val_tokens)
    assert bpe.val_bytes_per_token > 2  # merges: several bytes a token


# --- the real English corpus -----------------------------------------------------------------------

@pytest.mark.skipif(not GUTENBERG.is_dir(), reason="the shared Gutenberg corpus is not on this machine")
def test_gutenberg_shard_reads_as_documents(tmp_path):
    cfg = DataConfig(source=str(GUTENBERG / "train-000.txt.xz"), separator=END_OF_DOCUMENT, max_bytes=3_000_000,
                     val_tokens=4096, val_fraction=0.2)
    docs = list(read_documents(cfg))
    assert len(docs) >= 2 and all(END_OF_DOCUMENT not in d and not d.endswith("\n") for d in docs)
    data = prepare_data(cfg, tmp_path / "cache")
    assert len(data.train) + len(data.val) == sum(len(d.encode()) + 1 for d in docs)


def test_unique_tokens_caps_the_distinct_positions_a_trial_sees_and_repeats_them_in_epochs():
    seq_len, n_seqs, unique = 16, 8, 16 * 40  # 40 windows of the 100 the split holds
    capped = counting_data(17 * 100).with_unique_tokens(unique, seq_len)
    steps = 4 * unique // (n_seqs * seq_len)  # D = 4 U
    xs = np.concatenate([capped.train_batch(step * n_seqs, n_seqs, seq_len, seed=7)[0] for step in range(steps)])
    positions, counts = np.unique(xs, return_counts=True)
    assert len(positions) == unique and positions.max() < 40 * 17  # exactly U, all from the first U tokens' windows
    assert (counts == 4).all() and capped.epochs(steps * n_seqs * seq_len, seq_len) == 4.0
    other_seed = capped.train_batch(0, n_seqs, seq_len, seed=8)[0]
    assert not np.array_equal(other_seed, xs[:n_seqs])  # the order of the epochs is the seed's
    assert counting_data(17 * 100).with_unique_tokens(None, seq_len).n_windows(seq_len) == 100
    with pytest.raises(DataError, match=r"^data\.unique_tokens: 3200 is not between one sequence \(16\) and "):
        counting_data(17 * 100).with_unique_tokens(3200, seq_len)

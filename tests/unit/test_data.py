"""Tests for train.data: corpus, tokenizer, cached preparation, and random-access loading."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from train.data import (
    EOT,
    TextFile,
    TokenDataset,
    load_tokenizer,
    preparation,
    prepare_dataset,
    read_meta,
    read_text_documents,
    train_bpe_tokenizer,
)
from train.data.prepare import main as prepare_main

SMALL_VOCAB = 300
ANIMALS = ["otter", "heron", "badger", "lynx", "falcon", "newt", "marmot", "ibis"]
PLACES = ["river", "meadow", "harbour", "forest", "quarry", "orchard", "glacier"]


def make_documents(count: int = 40) -> list[str]:
    """Distinct little documents; each carries its number, so no two are equal."""
    documents = []
    for index in range(count):
        animal, place = ANIMALS[index % len(ANIMALS)], PLACES[index % len(PLACES)]
        sentences = [
            f"Document {index} is about the {animal} that lives near the {place}.",
            f"Every morning the {animal} walks to the {place} and counts to {index * 7}.",
            "It is a quiet life, but a good one, and the weather is mostly kind.",
        ]
        documents.append(" ".join(sentences[: 1 + index % 3]) + f" (end of note {index})")
    return documents


def write_corpus(directory: Path, documents: list[str]) -> list[Path]:
    """Half the documents as .txt files, the other half as lines of one .jsonl file."""
    directory.mkdir(parents=True, exist_ok=True)
    half = len(documents) // 2
    paths = []
    for index, text in enumerate(documents[:half]):
        path = directory / f"doc{index:03d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    jsonl = directory / "rest.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents[half:]), encoding="utf-8")
    paths.append(jsonl)
    return paths


def stream_from_tars(data_dir: Path, split: str) -> np.ndarray:
    """The split's token stream read the plain way (tarfile + frombuffer), to check the memmap reader against."""
    meta = json.loads((data_dir / "meta.json").read_text())
    pieces = []
    for shard in meta["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard["file"]) as archive:
            members = sorted((m for m in archive.getmembers() if m.name.endswith(".tokens.bin")), key=lambda m: m.name)
            dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            pieces += [np.frombuffer(archive.extractfile(member).read(), dtype=dtype) for member in members]
    return np.concatenate(pieces).astype(np.int64)


def split_documents(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    boundaries = np.flatnonzero(tokens == eot)
    assert boundaries.size and boundaries[-1] == tokens.size - 1, "every document must end with EOT"
    return np.split(tokens[: boundaries[-1]], boundaries[:-1] + 1)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents()


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, documents) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"), documents)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, corpus_files) -> Path:
    """Tiny samples and shards, so every split spans several of each."""
    return prepare_dataset(
        corpus_files,
        tmp_path_factory.mktemp("cache"),
        vocab_size=SMALL_VOCAB,
        val_fraction=0.2,
        tokens_per_sample=16,
        samples_per_shard=4,
    )


# --- corpus -------------------------------------------------------------------------------------


def test_read_text_documents_reads_txt_whole_and_jsonl_by_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n\n{"body": "two", "id": 2}\n', encoding="utf-8")
    documents = list(read_text_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"], text_field="body"))
    assert isinstance(documents[0], TextFile) and documents[0].path == tmp_path / "a.txt"  # read when gone through
    assert [documents[0].read(), *documents[1:]] == ["first line\n\nsecond paragraph\n", "one", "two"]


def test_a_txt_file_is_read_in_chunks_with_text_modes_line_ends(tmp_path, monkeypatch):
    text = "".join(f"line {i}" + ("\r\n", "\r", "\n")[i % 3] for i in range(400))
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(TextFile, "CHUNK_CHARS", 7)
    chunks = list(TextFile(path).chunks())
    assert len(chunks) > 100 and max(map(len, chunks)) <= 7  # a \r\n split between chunks is still one \n
    assert "".join(chunks) == path.read_text(encoding="utf-8") == text.replace("\r\n", "\n").replace("\r", "\n")
    (tmp_path / "empty.txt").write_text("")
    assert list(TextFile(tmp_path / "empty.txt").chunks()) == [""]


@pytest.mark.parametrize(
    ("filename", "content", "text_field", "expected_in_message"),
    [
        ("notes.md", "hello", "text", "notes.md"),
        ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', "text", "bad.jsonl:2"),
        ("fields.jsonl", '{"text": "fine"}\n{"body": "wrong field"}\n', "text", "'text'"),
        ("fields.jsonl", '{"text": 5}\n', "text", "fields.jsonl:1"),
        # By line, not by the offset within a decoder's chunk; and a JSON-escaped lone surrogate.
        ("bytes.jsonl", '{"text": "fine"}\n' * 3000 + '{"text": "\udcff"}\n', "text",
         r"bytes.jsonl:3001: not valid UTF-8 text \(invalid start byte at byte 10 of the line\)"),
        # Counted from the start of the file, not of the chunk text mode was decoding.
        ("bytes.txt", "fine\n" * 300_000 + "\udcff", "text",
         r"bytes.txt: not valid UTF-8 text \(invalid start byte at byte 1500000\)"),
        ("cut.txt", "fine\n" * 3 + "\udce2\udc82", "text",
         r"cut.txt: not valid UTF-8 text \(unexpected end of data at byte 15\)"),
        ("surrogate.jsonl", '{"text": "fine"}\n{"text": "a\\ud800b"}\n', "text",
         r"surrogate.jsonl:2: text field 'text' is not valid Unicode"),
        # JSON that Python's decoder refuses other than with JSONDecodeError.
        ("deep.jsonl", '{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", "text",
         r"deep.jsonl:2: invalid JSON \(maximum recursion depth exceeded"),
        ("digits.jsonl", '{"text": "fine", "id": ' + "9" * 5000 + "}\n", "text",
         r"digits.jsonl:1: invalid JSON \(Exceeds the limit \(4300 digits\)"),
    ],
)
def test_bad_user_files_raise_value_error_naming_the_file(tmp_path, filename, content, text_field, expected_in_message):
    path = tmp_path / filename
    path.write_text(content, encoding="utf-8", errors="surrogateescape")  # (\udcff: the lone byte 0xff)
    with pytest.raises(ValueError, match=expected_in_message):
        [document.read() if isinstance(document, TextFile) else document
         for document in read_text_documents([path], text_field=text_field)]
    with pytest.raises(ValueError, match=expected_in_message):
        prepare_dataset([path], tmp_path / "cache", vocab_size=SMALL_VOCAB, text_field=text_field)
    assert not list((tmp_path / "cache").rglob("meta.json"))


def test_missing_file_fails_before_any_work(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ValueError, match="nowhere.txt"):
        read_text_documents([missing])  # not even iterated: paths are checked up front
    with pytest.raises(ValueError, match="nowhere.txt"):
        prepare_dataset([missing], tmp_path / "cache", vocab_size=SMALL_VOCAB)
    folder = tmp_path / "shards.txt"  # a directory that looks like a file
    folder.mkdir()
    with pytest.raises(ValueError, match=r"shards.txt: a directory; expected a .txt or .jsonl file"):
        read_text_documents([folder])


def test_bad_parameters_raise_value_error_naming_them(tmp_path, corpus_files):
    for arguments, name in [
        ({"vocab_size": 100}, "vocab_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"tokens_per_sample": 0}, "tokens_per_sample"),
    ]:
        with pytest.raises(ValueError, match=name):
            prepare_dataset(corpus_files, tmp_path, **arguments)
    with pytest.raises(ValueError, match="source"):
        prepare_dataset("my_corpus.txt", tmp_path)


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_round_trips_any_text_and_keeps_eot_whole(tmp_path, documents):
    tokenizer = train_bpe_tokenizer(documents, SMALL_VOCAB)
    assert tokenizer.get_vocab_size() <= SMALL_VOCAB
    for text in [documents[3], "  naïve café — 東京 🙂\n\ttabs and\r\nnewlines  ", ""]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert len(tokenizer.encode(EOT).ids) == 1
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    reloaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert reloaded.encode(documents[5]).ids == tokenizer.encode(documents[5]).ids
    with pytest.raises(ValueError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


# --- prepare_dataset ------------------------------------------------------------------------------


def test_prepared_layout_and_meta(small_dataset):
    meta = json.loads((small_dataset / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= SMALL_VOCAB
    assert small_dataset.name == meta["fingerprint"][:16]
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        assert [shard["file"] for shard in shards] == [f"{split}-{index:06d}.tar" for index in range(len(shards))]
        assert sum(shard["num_tokens"] for shard in shards) == meta["splits"][split]["num_tokens"]
    assert len(meta["splits"]["train"]["shards"]) >= 3
    with tarfile.open(small_dataset / "train-000000.tar") as archive:
        names = archive.getnames()
    assert names[:2] == ["00000000.tokens.bin", "00000001.tokens.bin"]
    assert not list(small_dataset.parent.glob(".*partial*"))


def test_train_and_validation_documents_are_disjoint_and_complete(small_dataset, documents):
    tokenizer = load_tokenizer(small_dataset / "tokenizer.json")
    eot = tokenizer.token_to_id(EOT)
    decoded = {
        split: [tokenizer.decode(doc.tolist()) for doc in split_documents(stream_from_tars(small_dataset, split), eot)]
        for split in ("train", "val")
    }
    assert decoded["val"], "validation must hold at least one document"
    assert not set(decoded["train"]) & set(decoded["val"])
    assert sorted(decoded["train"] + decoded["val"]) == sorted(documents)


def test_second_prepare_is_a_cache_hit(small_dataset, corpus_files, monkeypatch):
    meta_mtime = (small_dataset / "meta.json").stat().st_mtime_ns

    def must_not_train(*_args, **_kwargs):
        raise AssertionError("a cached dataset must not be prepared again")

    monkeypatch.setattr(preparation, "train_bpe_tokenizer", must_not_train)
    again = prepare_dataset(
        corpus_files,
        small_dataset.parent,
        vocab_size=SMALL_VOCAB,
        val_fraction=0.2,
        tokens_per_sample=16,
        samples_per_shard=4,
    )
    assert again == small_dataset
    assert (small_dataset / "meta.json").stat().st_mtime_ns == meta_mtime


def test_changed_input_gets_a_new_directory(tmp_path, documents):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    first = prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    assert prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB + 1) != first
    files[0].write_text("a completely different first document", encoding="utf-8")
    assert prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB) != first


def test_failed_prepare_leaves_nothing_that_looks_complete(tmp_path, documents, monkeypatch):
    files = write_corpus(tmp_path / "corpus", documents)
    cache = tmp_path / "cache"

    class CrashingShardWriter(preparation.TokenShardWriter):
        def write(self, tokens):
            super().write(tokens)
            if self.num_samples >= 2:  # some shards are already on disk
                raise RuntimeError("disk full")

    monkeypatch.setattr(preparation, "TokenShardWriter", CrashingShardWriter)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(files, cache, vocab_size=SMALL_VOCAB, tokens_per_sample=16)
    assert list(cache.iterdir()) == []

    monkeypatch.undo()
    built = prepare_dataset(files, cache, vocab_size=SMALL_VOCAB, tokens_per_sample=16)
    assert (built / "meta.json").is_file()
    assert sorted(path.name for path in cache.iterdir()) == [preparation.PUBLISH_LOCK, built.name]


def test_directory_without_meta_is_rebuilt_not_trusted(tmp_path, documents):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    built = prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    (built / "meta.json").unlink()  # as if a crash had happened just before meta.json was written
    assert prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB) == built
    assert TokenDataset(built, "train").num_tokens > 0


def test_a_cache_entry_missing_a_file_is_prepared_again(tmp_path, documents):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    built = prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    (built / "val-000000.tar").unlink()  # a cleaned-up cache, a partial copy
    assert prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB) == built
    assert TokenDataset(built, "val").num_tokens > 0


def test_a_shard_cut_short_is_prepared_again(tmp_path, documents):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    built = prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    shard = built / "train-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a copy stopped by a full disk
    assert prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB) == built
    assert shard.read_bytes() == whole  # byte-identical inputs give byte-identical shards


def test_a_killed_preparations_staging_directory_is_removed_by_the_next(tmp_path, documents):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process of this machine that has exited
    host, namespace, boot = preparation._owner_identity()

    def staging(name: str, owner: str) -> Path:
        folder = cache / f".0123456789abcdef.partial-{name}"
        folder.mkdir()
        (folder / "train-000000.tar").write_bytes(b"partial")
        (folder / "owner").write_text(owner)
        return folder

    killed = staging("killed", f"{host} {dead_pid} {namespace} {boot}")  # what a SIGKILL mid-preparation leaves
    rebooted = staging("rebooted", f"{host} {os.getpid()} {namespace} an-earlier-boot")  # its pid reused since
    running = staging("running", f"{host} {os.getpid()} {namespace} {boot}")  # another preparation, still going
    container = staging("container", f"{host} {dead_pid} pid:[1] {boot}")  # same host name, other pids
    elsewhere = staging("elsewhere", f"other-host 12345 {namespace} {boot}")  # another machine's
    files = write_corpus(tmp_path / "corpus", documents[:10])
    built = prepare_dataset(files, cache, vocab_size=SMALL_VOCAB)
    assert not killed.exists() and not rebooted.exists()
    assert running.exists() and container.exists() and elsewhere.exists()
    assert not (built / "owner").exists()
    os.utime(elsewhere, (time.time() - 8 * 24 * 3600,) * 2)  # untouched for over a week: abandoned
    prepare_dataset(write_corpus(tmp_path / "other", documents[10:20]), cache, vocab_size=SMALL_VOCAB)
    assert not elsewhere.exists() and running.exists() and container.exists()


def test_a_file_system_without_locks_still_publishes(tmp_path, documents, monkeypatch):
    import errno

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # Lustre without -o flock, some NFS mounts

    monkeypatch.setattr(preparation.fcntl, "flock", no_locks)
    files = write_corpus(tmp_path / "corpus", documents[:10])
    built = prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    assert TokenDataset(built, "train").num_tokens > 0


def test_a_file_given_twice_is_refused(tmp_path, documents):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    again = tmp_path / "corpus" / ".." / "corpus" / files[0].name  # the same file, spelled otherwise
    with pytest.raises(ValueError, match=rf"{again}: given twice \(also as {files[0]}\); list each file once"):
        prepare_dataset([*files, again], tmp_path / "cache", vocab_size=SMALL_VOCAB)


def test_text_that_spells_the_end_of_text_token_is_text(tmp_path, documents):
    # Otherwise the document is cut in two there, and the tokenizer's separator appears in its middle.
    texts = [*documents[:9], "a note about the marker <|endoftext|> as written in a file"]
    built = prepare_dataset(write_corpus(tmp_path / "corpus", texts), tmp_path / "cache", vocab_size=SMALL_VOCAB)
    meta = read_meta(built)
    eot = meta["eot_id"]
    tokens = np.concatenate([stream_from_tars(built, split) for split in ("train", "val")])
    assert int((tokens == eot).sum()) == len(texts)
    # The saved tokenizer still reads a prompt's own <|endoftext|> as the token.
    assert eot in load_tokenizer(built / "tokenizer.json").encode("x <|endoftext|> y").ids


def test_an_unusable_cache_directory_is_one_value_error(tmp_path, documents):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    (tmp_path / "taken").write_text("a file where the cache should go")
    with pytest.raises(ValueError, match=rf"^data.cache_dir {tmp_path / 'taken'}: cannot write the prepared dataset"):
        prepare_dataset(files, tmp_path / "taken", vocab_size=SMALL_VOCAB)


def test_command_line(tmp_path, documents, capsys):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    status = prepare_main([*map(str, files), "--out", str(tmp_path / "cache"), "--vocab-size", str(SMALL_VOCAB)])
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert (Path(out[0]) / "meta.json").is_file()
    assert out[1].startswith("train: ") and out[2].startswith("val: ")

    status = prepare_main([str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "cache")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert error[-1].startswith("error: ") and "absent.jsonl" in error[-1]

    # A malformed argument: one line too, not argparse's usage block.
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--vocab-size", "abc"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1
    assert error[0].startswith("error: argument --vocab-size: expected an integer from 300 to 2**32 - 1, got 'abc'")


@pytest.mark.parametrize("arguments, expected", [
    # Training's bounds: a dataset outside them could be prepared, never trained on.
    (["--vocab-size", "257"], "argument --vocab-size: expected an integer from 300 to 2**32 - 1, got '257'"),
    (["--val-fraction", "0.9"], "argument --val-fraction: expected a number above 0 and below 0.5, got '0.9'"),
    (["--tokens-per-sample", "0"], "argument --tokens-per-sample: expected a positive integer, got '0'"),
    (["--out", "{tmp_path}/taken"], "--out {tmp_path}/taken: a file; expected a folder path"),
])
def test_command_line_refuses_what_training_could_not_use_before_any_work(tmp_path, capsys, arguments, expected):
    (tmp_path / "taken").write_text("a file where the cache should go")
    arguments = [argument.format(tmp_path=tmp_path) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(tmp_path / "absent.txt"), *arguments])  # refused before the file is looked for
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1
    assert error[0].startswith(f"error: {expected.format(tmp_path=tmp_path)}"), error


# --- TokenDataset ---------------------------------------------------------------------------------


def test_read_matches_the_concatenated_stream_across_sample_and_shard_boundaries(small_dataset):
    dataset = TokenDataset(small_dataset, "train")
    stream = stream_from_tars(small_dataset, "train")
    assert dataset.num_tokens == stream.size
    np.testing.assert_array_equal(dataset.read(0, stream.size), stream)
    # 16 tokens a sample, 64 a shard: these windows start and end on both sides of both kinds of boundary.
    for start, length in [(0, 1), (15, 2), (16, 16), (10, 40), (63, 2), (60, 70), (stream.size - 5, 5), (7, 0)]:
        window = dataset.read(start, length)
        assert window.dtype == np.int64
        np.testing.assert_array_equal(window, stream[start : start + length])
    with pytest.raises(ValueError, match="past the end"):
        dataset.read(stream.size - 1, 2)


def test_sample_batch_is_a_pure_function_of_seed_and_step(small_dataset):
    dataset = TokenDataset(small_dataset, "train")
    stream = stream_from_tars(small_dataset, "train")
    batch = dataset.sample_batch(seed=1, step=5, batch_size=6, seq_len=12)
    assert batch.shape == (6, 13) and batch.dtype == np.int64
    np.testing.assert_array_equal(batch, TokenDataset(small_dataset, "train").sample_batch(1, 5, 6, 12))
    assert not np.array_equal(batch, dataset.sample_batch(1, 6, 6, 12))
    assert not np.array_equal(batch, dataset.sample_batch(2, 5, 6, 12))
    windows = np.lib.stride_tricks.sliding_window_view(stream, 13)
    for row in batch:
        assert (windows == row).all(axis=1).any(), "every row must be a contiguous slice of the stream"


def test_eval_batches_are_deterministic_consecutive_and_non_overlapping(small_dataset):
    dataset = TokenDataset(small_dataset, "val")
    stream = stream_from_tars(small_dataset, "val")
    seq_len = 7
    batches = list(dataset.eval_batches(batch_size=3, seq_len=seq_len, max_batches=1000))
    assert all(batch.shape[1] == seq_len + 1 for batch in batches)
    rows = np.concatenate(batches)
    assert rows.shape[0] == stream.size // (seq_len + 1)
    np.testing.assert_array_equal(rows.reshape(-1), stream[: rows.size])
    for again, batch in zip(dataset.eval_batches(3, seq_len, 1000), batches, strict=True):
        np.testing.assert_array_equal(again, batch)
    assert len(list(dataset.eval_batches(3, seq_len, max_batches=2))) == 2


def test_eval_batches_read_only_the_batch_asked_for(small_dataset, monkeypatch):
    dataset = TokenDataset(small_dataset, "val")
    seq_len, batch_size = 7, 4
    num_windows = dataset.num_tokens // (seq_len + 1)
    assert num_windows % batch_size, "the fixture must leave a shorter last batch for this test"
    batches = dataset.eval_batches(batch_size, seq_len)
    everything = list(batches)
    assert len(batches) == len(everything) == -(-num_windows // batch_size)
    assert batches.full_batches == num_windows // batch_size == len(everything) - 1
    assert [batches.rows(i) for i in range(len(batches))] == [batch.shape[0] for batch in everything]

    reads: list[int] = []
    real_read = dataset.read
    monkeypatch.setattr(dataset, "read", lambda start, length: (reads.append(start), real_read(start, length))[1])
    np.testing.assert_array_equal(batches[2], everything[2])
    assert reads == [(2 * batch_size + row) * (seq_len + 1) for row in range(batch_size)]
    reads.clear()
    assert batches.rows(len(batches) - 1) == num_windows % batch_size and not reads
    with pytest.raises(IndexError, match=f"eval batch {len(batches)} out of range: there are {len(batches)}"):
        batches[len(batches)]
    with pytest.raises(IndexError):
        batches.rows(-1)


def test_seq_len_longer_than_the_split_raises(small_dataset):
    dataset = TokenDataset(small_dataset, "val")
    with pytest.raises(ValueError, match=f"seq_len={dataset.num_tokens}.*{dataset.num_tokens}"):
        dataset.sample_batch(0, 0, 1, seq_len=dataset.num_tokens)
    with pytest.raises(ValueError, match="seq_len"):
        dataset.eval_batches(1, seq_len=dataset.num_tokens, max_batches=1)


def test_dataset_pickles_as_a_path_and_exposes_meta(small_dataset):
    dataset = TokenDataset(small_dataset, "train")
    meta = json.loads((small_dataset / "meta.json").read_text())
    assert (dataset.vocab_size, dataset.eot_id) == (meta["vocab_size"], meta["eot_id"])
    payload = pickle.dumps(dataset)
    assert len(payload) < 1000
    np.testing.assert_array_equal(pickle.loads(payload).read(3, 50), dataset.read(3, 50))


def test_corrupt_or_missing_files_raise_value_error_naming_them(tmp_path, small_dataset):
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ValueError, match="meta.json"):
        TokenDataset(broken, "train")
    (broken / "meta.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(ValueError, match="meta.json"):
        TokenDataset(broken, "train")
    for path in small_dataset.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "train-000001.tar").unlink()
    with pytest.raises(ValueError, match="train-000001.tar"):
        TokenDataset(broken, "train")
    (broken / "train-000001.tar").write_bytes(b"this is not a tar file")
    with pytest.raises(ValueError, match="train-000001.tar"):
        TokenDataset(broken, "train")
    with pytest.raises(ValueError, match="split"):
        TokenDataset(small_dataset, "test")


# --- the embedded corpus --------------------------------------------------------------------------


def test_embedded_corpus_prepares_enough_tokens(tmp_path):
    started = time.perf_counter()
    data_dir = prepare_dataset("embedded", tmp_path, vocab_size=4096)
    elapsed = time.perf_counter() - started
    train, val = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    assert train.num_tokens >= 500_000
    assert val.num_tokens >= 5_000
    assert train.vocab_size == 4096
    text = load_tokenizer(train.tokenizer_path).decode(train.read(1000, 200).tolist())
    assert sum(character.isalpha() for character in text) > 0.5 * len(text), "expected English prose"
    print(f"embedded corpus: {train.num_tokens} train / {val.num_tokens} val tokens in {elapsed:.1f}s")


def test_a_file_written_to_while_it_is_prepared_is_refused(tmp_path, documents, monkeypatch):
    files = write_corpus(tmp_path / "corpus", documents[:10])
    real_build = preparation._build

    def build_while_appended(*args):
        real_build(*args)
        with files[-1].open("a", encoding="utf-8") as jsonl:  # a writer still adding to the corpus
            jsonl.write(json.dumps({"text": "one more"}) + "\n")

    monkeypatch.setattr(preparation, "_build", build_while_appended)
    with pytest.raises(ValueError, match=r"changed while being prepared; prepare again once the files are written"):
        prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    assert not list((tmp_path / "cache").rglob("meta.json"))


def test_txt_files_stream_through_preparation_to_the_same_dataset(tmp_path, documents, monkeypatch):
    """Files read a few characters at a time and cut into small pieces give the shards and tokenizer
    of files read whole and encoded whole."""
    from train.data import tokenizer as tokenizer_module

    long_texts = ["\n\n".join(documents[i : i + 6]) for i in range(0, 24, 6)]
    files = write_corpus(tmp_path / "corpus", long_texts + documents[24:30])
    kwargs = dict(vocab_size=SMALL_VOCAB, val_fraction=0.3, tokens_per_sample=64, samples_per_shard=4)
    whole = prepare_dataset(files, tmp_path / "whole", **kwargs)
    monkeypatch.setattr(TextFile, "CHUNK_CHARS", 13)
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 50)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 120)
    read: list[int] = []
    real_chunks = TextFile.chunks
    monkeypatch.setattr(TextFile, "chunks", lambda self: (read.append(len(c)) or c for c in real_chunks(self)))
    streamed = prepare_dataset(files, tmp_path / "streamed", **kwargs)
    assert read and max(read) <= 13
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in streamed.iterdir())
    for path in whole.iterdir():
        assert path.read_bytes() == (streamed / path.name).read_bytes(), path.name


def test_an_evaluated_text_file_streams_to_the_tokens_of_the_whole_file(tmp_path, documents, monkeypatch):
    from train.config import ConfigError
    from train.data import tokenizer as tokenizer_module
    from train.evaluate import text_windows

    tokenizer = train_bpe_tokenizer(documents, SMALL_VOCAB)
    path = tmp_path / "held_out.txt"
    path.write_bytes("\r\n\n".join(documents[:8]).encode("utf-8"))
    monkeypatch.setattr(TextFile, "CHUNK_CHARS", 11)
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 30)
    windows = text_windows(path, tokenizer, eot=7, seq_len=16)
    whole = [7, *tokenizer.encode(path.read_text(encoding="utf-8")).ids]
    assert np.concatenate(windows).tolist() == whole and all(len(w) == 17 for w in windows[:-1])
    path.write_bytes(b"fine\n\xff")
    with pytest.raises(ConfigError, match=rf"^--text {path}: not valid UTF-8 text \(invalid start byte at byte 5\)$"):
        text_windows(path, tokenizer, eot=7, seq_len=16)


def test_more_documents_than_counted_are_refused_in_one_line(tmp_path, documents, monkeypatch):
    calls = []

    def growing(source_spec, text_field):  # a .jsonl still being written: one line more at every pass
        return lambda: calls.append(1) or iter(documents[:10 + len(calls)])

    monkeypatch.setattr(preparation, "_reiterable_documents", growing)
    files = write_corpus(tmp_path / "corpus", documents[:10])
    with pytest.raises(ValueError, match=r"^the data files changed while being prepared \(more documents than counted\)"):
        prepare_dataset(files, tmp_path / "cache", vocab_size=SMALL_VOCAB)
    assert len(calls) == 2 and not list((tmp_path / "cache").rglob("meta.json"))  # stopped in the tokenizer's pass


def test_long_documents_encode_in_pieces_to_the_same_tokens(monkeypatch, documents):
    """The oracle is the tokenizer on each whole document; pieces small enough that every document is
    cut many times, at newlines next to spaces, tabs, blank lines, digits, punctuation and accents."""
    import random

    from train.data import tokenizer as tokenizer_module

    rng = random.Random(0)
    words = ["otter", "Heron", "42", "3.14", "don't", "naïve", "<|endoftext|>", "—", "x", "", "(a)", "'s"]
    gaps = [" ", "  ", "\n", "\n\n", " \n", "\n ", "\t", "\r\n", "\n\t", " \n\n ", "\x1c", " \x1c", "\x1c\n",
            "\n\x1c", "\x85", " \x85", "\u3000\u3000", "\xa0 ", "\n\xa0", "    "]
    texts = ["".join(rng.choice(words) + rng.choice(gaps) for _ in range(count)) for count in (3, 200, 900)]
    tokenizer = train_bpe_tokenizer(documents + texts, SMALL_VOCAB)
    tokenizer.encode_special_tokens = True
    expected = [tokenizer.encode(text).ids for text in texts]
    dtype = np.dtype("uint16")
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 40)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 100)
    assert len(tokenizer_module.document_pieces(texts[2])) > 50
    assert "".join(tokenizer_module.document_pieces(texts[2])) == texts[2]
    encoded = _encoded_documents(tokenizer, texts, dtype)
    assert [array.dtype for array in encoded] == [dtype] * 3 and [array.tolist() for array in encoded] == expected
    # Many random texts, cut at every piece size from 5 to 60 characters.
    palette = words + gaps + ["é", "ß", "😀", "1", "-", ".", "\x1f"]
    for size in range(5, 61, 5):
        monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", size)
        text = "".join(rng.choice(palette) for _ in range(300))
        assert _encoded_documents(tokenizer, [text], dtype)[0].tolist() == tokenizer.encode(text).ids, size
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 40)
    # Text whose only breaks are blank lines and indentation (code, paragraphs) is cut too.
    paragraphs = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(20))
    assert len(tokenizer_module.document_pieces(paragraphs)) > 10
    assert _encoded_documents(tokenizer, [paragraphs], dtype)[0].tolist() == tokenizer.encode(paragraphs).ids
    # A document with no safe place to cut is encoded whole.
    unbroken = "word " * 100
    assert tokenizer_module.document_pieces(unbroken) == [unbroken]
    assert _encoded_documents(tokenizer, [unbroken], dtype)[0].tolist() == tokenizer.encode(unbroken).ids
    # Read in chunks (a .txt file), cut only where both sides are read: the same tokens, for any chunk size.
    for chunk_size in (1, 2, 3, 7, 40, 41, 97, 10_000):
        chunks = [texts[2][i : i + chunk_size] for i in range(0, len(texts[2]), chunk_size)]
        pieces = list(tokenizer_module.streamed_pieces(chunks))
        assert "".join(pieces) == texts[2] and len(pieces) > 50 and max(map(len, pieces)) <= 40 + chunk_size, chunk_size
        encoded = [ids for _, ids in tokenizer_module.encode_pieces(tokenizer, ((0, p) for p in pieces), dtype)]
        assert np.concatenate(encoded).tolist() == expected[2], chunk_size
    assert list(tokenizer_module.streamed_pieces([])) == [""] == list(tokenizer_module.streamed_pieces(["", ""]))
    # The trainer, given the pieces, learns the merges it learns from the whole documents.
    whole = train_bpe_tokenizer(texts, SMALL_VOCAB)
    pieced = train_bpe_tokenizer((p for text in texts for p in tokenizer_module.document_pieces(text)), SMALL_VOCAB)
    assert pieced.get_vocab() == whole.get_vocab()


def _encoded_documents(tokenizer, documents: list[str], dtype) -> list[np.ndarray]:
    """Each document's ids as preparation produces them: cut into pieces, the pieces encoded in calls."""
    from train.data import tokenizer as tokenizer_module

    ids: list[list[np.ndarray]] = [[] for _ in documents]
    pieces = ((index, piece) for index, text in enumerate(documents) for piece in tokenizer_module.document_pieces(text))
    for index, piece_ids in tokenizer_module.encode_pieces(tokenizer, pieces, dtype):
        ids[index].append(piece_ids)
    return [np.concatenate(parts) if parts else np.zeros(0, dtype) for parts in ids]

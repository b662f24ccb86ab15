"""Turning a text corpus into a cached, tokenized, sharded dataset (the command line is in prepare.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from train.data.corpus import (
    EMBEDDED_CORPUS_VERSION,
    TextFile,
    check_document_files,
    embedded_corpus_documents,
    read_text_documents,
)
from train.data.layout import (
    FORMAT_VERSION,
    META_FILENAME,
    SPLITS,
    TOKENIZER_FILENAME,
    token_dtype,
)
from train.data.shards import TokenShardWriter
from train.data.split import validation_mask
from train.data.tokenizer import (
    EOT,
    MIN_VOCAB_SIZE,
    encode_pieces,
    eot_id,
    streamed_pieces,
    train_bpe_tokenizer,
)

EMBEDDED_SOURCE = "embedded"


def prepare_dataset(
    source: str | Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str],
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    tokens_per_sample: int = 65536,
    text_field: str = "text",
    seed: int = 0,
    samples_per_shard: int = 64,
    announce_cached: bool = True,
    only_cached: bool = False,
    cache_dir_setting: str = "data.cache_dir",
) -> Path | None:
    """Tokenize `source` ("embedded", or a list of .txt/.jsonl files) into `cache_dir/<fingerprint[:16]>`
    and return that directory.

    The directory name is a hash of the source (each file's path, size and mtime) and of every
    parameter, so a repeated call with the same inputs returns at once without doing any work,
    and a changed input gets a fresh directory. The dataset is built in a hidden sibling
    directory and renamed into place only when complete: an interrupted run leaves nothing that
    looks finished. `only_cached`: None instead of preparing what the cache does not hold.
    `cache_dir_setting`: how errors name `cache_dir` (the training setting, or a command's flag).
    """
    source_spec = _source_spec(source)
    parameters = _checked_parameters(vocab_size, val_fraction, tokens_per_sample, text_field, seed, samples_per_shard)
    fingerprint = _fingerprint(source_spec, parameters)
    cache_root = Path(cache_dir)
    target = cache_root / fingerprint[:16]
    if _is_complete(target, fingerprint):
        if announce_cached:  # (off for the ranks that find what rank 0 just prepared or announced)
            _progress(f"cached dataset {target}")
        return target
    if only_cached:
        return None

    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(cache_root)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_root))
        try:
            host, namespace, boot = _owner_identity()
            (staging / STAGING_OWNER).write_text(f"{host} {os.getpid()} {namespace} {boot}", encoding="utf-8")
            _build(staging, source_spec, parameters, fingerprint)
            if source_spec["kind"] != EMBEDDED_SOURCE and _source_spec(source) != source_spec:
                raise ValueError(f"{', '.join(f['path'] for f in source_spec['files'])}: changed while being "
                                 "prepared; prepare again once the files are written")
            _publish(staging, target, fingerprint)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:  # an unusable cache directory, a full disk: the user's to fix, in one line
        where = error.filename or cache_root
        raise ValueError(f"{cache_dir_setting} {cache_root}: cannot write the prepared dataset ({where}: "
                         f"{error.strerror or error})") from None
    return target


def _source_spec(source: object) -> dict:
    if isinstance(source, str) and source == EMBEDDED_SOURCE:
        # The embedded corpus is whatever this Python's standard library contains.
        return {"kind": EMBEDDED_SOURCE, "corpus_version": EMBEDDED_CORPUS_VERSION, "python": platform.python_version()}
    if isinstance(source, (str, os.PathLike)) or not isinstance(source, Sequence):
        # A ValueError, like every other mistake in the user's input, so callers need catch only one.
        shown = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        raise ValueError(f"source must be {EMBEDDED_SOURCE!r} or a list of .txt/.jsonl files, got {shown}")
    files = []
    for file in check_document_files(source):
        status = file.stat()
        # Size and modification time rather than a content hash: a cache hit on a corpus of many
        # gigabytes must not read it all again just to find out nothing changed.
        files.append({"path": str(file.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns})
    return {"kind": "files", "files": files}


def _checked_parameters(
    vocab_size: object,
    val_fraction: object,
    tokens_per_sample: object,
    text_field: object,
    seed: object,
    samples_per_shard: object,
) -> dict:
    if not _is_int(vocab_size) or not MIN_VOCAB_SIZE <= vocab_size < 2**32:
        raise ValueError(f"vocab_size must be an integer between {MIN_VOCAB_SIZE} and 2**32 - 1, got {vocab_size!r}")
    if not isinstance(val_fraction, (int, float)) or math.isnan(val_fraction) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    if not _is_int(tokens_per_sample) or tokens_per_sample < 1:
        raise ValueError(f"tokens_per_sample must be a positive integer, got {tokens_per_sample!r}")
    if not _is_int(samples_per_shard) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return {
        "vocab_size": vocab_size,
        "val_fraction": float(val_fraction),
        "tokens_per_sample": tokens_per_sample,
        "samples_per_shard": samples_per_shard,
        "text_field": text_field,
        "seed": seed,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _fingerprint(source_spec: dict, parameters: dict) -> str:
    identity = {"format_version": FORMAT_VERSION, "source": source_spec, "parameters": parameters}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _is_complete(directory: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads((directory / META_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("fingerprint") == fingerprint
        and meta.get("format_version") == FORMAT_VERSION
        and _files_present(directory, meta)
    )


def _files_present(directory: Path, meta: dict) -> bool:
    """Every file meta.json lists is there, each shard at the size it was written (where meta.json
    records one): a cache entry with a shard or its tokenizer deleted, or a shard cut short, is
    prepared again rather than trusted (and failing at every start, or mid-run)."""
    try:
        shards = [shard for split in SPLITS for shard in meta["splits"][split]["shards"]]
        files = [{"file": TOKENIZER_FILENAME}, *shards]
        for entry in files:  # one stat per file: this runs at every start that finds the dataset cached
            status = (directory / entry["file"]).stat()
            # (Datasets prepared before sizes were recorded have no "bytes": their shards are taken as they are.)
            if not stat.S_ISREG(status.st_mode) or entry.get("bytes", status.st_size) != status.st_size:
                return False
    except (KeyError, TypeError, OSError):
        return False
    return True


def _reiterable_documents(source_spec: dict, text_field: str) -> Callable[[], Iterable[str]]:
    """The documents can be gone through several times (counting, tokenizer training, encoding)."""
    if source_spec["kind"] == EMBEDDED_SOURCE:
        # A few MB of text that takes seconds to extract: extracting it once and keeping it is
        # much faster than parsing the standard library three times.
        documents = list(embedded_corpus_documents())
        return lambda: documents
    # User corpora can be larger than memory, so they are streamed from disk on every pass.
    files = [spec["path"] for spec in source_spec["files"]]
    return lambda: read_text_documents(files, text_field)


def _build(directory: Path, source_spec: dict, parameters: dict, fingerprint: str) -> None:
    started = time.monotonic()
    documents = _reiterable_documents(source_spec, parameters["text_field"])
    num_documents = _count_checking(documents())
    is_validation = validation_mask(num_documents, parameters["val_fraction"], parameters["seed"])
    _progress(
        f"{num_documents} documents ({int(is_validation.sum())} for validation), {time.monotonic() - started:.1f}s"
    )

    # Trained on the training documents only, so nothing about the validation text leaks into the vocabulary.
    # Long ones in pieces cut between pre-tokens: the same counts, so the same merges, in bounded memory.
    training_pieces = (piece for index, document in _numbered(documents(), num_documents) if not is_validation[index]
                       for piece in _pieces(document))
    tokenizer = train_bpe_tokenizer(training_pieces, parameters["vocab_size"])
    end_of_text = eot_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    _progress(f"trained tokenizer with {tokenizer.get_vocab_size()} tokens, {time.monotonic() - started:.1f}s")

    writers = {
        split: TokenShardWriter(
            directory, split, parameters["tokens_per_sample"], parameters["samples_per_shard"], dtype
        )
        for split in SPLITS
    }
    document_counts = dict.fromkeys(SPLITS, 0)
    separator = np.array([end_of_text], dtype=dtype)
    # Text that spells out the end-of-text token is text: only the separator written below is one.
    tokenizer.encode_special_tokens = True
    try:
        # Piece by piece, each written as it is encoded: a document (a whole .txt file) of any size
        # streams through. A document's pieces come one after the other; the separator follows its last.
        pieces = ((index, piece) for index, document in _numbered(documents(), num_documents) for piece in _pieces(document))
        current = -1
        for index, ids in encode_pieces(tokenizer, pieces, dtype):
            if index != current:
                if current >= 0:
                    _end_document(writers, document_counts, is_validation[current], separator)
                current = index
            writers["val" if is_validation[index] else "train"].write(ids)
        if current >= 0:
            _end_document(writers, document_counts, is_validation[current], separator)
        shards = {split: writer.finish() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.close()
    _progress(
        ", ".join(f"{split} {writers[split].num_tokens:,} tokens" for split in SPLITS)
        + f", {time.monotonic() - started:.1f}s"
    )

    tokenizer.encode_special_tokens = False  # a prompt's own <|endoftext|> stays the token
    tokenizer.save(str(directory / TOKENIZER_FILENAME))
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": source_spec,
        "parameters": parameters,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_token": EOT,
        "eot_id": end_of_text,
        "dtype": dtype.name,
        "tokenizer": TOKENIZER_FILENAME,
        "splits": {
            split: {
                "num_documents": document_counts[split],
                "num_tokens": writers[split].num_tokens,
                "num_samples": writers[split].num_samples,
                "shards": shards[split],
            }
            for split in SPLITS
        },
    }
    # Written last: within the finished directory, meta.json is the mark of completeness.
    (directory / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _count_checking(documents: Iterable[str | TextFile]) -> int:
    """How many documents there are. Each .txt file is read through (a chunk at a time) on the way, so
    that a bad byte stops the preparation now, not after the tokenizer has been trained."""
    count = 0
    for document in documents:
        if isinstance(document, TextFile):
            for _ in document.chunks():
                pass
        count += 1
    return count


def _numbered(documents: Iterable[str | TextFile], num_documents: int) -> Iterator[tuple[int, str | TextFile]]:
    """(index, document), refusing a document past the `num_documents` counted (a file still being written)."""
    for index, document in enumerate(documents):
        if index >= num_documents:
            raise ValueError("the data files changed while being prepared (more documents than counted); "
                             "prepare again once they are written")
        yield index, document


def _pieces(document: str | TextFile) -> Iterable[str]:
    """The document in pieces cut where no token changes (train/data/tokenizer.py); a file is read as it goes."""
    return streamed_pieces((document,) if isinstance(document, str) else document.chunks())


def _end_document(writers: dict[str, TokenShardWriter], counts: dict[str, int], validation: bool, separator: np.ndarray) -> None:
    split = "val" if validation else "train"
    writers[split].write(separator)
    counts[split] += 1


def _publish(staging: Path, target: Path, fingerprint: str) -> None:
    # Under a lock where the file system has one: without it, a process that found `target`
    # incomplete could delete it just after another process renamed its complete dataset there.
    with _locked(target.parent / PUBLISH_LOCK):
        if _is_complete(target, fingerprint):
            # Another process (say, another rank) published the same dataset while we built ours;
            # theirs is as good as ours, and someone may already be reading it.
            return
        if target.exists():
            # Only complete datasets are ever renamed into place, so an incomplete directory here
            # was not made by this code (or was damaged since) and can go.
            shutil.rmtree(target, ignore_errors=True)
        (staging / STAGING_OWNER).unlink(missing_ok=True)  # the building process's, not the dataset's
        # mkdtemp made the directory private (0700); a prepared dataset is meant to be shared.
        staging.chmod(0o755)
        try:
            os.rename(staging, target)
        except OSError:
            # Lost a race for the same name after all (no lock on this file system): fine if the
            # winner's dataset is complete.
            if not _is_complete(target, fingerprint):
                raise


PUBLISH_LOCK = ".publish.lock"
"""In the cache folder: the lock file of `_publish` (empty; it stays)."""
LOCK_UNSUPPORTED = {errno.ENOLCK, errno.EBADF, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
"""What flock raises where the file system has no locks (Lustre without -o flock, some NFS setups)."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on the file `path` (created if missing; opened for writing, which
    NFS's emulation of flock needs) for this block; without one where the file system has none."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in LOCK_UNSUPPORTED:
                raise
        yield
    finally:
        os.close(descriptor)  # (closing releases the lock)


STAGING_OWNER = "owner"
"""In a staging directory: `<host> <pid> <pid namespace> <boot id>` of the process building it."""
ABANDONED_AFTER_S = 7 * 24 * 3600
"""A staging directory whose owner this process cannot check (another machine's or container's, or
an older one's) and untouched this long is taken to be abandoned."""


def _owner_identity() -> list[str]:
    """Who may judge whether a pid is alive: the same host, the same pid namespace (containers that
    share a host name have their own pids), the same boot (pids are reused after a reboot)."""
    return [socket.gethostname(), _read_link_or_file("/proc/self/ns/pid"), _read_link_or_file("/proc/sys/kernel/random/boot_id")]


def _read_link_or_file(path: str) -> str:
    try:
        return os.readlink(path) if os.path.islink(path) else Path(path).read_text().strip()
    except OSError:
        return "?"


def _remove_abandoned_staging(cache_root: Path) -> None:
    """Staging directories of preparations that were killed before they could clean up (SIGKILL, a
    node lost): their partial shards would otherwise stay on disk for good. One whose owner ran in
    this pid namespace on this machine and has exited (or whose machine has rebooted since) goes at
    once; any other only once untouched for ABANDONED_AFTER_S."""
    host, namespace, boot = _owner_identity()
    for staging in cache_root.glob(".*.partial-*"):
        try:
            owner_host, pid, owner_namespace, owner_boot = (staging / STAGING_OWNER).read_text(encoding="utf-8").split()
            same_machine = owner_host == host and "?" not in (namespace, boot) and owner_namespace == namespace
            abandoned = same_machine and (owner_boot != boot or not _process_alive(int(pid)))
        except (OSError, ValueError):
            abandoned = False
        try:
            abandoned = abandoned or time.time() - staging.stat().st_mtime > ABANDONED_AFTER_S
        except OSError:
            continue  # gone meanwhile: its owner finished
        if abandoned:
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _progress(message: str) -> None:
    print(f"[prepare] {message}", file=sys.stderr, flush=True)

"""Random access to one split of a prepared dataset, straight from its tar shards."""

from __future__ import annotations

import bisect
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from train.data.layout import (
    FORMAT_VERSION,
    META_FILENAME,
    SPLITS,
    TOKENIZER_FILENAME,
    TOKENS_EXTENSION,
)

SUPPORTED_DTYPES = ("uint16", "uint32")


class TokenDataset:
    """One split (`"train"` or `"val"`) of a dataset made by `prepare_dataset`, seen as one long token stream.

    The shards are never loaded into memory. An uncompressed tar stores each member's bytes
    contiguously at a known offset, so every sample is memory-mapped in place (one read-only map
    per shard). That gives constant memory however big the corpus, and cheap reads of any window
    at any offset, which is what makes batches a pure function of (seed, step): deterministic,
    exactly resumable, and identical whatever the world size, with no per-rank iterator state
    to save or to keep in step.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        meta = read_meta(self.data_dir)
        self._vocab_size: int = meta["vocab_size"]
        self._eot_id: int = meta["eot_id"]
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        split_meta = meta["splits"][split]
        self._pieces: list[np.ndarray] = []
        self._starts: list[int] = []  # stream offset of each piece's first token, for bisect
        total = 0
        for shard in split_meta["shards"]:
            for piece in _memory_mapped_samples(self.data_dir / shard["file"], dtype, shard["num_tokens"]):
                if piece.size == 0:
                    continue
                self._starts.append(total)
                self._pieces.append(piece)
                total += piece.size
        if total != split_meta["num_tokens"]:
            raise ValueError(
                f"{self.data_dir / META_FILENAME}: {split} split should hold {split_meta['num_tokens']} tokens "
                f"but its shards hold {total}"
            )
        self._num_tokens = total

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / TOKENIZER_FILENAME

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens `[start, start + length)` of the split's stream as int64, across sample and shard boundaries."""
        if not _is_int(start) or not _is_int(length) or start < 0 or length < 0:
            raise ValueError(f"start and length must be non-negative integers, got start={start!r}, length={length!r}")
        if start + length > self._num_tokens:
            raise ValueError(
                f"start + length = {start + length} is past the end of the {self.split} split "
                f"({self._num_tokens} tokens)"
            )
        tokens = np.empty(length, dtype=np.int64)
        piece_index = bisect.bisect_right(self._starts, start) - 1
        filled = 0
        while filled < length:
            piece = self._pieces[piece_index]
            offset = start + filled - self._starts[piece_index]
            count = min(piece.size - offset, length - filled)
            tokens[filled : filled + count] = piece[offset : offset + count]
            filled += count
            piece_index += 1
        return tokens

    def sample_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """The global batch for training step `step`: `[batch_size, seq_len + 1]` int64 windows at
        uniformly random offsets (inputs are `[:, :-1]`, targets `[:, 1:]`).

        The generator is seeded with (seed, step) rather than carried from step to step, so a run
        resumed at step s draws exactly the batch it would have drawn, and every rank computes the
        same global batch and takes its own rows, whatever the number of ranks.
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if not _is_int(seed) or not _is_int(step) or seed < 0 or step < 0:
            raise ValueError(f"seed and step must be non-negative integers, got seed={seed!r}, step={step!r}")
        window = self._checked_window(seq_len)
        generator = np.random.default_rng([seed, step])
        starts = generator.integers(0, self._num_tokens - window, size=batch_size, endpoint=True)
        return np.stack([self.read(int(start), window) for start in starts])

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> EvalBatches:
        """Consecutive, non-overlapping `seq_len + 1` windows from the start of the split, in batches of
        `[batch_size, seq_len + 1]` (the last one may have fewer rows); at most `max_batches` batches
        (None: the whole split). The same every time, so validation losses are comparable across runs.
        A sequence that reads a batch only when it is indexed (or iterated to).
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
        window = self._checked_window(seq_len)
        num_windows = self._num_tokens // window
        if max_batches is not None:
            num_windows = min(num_windows, max_batches * batch_size)
        return EvalBatches(self, batch_size, window, num_windows)

    def _checked_window(self, seq_len: int) -> int:
        window = seq_len + 1
        if self._num_tokens < window:
            raise ValueError(
                f"seq_len={seq_len} needs at least {window} tokens but the {self.split} split of "
                f"{self.data_dir} has only {self._num_tokens}"
            )
        return window

    # Pickled (for example into spawned data-loader workers) as a path, not as the mapped tokens:
    # pickling a memmap would copy the whole split into the pickle.
    def __getstate__(self) -> dict:
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data_dir"], state["split"])

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.data_dir)!r}, {self.split!r}, num_tokens={self._num_tokens})"


class EvalBatches(Sequence[np.ndarray]):
    """`TokenDataset.eval_batches`: batch i is windows [i * batch_size, (i + 1) * batch_size) of the split,
    read when it is asked for. A rank that takes every n-th batch of a large validation split reads
    only its own, and the shapes are known without reading any (`rows`)."""

    def __init__(self, dataset: TokenDataset, batch_size: int, window: int, num_windows: int) -> None:
        self.dataset, self.batch_size, self.window, self.num_windows = dataset, batch_size, window, num_windows

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    @property
    def full_batches(self) -> int:
        """How many batches hold `batch_size` rows (all but a shorter last one)."""
        return self.num_windows // self.batch_size

    def rows(self, index: int) -> int:
        """The number of rows of batch `index`, without reading it."""
        return min(self.batch_size, self.num_windows - self._checked(index) * self.batch_size)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        first = self._checked(index) * self.batch_size
        rows = range(first, min(first + self.batch_size, self.num_windows))
        return np.stack([self.dataset.read(row * self.window, self.window) for row in rows])

    def _checked(self, index: int) -> int:
        if not _is_int(index):
            raise TypeError(f"eval batch index must be an integer, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"eval batch {index} out of range: there are {len(self)}")
        return index


def read_meta(data_dir: str | os.PathLike[str]) -> dict:
    """A prepared dataset's meta.json, after checking it has what the loader relies on."""
    path = Path(data_dir) / META_FILENAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; expected a dataset directory made by prepare_dataset") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable or not JSON ({error})") from None
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return meta


def _meta_problem(meta: object) -> str | None:
    if not isinstance(meta, dict):
        return "expected a JSON object"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format_version is {meta.get('format_version')!r}, expected {FORMAT_VERSION}; prepare the dataset again"
    for key in ("vocab_size", "eot_id"):
        if not _is_int(meta.get(key)) or meta[key] < 0:
            return f"{key} must be a non-negative integer"
    if meta.get("dtype") not in SUPPORTED_DTYPES:
        return f"dtype is {meta.get('dtype')!r}, expected one of {', '.join(SUPPORTED_DTYPES)}"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "splits must be an object"
    for split in SPLITS:
        split_meta = splits.get(split)
        if not isinstance(split_meta, dict) or not _is_int(split_meta.get("num_tokens")):
            return f"splits.{split} must give num_tokens"
        shards = split_meta.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(shard, dict) and isinstance(shard.get("file"), str) and _is_int(shard.get("num_tokens"))
            for shard in shards
        ):
            return f"splits.{split}.shards must be a list of {{file, num_tokens}}"
    return None


def _memory_mapped_samples(path: Path, dtype: np.dtype, expected_tokens: int) -> list[np.ndarray]:
    """The token samples of one shard, in stream order, as read-only views of one memory map."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            # Listing an uncompressed tar only reads its 512-byte headers, seeking over the data.
            members = [
                member
                for member in archive.getmembers()
                if member.isfile() and member.name.endswith("." + TOKENS_EXTENSION)
            ]
    except FileNotFoundError:
        raise ValueError(f"{path}: shard is missing") from None
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"{path}: not a readable uncompressed tar shard ({error})") from None
    # In the archive's order, which is stream order: the writer appends samples as they come (their
    # zero-padded keys sort in that order only up to 10^8 samples).
    if sum(member.size for member in members) != expected_tokens * dtype.itemsize:
        raise ValueError(
            f"{path}: holds {sum(member.size for member in members)} bytes of tokens, "
            f"expected {expected_tokens} tokens of {dtype.itemsize} bytes"
        )
    if not members:
        return []
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    samples = []
    for member in members:
        end = member.offset_data + member.size
        if member.size % dtype.itemsize or end > mapped.size:
            raise ValueError(f"{path}: member {member.name} is truncated or not a whole number of tokens")
        samples.append(mapped[member.offset_data : end].view(dtype))
    return samples


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive(**values: object) -> None:
    for name, value in values.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

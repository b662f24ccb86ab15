"""Writing one split's token stream as webdataset tar shards of fixed-size samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data.layout import SHARD_PATTERN, TOKENS_EXTENSION


class TokenShardWriter:
    """Cuts a split's token stream into samples of `tokens_per_sample` tokens (the last one shorter)
    and writes them, `samples_per_shard` at a time, as `<split>-000000.tar`, `<split>-000001.tar`, ...

    Sample boundaries mean nothing: readers see one continuous stream, so documents freely cross them.
    """

    def __init__(
        self, directory: Path, split: str, tokens_per_sample: int, samples_per_shard: int, dtype: np.dtype
    ) -> None:
        self._directory = Path(directory)
        self._split = split
        self._tokens_per_sample = tokens_per_sample
        self._samples_per_shard = samples_per_shard
        self._dtype = np.dtype(dtype)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._shard_tokens: list[int] = []
        self._writer = None  # a webdataset.ShardWriter once the first sample is written
        self.num_tokens = 0
        self.num_samples = 0

    def write(self, tokens: np.ndarray | list[int]) -> None:
        """Append tokens to the end of the split's stream."""
        array = np.asarray(tokens, dtype=self._dtype)
        if array.size == 0:
            return
        self._pending.append(array)
        self._pending_tokens += array.size
        if self._pending_tokens >= self._tokens_per_sample:
            stream = np.concatenate(self._pending)
            full = stream.size - stream.size % self._tokens_per_sample
            for start in range(0, full, self._tokens_per_sample):
                self._write_sample(stream[start : start + self._tokens_per_sample])
            self._pending = [stream[full:]] if full < stream.size else []
            self._pending_tokens = stream.size - full

    def finish(self) -> list[dict[str, int | str]]:
        """Write the last, shorter sample and close the shards; returns [{"file", "num_tokens", "bytes"}] in
        order (the size lets a reader of the cache notice a shard cut short, by a full disk or a copy)."""
        if self._pending_tokens:
            self._write_sample(np.concatenate(self._pending))
            self._pending, self._pending_tokens = [], 0
        self.close()
        names = [SHARD_PATTERN.format(split=self._split) % index for index in range(len(self._shard_tokens))]
        return [
            {"file": name, "num_tokens": count, "bytes": (self._directory / name).stat().st_size}
            for name, count in zip(names, self._shard_tokens, strict=True)
        ]

    def close(self) -> None:
        """Close the open shard file, if any, without writing pending tokens."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_sample(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            # Imported here, not at the top: webdataset imports torch (over a second), and readers
            # of this package, which only need tarfile, should not pay for it.
            import webdataset

            # Opened on the first sample, not in __init__, so that nothing is created for an empty split.
            self._writer = webdataset.ShardWriter(
                str(self._directory / SHARD_PATTERN.format(split=self._split)),
                maxcount=self._samples_per_shard,
                maxsize=float("inf"),  # shards are cut by sample count only, so shard = sample // samples_per_shard
                verbose=0,
                mtime=0,  # identical inputs give byte-identical shards
            )
        shard_index = self.num_samples // self._samples_per_shard
        if shard_index == len(self._shard_tokens):
            self._shard_tokens.append(0)
        self._writer.write({"__key__": f"{self.num_samples:08d}", TOKENS_EXTENSION: tokens.tobytes()})
        self._shard_tokens[shard_index] += tokens.size
        self.num_tokens += tokens.size
        self.num_samples += 1

"""The on-disk layout of a prepared dataset, shared by the code that writes it and the code that reads it.

    <cache_dir>/<fingerprint[:16]>/
        train-000000.tar ...   webdataset shards; each sample is "<key>.tokens.bin"
        val-000000.tar ...
        tokenizer.json
        meta.json              written last, so its presence means the dataset is complete
"""

from __future__ import annotations

import numpy as np

# Bump whenever the bytes on disk change meaning, so old caches are rebuilt rather than misread.
# 2: text spelling out <|endoftext|> is encoded as text, not as the separator.
FORMAT_VERSION = 2

SPLITS = ("train", "val")
META_FILENAME = "meta.json"
TOKENIZER_FILENAME = "tokenizer.json"
TOKENS_EXTENSION = "tokens.bin"
SHARD_PATTERN = "{split}-%06d.tar"
SHARD_GLOB = "{split}-*.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id of a `vocab_size` vocabulary.

    Little-endian is fixed, not native, so shards written on one machine read the same on any other.
    """
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")

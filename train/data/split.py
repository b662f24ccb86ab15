"""Which documents are held out for validation."""

from __future__ import annotations

import math

import numpy as np

# What training accepts (data.val_fraction, and the data command's --val-fraction): beyond half,
# validation would take more of the corpus than training does.
MAX_TRAINING_VAL_FRACTION = 0.5


def validation_mask(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean array: True for the documents that belong to the validation split.

    Exactly round(val_fraction * num_documents) documents are chosen (at least one, and at least
    one left for training): those whose seeded hash of their index is smallest. Splitting whole
    documents, not the token stream, keeps every validation text unseen in training; hashing the
    index makes the choice depend only on (seed, count), never on the text or on the order of work.
    """
    if num_documents < 2:
        raise ValueError(
            f"the corpus has {num_documents} document(s); at least 2 are needed to split into train and validation"
        )
    if not 0.0 < val_fraction < 1.0 or math.isnan(val_fraction):
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    num_validation = min(num_documents - 1, max(1, round(val_fraction * num_documents)))
    hashes = _splitmix64(np.arange(num_documents, dtype=np.uint64) + np.uint64(_seed_offset(seed)))
    # A stable sort makes ties (practically impossible, but possible) break by document index.
    chosen = np.argsort(hashes, kind="stable")[:num_validation]
    mask = np.zeros(num_documents, dtype=bool)
    mask[chosen] = True
    return mask


def _seed_offset(seed: int) -> int:
    # Spreads seeds far apart so that seed s+1 is not just seed s shifted by one document.
    return (seed * 0x9E3779B97F4A7C15) % 2**64


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed, well-mixed 64-bit hash (SplitMix64's finaliser), vectorised; uint64 arithmetic wraps."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))

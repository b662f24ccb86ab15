"""The byte-level BPE tokenizer that turns documents into token ids."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The only special token. It separates documents in the token stream, so the model learns
# where one text ends and an unrelated one begins.
EOT = "<|endoftext|>"

# Byte-level BPE starts from all 256 byte values (so any string can be encoded, nothing is
# ever unknown) plus the end-of-text token; anything less cannot hold the base alphabet.
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most `vocab_size` tokens, `EOT` included.

    The result can hold fewer tokens than asked for when the documents do not contain enough
    distinct pairs to merge; read `get_vocab_size()` for the real number.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of `EOT` in `tokenizer`; ValueError if it was not trained with it."""
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOT} token; expected one made by train_bpe_tokenizer")
    return token_id


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved with `Tokenizer.save` (for example a prepared dataset's tokenizer.json)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such tokenizer file; expected a tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    # The Rust side raises a bare Exception for every kind of bad file.
    except Exception as error:
        raise ValueError(f"{file}: not a valid tokenizer file ({error})") from None

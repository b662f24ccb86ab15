"""The byte-level BPE tokenizer that turns documents into token ids."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
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


PIECE_CHARS = 1 << 20
"""Documents longer than this are encoded a piece at a time: a whole `.txt` file is one document, and
the Rust encoder keeps tens of bytes per token of a string it encodes (offsets, token strings), so
one file of a gigabyte would need tens of gigabytes at once."""
BATCH_CHARS = 1 << 24
"""Characters handed to the encoder in one call: enough for it to use every core."""


def encode_documents(tokenizer: Tokenizer, documents: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """The token ids of each document (as `dtype`), as `tokenizer.encode_batch` gives them, with
    bounded memory: long documents are cut into pieces where the cut cannot change the tokens (see
    `_cut_point`), pieces are encoded in calls of at most about BATCH_CHARS characters, and each
    piece's ids become a compact array at once (a Python list of ints costs some 36 bytes a token)."""
    pieces = [(index, piece) for index, text in enumerate(documents) for piece in document_pieces(text)]
    ids: list[list[np.ndarray]] = [[] for _ in documents]
    start = 0
    while start < len(pieces):
        end, chars = start, 0
        while end < len(pieces) and (end == start or chars + len(pieces[end][1]) <= BATCH_CHARS):
            chars += len(pieces[end][1])
            end += 1
        for (index, _), encoding in zip(pieces[start:end], tokenizer.encode_batch([p for _, p in pieces[start:end]])):
            ids[index].append(np.asarray(encoding.ids, dtype=dtype))
        start = end
    return [np.concatenate(parts) if parts else np.zeros(0, dtype) for parts in ids]


def document_pieces(text: str) -> list[str]:
    """`text` cut into pieces of about PIECE_CHARS where a cut changes no token (`_cut_point`): what
    the encoder and the tokenizer's trainer are given of a long document (the trainer counts the
    same pre-tokens either way, so it learns the same merges)."""
    if len(text) <= PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _cut_point(text, start, start + PIECE_CHARS)
        if cut is None:
            break  # no safe place left: the rest goes whole
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""The characters the pre-tokenizer's pattern takes as whitespace (`\\s`, Unicode White_Space): not
Python's str.isspace(), which also counts \\x1c-\\x1f, punctuation to the pattern."""
SAFE_CUTS = re.compile(rf"(?P<after>(?<=[^{SPACE}])\n(?=[^{SPACE}]))|(?P<before>(?<=[{SPACE}])[{SPACE}](?=[^{SPACE}]))")
"""Where a cut changes no pre-token of GPT-2's pattern (` ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`
and the contractions). First alternative: just after a newline between two non-spaces (the newline is
a pre-token of its own, in the text and at the end of a piece). Second: just before the last character
of a whitespace run of two or more that a non-space follows (in the text the run minus its last
character is one pre-token, the last joins what follows; at the end of a piece the run minus its
last character is one pre-token too). A newline after a space would not do: at the end of a piece
" \\n" is one pre-token, within the text two."""


def _cut_point(text: str, start: int, limit: int) -> int | None:
    """Where to end a piece that begins at `start`: the last safe cut (SAFE_CUTS) at or before
    `limit`, else the first after it; None when there is none. BPE merges never cross pre-tokens, so
    the pieces' tokens are the whole text's."""
    best = None
    for match in SAFE_CUTS.finditer(text, start + 1, min(len(text), limit + 2)):
        if start < (position := _cut_of(match)) <= limit:
            best = position
    if best is not None:
        return best
    for match in SAFE_CUTS.finditer(text, limit):
        if (position := _cut_of(match)) > limit:
            return position
    return None


def _cut_of(match: re.Match) -> int:
    """The cut a SAFE_CUTS match stands for: after its newline, or before the run's last character."""
    return match.end() if match.group("after") is not None else match.start()

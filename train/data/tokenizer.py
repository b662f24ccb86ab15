"""The byte-level BPE tokenizer that turns documents into token ids."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
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
# What training accepts (data.vocab_size, and the data command's --vocab-size, so that what it
# prepares can be trained on): the alphabet and EOT, and some merges for the BPE to be one.
MIN_TRAINING_VOCAB_SIZE = 300


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


PIECE_CHARS = 1 << 18
"""Documents longer than this are encoded a piece at a time: a whole `.txt` file is one document, and
the Rust encoder keeps some 100 bytes per token of a string it encodes (the token strings among them),
so one file of a gigabyte would need tens of gigabytes at once."""
BATCH_CHARS = 1 << 22
"""Characters handed to the encoder in one call: 16 pieces or more, one per core, in some 300 MB.
(Preparing an 89 MB .txt file on 2 cores, against pieces of 2^20 characters in calls of 2^24: 58 s
instead of 75 s, a peak resident set of 454 MiB instead of 1114 MiB; the same shards.)"""


def encode_pieces(tokenizer: Tokenizer, pieces: Iterable[tuple[int, str]], dtype: np.dtype) -> Iterator[tuple[int, np.ndarray]]:
    """(document, ids) for each (document, piece) of `pieces`, in order: the pieces (`document_pieces`,
    `streamed_pieces`) are encoded in calls of at most about BATCH_CHARS characters, and each piece's
    ids become a compact array at once (a Python list of ints costs some 36 bytes a token). Only one
    call's pieces are held at a time, so a document of any length streams through. `encode_batch_fast`:
    the same ids without the character offsets, which nothing here reads."""
    batch: list[tuple[int, str]] = []
    chars = 0
    for index, piece in pieces:
        if batch and chars + len(piece) > BATCH_CHARS:
            yield from _encoded(tokenizer, batch, dtype)
            batch, chars = [], 0
        batch.append((index, piece))
        chars += len(piece)
    if batch:
        yield from _encoded(tokenizer, batch, dtype)


def _encoded(tokenizer: Tokenizer, batch: list[tuple[int, str]], dtype: np.dtype) -> Iterator[tuple[int, np.ndarray]]:
    encodings = tokenizer.encode_batch_fast([piece for _, piece in batch])
    for (index, _), encoding in zip(batch, encodings, strict=True):
        yield index, np.asarray(encoding.ids, dtype=dtype)


def document_pieces(text: str) -> list[str]:
    """`text` cut into pieces of about PIECE_CHARS where a cut changes no token (`_cut_point`): what
    the encoder and the tokenizer's trainer are given of a long document (the trainer counts the
    same pre-tokens either way, so it learns the same merges)."""
    return list(streamed_pieces((text,)))


def streamed_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """The text that `chunks` spell, one after the other, cut into pieces of about PIECE_CHARS where a cut
    changes no token, holding about a piece and a chunk at a time: how a file of any size is read.
    Always at least one piece (maybe "").

    A cut is taken only where the text on both sides of it is already read (the safe-cut pattern looks
    one character ahead, and fails at the end of what is read), so it is a safe cut of the whole text;
    where a chunk ends near PIECE_CHARS it may be an earlier one than `document_pieces` would take of
    the whole text, which gives the same tokens. Where no safe cut is found, more is read: a long run
    without one (a single line with single spaces) stays whole, as it must."""
    buffer, searched = "", 0  # buffer[:searched] was searched past PIECE_CHARS and holds no cut there
    yielded = False
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > PIECE_CHARS:
            cut = _cut_point(buffer, 0, PIECE_CHARS, search_from=searched)
            if cut is None:
                searched = max(0, len(buffer) - 2)  # the last characters may yet match, with what follows
                break
            yield buffer[:cut]
            yielded = True
            buffer, searched = buffer[cut:], 0
    if buffer or not yielded:
        yield buffer


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


def _cut_point(text: str, start: int, limit: int, search_from: int = 0) -> int | None:
    """Where to end a piece that begins at `start`: the last safe cut (SAFE_CUTS) at or before
    `limit`, else the first after it; None when there is none. BPE merges never cross pre-tokens, so
    the pieces' tokens are the whole text's. `search_from`: text before it is known to hold no cut
    after `limit` (a caller that reads more and asks again need not search it twice)."""
    best = None
    for match in SAFE_CUTS.finditer(text, start + 1, min(len(text), limit + 2)):
        if start < (position := _cut_of(match)) <= limit:
            best = position
    if best is not None:
        return best
    for match in SAFE_CUTS.finditer(text, max(limit, search_from)):
        if (position := _cut_of(match)) > limit:
            return position
    return None


def _cut_of(match: re.Match) -> int:
    """The cut a SAFE_CUTS match stands for: after its newline, or before the run's last character."""
    return match.end() if match.group("after") is not None else match.start()

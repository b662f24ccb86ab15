"""Where training text comes from: the corpus embedded in Python itself, or the user's files."""

from __future__ import annotations

import ast
import codecs
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

# One-line docstrings ("Return the foo.") and comments ("# fast path") teach a language model
# little; longer ones are prose.
MIN_PROSE_CHARS = 200

# Test suites are mostly code and fixtures, idlelib/lib2to3 are tools rather than library prose,
# and site-packages is whatever happens to be installed, which would make the corpus machine-dependent.
SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

TEXT_SUFFIX = ".txt"
JSONL_SUFFIX = ".jsonl"
SUPPORTED_SUFFIXES = (TEXT_SUFFIX, JSONL_SUFFIX)

# Part of a prepared dataset's fingerprint: bump it when the embedded corpus's selection rules
# change, so caches built from the old selection are not reused.
EMBEDDED_CORPUS_VERSION = 1


def embedded_corpus_documents() -> Iterator[str]:
    """Yield real English text that ships with every Python installation, in a fixed order.

    The pydoc topic pages (the language reference as plain text) come first, then, file by
    file, the long docstrings and long comment blocks of the pure-Python standard library.
    Nothing is downloaded and nothing is imported: modules are parsed with `ast`, because
    importing them would run their code (some open browsers or print on import).
    """
    # Some docstrings are copied between modules (io/_pyio, ...); yielding a text twice could put
    # one copy in training and the other in validation, flattering the validation loss.
    seen: set[str] = set()
    for text in itertools.chain(_pydoc_topic_texts(), _stdlib_prose()):
        if text not in seen:
            seen.add(text)
            yield text


def _pydoc_topic_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def _stdlib_prose() -> Iterator[str]:
    for path in _stdlib_python_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
        except (OSError, SyntaxError, ValueError):
            # Unreadable files and syntax meant for other Python versions are simply not prose we can use.
            continue
        yield from _long_docstrings(tree)
        yield from _long_comment_blocks(source, tree)


def _long_docstrings(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and len(docstring) >= MIN_PROSE_CHARS:
                yield docstring


def _long_comment_blocks(source: str, tree: ast.Module) -> Iterator[str]:
    """Runs of whole-line comments: the explanations next to the code, often the best prose in a file."""
    # A line starting with "#" inside a multi-line string is not a comment; the AST knows where
    # those strings are, which is much faster than running the tokenizer over every file.
    inside_strings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno and node.end_lineno > node.lineno:
            inside_strings.update(range(node.lineno, node.end_lineno + 1))
    block: list[str] = []
    for line_number, line in enumerate(source.splitlines(), start=1):
        stripped = line.lstrip()
        if stripped.startswith("#") and line_number not in inside_strings:
            block.append(stripped.lstrip("#").strip())
            continue
        if block:
            yield from _joined_if_long(block)
            block = []
    yield from _joined_if_long(block)


def _joined_if_long(lines: list[str]) -> Iterator[str]:
    text = "\n".join(lines).strip()
    if len(text) >= MIN_PROSE_CHARS:
        yield text


def _stdlib_python_files() -> list[Path]:
    stdlib_root = sysconfig.get_paths()["stdlib"]
    found: list[Path] = []
    for directory, subdirectories, filenames in os.walk(stdlib_root):
        subdirectories[:] = [name for name in subdirectories if name not in SKIPPED_STDLIB_DIRS]
        found.extend(Path(directory, name) for name in filenames if name.endswith(".py"))
    # os.walk order depends on the filesystem; sorting makes the corpus identical everywhere.
    return sorted(found)


def read_text_documents(paths: Sequence[str | os.PathLike[str]], text_field: str = "text") -> Iterator[str | TextFile]:
    """Yield documents from the user's files: a whole `.txt` file is one document (a `TextFile`, read
    when it is gone through: a file can be larger than memory), a `.jsonl` file holds one document
    per line in `text_field` (blank lines are skipped).

    Every path is checked before anything is yielded, so a typo fails at once rather than after
    minutes of work on the files that precede it.
    """
    return _iterate_documents(check_document_files(paths), text_field)


class TextFile:
    """A `.txt` file as one document, read CHUNK_CHARS characters at a time, never whole. Line ends
    are read as Python's text mode reads them (\r\n and \r become \n), as `Path.read_text` would."""

    CHUNK_CHARS = 1 << 20

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def chunks(self) -> Iterator[str]:
        """The file's text in order, in chunks of up to CHUNK_CHARS characters (at least one, maybe "")."""
        try:
            with self.path.open(encoding="utf-8") as text:
                chunk = text.read(self.CHUNK_CHARS)
                yield chunk
                while chunk := text.read(self.CHUNK_CHARS):
                    yield chunk
        except UnicodeDecodeError:
            reason, offset = _first_utf8_error(self.path)
            raise ValueError(f"{self.path}: not valid UTF-8 text ({reason} at byte {offset})") from None
        except OSError as error:
            raise ValueError(f"{self.path}: cannot be read ({error.strerror})") from None

    def read(self) -> str:
        """The whole text at once (for files known to be small)."""
        return "".join(self.chunks())

    def __repr__(self) -> str:
        return f"TextFile({str(self.path)!r})"


def _first_utf8_error(path: Path) -> tuple[str, int]:
    """(reason, byte offset in the file) of the first byte sequence that is not UTF-8. Text mode's own
    error counts from the start of its internal chunk, so the file is decoded again here, counting."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with path.open("rb") as raw:
        while True:
            block = raw.read(1 << 20)
            held = len(decoder.getstate()[0])  # an incomplete character from the last block, decoded with this one
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                return error.reason, consumed - held + error.start
            if not block:
                return "unexpected end of data", consumed  # (text mode said there was an error)
            consumed += len(block)


def check_document_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """`paths` as Path objects, after checking each one exists and is a .txt or .jsonl file."""
    if isinstance(paths, (str, os.PathLike)):
        # A ValueError, like every other mistake in the user's input, so callers need catch only one.
        raise ValueError(f"paths must be a list of .txt/.jsonl files, got the single path {os.fspath(paths)!r}")
    checked = [_checked_document_file(path) for path in paths]
    if not checked:
        raise ValueError("paths is empty; expected at least one .txt or .jsonl file")
    seen: dict[Path, Path] = {}
    for file in checked:
        first = seen.setdefault(file.resolve(), file)
        if first is not file:  # read twice, its documents would land in both splits
            raise ValueError(f"{file}: given twice (also as {first}); list each file once")
    return checked


def _checked_document_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if file.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{file}: unsupported file type {file.suffix or '(none)'!r}; expected .txt or .jsonl")
    if file.is_dir():
        raise ValueError(f"{file}: a directory; expected a .txt or .jsonl file (list the files in it)")
    if not file.is_file():
        raise ValueError(f"{file}: no such file; expected an existing .txt or .jsonl file")
    return file


def _iterate_documents(files: list[Path], text_field: str) -> Iterator[str | TextFile]:
    for file in files:
        if file.suffix.lower() == TEXT_SUFFIX:
            yield TextFile(file)
        else:
            yield from _jsonl_documents(file, text_field)


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    # Streamed line by line: a JSONL corpus can be much larger than memory. Decoded line by line
    # too, so a bad byte is reported by line (a decoder over the whole stream counts in its chunks).
    try:
        with file.open("rb") as lines:
            for line_number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{file}:{line_number}: not valid UTF-8 text ({error.reason} at byte "
                                     f"{error.start} of the line)") from None
                if line.strip():
                    yield _jsonl_text(line, text_field, file, line_number)
    except OSError as error:
        raise ValueError(f"{file}: cannot be read ({error.strerror})") from None


def _jsonl_text(line: str, text_field: str, file: Path, line_number: int) -> str:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:
        # Besides JSONDecodeError (a ValueError): arrays nested past the recursion limit, and integer
        # literals past Python's 4300 digits, which would stop the run without naming the line.
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error).split(";")[0]
        raise ValueError(f"{file}:{line_number}: invalid JSON ({reason})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{file}:{line_number}: missing text field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{file}:{line_number}: text field {text_field!r} must be a string, got {type(text).__name__}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON can escape a lone surrogate (\ud800), which is no character
        raise ValueError(f"{file}:{line_number}: text field {text_field!r} is not valid Unicode ({error.reason} "
                         f"at character {error.start})") from None
    return text

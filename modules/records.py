"""Raw records of data files and the checks of their texts, shared by every reader of training data.

``iter_raw_records`` reads JSONL (plain or gzip), parquet and saved ``datasets`` directories; ``text_problem`` says
why a text cannot be trained on. A record that is bad on its own (``BadRecord``: invalid JSON, a missing or non-text
column, a text with no visible character or a lone surrogate) is refused, or skipped and counted
(``SkippedRecords``) under --skip_bad_records.
"""

import gzip
import json
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

from .cli import DataError


class BadRecord(DataError):
    """A record that is bad on its own (invalid JSON, a missing or non-text column, a text ``text_problem`` refuses):
    refused, or skipped under --skip_bad_records. The message is built only when shown, so skipping costs no line
    count (see streaming)."""

    def __init__(self, where, problem):
        super().__init__(where, problem)

    def __str__(self):
        return f"{self.args[0]}: {self.args[1]}"


@dataclass
class SkippedRecords:
    """How many bad records were skipped, and the first one's error."""

    count: int = 0
    first: str = ""

    def add(self, error):
        self.count += 1
        self.first = self.first or str(error)

    def line(self, name):
        return f"skipped {self.count} bad record{'s' * (self.count != 1)} of {name} (first: {self.first})"


def iter_raw_records(path: Path, on_invalid_json=None):
    """Yield (location, record) from JSONL, JSONL.gz, parquet, or a saved ``datasets`` directory.

    An invalid JSON line raises DataError, or is passed to ``on_invalid_json(error)`` and skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as error:
            raise DataError(f"{path}: not a saved datasets directory ({error})") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict with splits {list(dataset)}; point at one split's directory")
        for row_no, record in enumerate(dataset):
            yield f"{path} row {row_no}", record
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                yield f"{path} row {row_no}", record
                row_no += 1
    elif path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        for line_no, line in iter_file_lines(path):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", parse_json_line(line, f"{path}:{line_no}")
            except BadRecord as error:
                if on_invalid_json is None:
                    raise
                on_invalid_json(error)
    else:
        raise DataError(f"{path}: unsupported format; use .jsonl, .jsonl.gz, .parquet or a saved datasets directory")


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def iter_file_lines(path):
    """Yield (line number, bytes) of a text file, through gzip for ``.gz``; a truncated or corrupt ``.gz`` is one
    DataError naming the file and its last whole line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as handle:
            for line_no, line in enumerate(handle, start=1):
                yield line_no, line
    except GZIP_ERRORS as error:
        raise DataError(f"{path}: truncated or corrupt gzip file, unreadable after line {line_no} ({error})") from None


def decode_line(line: bytes, where):
    """A line of a data file or meta list as text, a UTF-8 BOM dropped (Windows editors write one); bytes that are
    not UTF-8 are refused naming the line, never replaced (a latin-1 file would train on garbled text)."""
    try:
        return line.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1}); convert "
                        "the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def parse_json_line(line: bytes, where):
    try:
        return json.loads(decode_line(line, where))
    except json.JSONDecodeError as error:
        raise BadRecord(where, f"invalid JSON ({error.msg})") from None


def text_column(record, column, where):
    """A record's string column; anything else is a DataError naming the file and line."""
    value = record.get(column)
    if not isinstance(value, str):
        raise BadRecord(where, f"column {column!r} must be a string, got {type(value).__name__}")
    return value


def nonempty_text(text, what, where):
    """``text`` unless ``text_problem`` finds one (``what``: "'text_pair'", for the message)."""
    problem = text_problem(text, what)
    if problem:
        raise BadRecord(where, problem)
    return text


# Characters with no glyph of their own. Whitespace and line separators (Z*), controls (Cc) and format characters
# (Cf: zero-width space, non-joiner and joiner, word joiner, BOM, soft hyphen, bidi marks, tags, ...); then Unicode's
# other default-ignorable code points: combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian
# and other variation selectors. Tokenizers drop most of them (BERT's every control and format character).
INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})
OTHER_IGNORABLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\uffa0"
                            + "".join(map(chr, [*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])))
# JSON decodes an escaped pair to its character: a surrogate left in a text is unpaired, and no tokenizer encodes it
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text, what):
    """Why a training text cannot be trained on, or None (``what`` names it in the message).

    - A lone surrogate (the valid JSON "\\ud800", half of a UTF-16 pair) is not a character: the tokenizer raises
      a TypeError on it, mid-run.
    - A text with no visible character is empty: nothing is left once whitespace, control and format characters and
      the other default-ignorable code points are removed (see ``INVISIBLE_CATEGORIES``), so a text of zero-width
      spaces trains as [CLS][SEP] like "". Letters, marks, digits, punctuation, symbols, private-use and unassigned
      code points (a newer Unicode's) are visible.
    Both checks stop at once on ordinary text (an ASCII string has no surrogate; the first visible character ends the
    scan), so a huge text costs no copy.
    """
    surrogate = None if text.isascii() else LONE_SURROGATE.search(text)
    if surrogate:
        return (f"lone surrogate U+{ord(surrogate.group()):04X} in {what} at character {surrogate.start() + 1}: "
                "half of a UTF-16 pair, not text")
    if not text or text.isspace():  # nothing to list
        return f"empty {what}"
    if all(map(_invisible, text)):
        return f"empty {what}: only invisible characters {_code_points(text)}"
    return None


def _invisible(character):
    return unicodedata.category(character) in INVISIBLE_CATEGORIES or character in OTHER_IGNORABLE


def _code_points(text, shown=5):
    """The first ``shown`` distinct characters of ``text`` as U+XXXX (what an invisible text is made of)."""
    distinct = list(dict.fromkeys(text))
    return " ".join(f"U+{ord(c):04X}" for c in distinct[:shown]) + (" ..." if len(distinct) > shown else "")

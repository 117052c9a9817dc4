"""Shared pieces of the pair data tools in tools/ (filter_pairs.py, dedup_pairs.py, score_pairs.py).

Each tool streams (query, positive) records from JSONL, JSONL.gz, parquet or saved ``datasets``
inputs, writes the records it keeps unchanged as JSONL (gzipped when the output ends in .gz), and
counts what it dropped per reason: printed, and written to ``<output>.report.json``.
"""

import gzip
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

from modules.cli import DataError
from modules.output_paths import refuse_output_over_inputs

# --------------------------------------------------------------------------- text rules

# Han ideographs: unified, extension A, compatibility, extensions B..H.
CJK_CHARS = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
# Latin letters: ASCII, Latin-1, Extended-A/B, Extended Additional, fullwidth.
LATIN_CHARS = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a]")
SCRIPT_CHARS = {"zh": CJK_CHARS, "en": LATIN_CHARS}


def collapse_whitespace(text):
    return " ".join(text.split())


def normalize_text(text):
    """The form compared for identical sides and exact duplicates: NFKC, case-folded, whitespace collapsed."""
    return collapse_whitespace(unicodedata.normalize("NFKC", text).casefold())


def script_ratio(text, language):
    """Share of the language's script among the letters of ``text``; 0 when it has no letters."""
    letters = sum(char.isalpha() for char in text)
    return len(SCRIPT_CHARS[language].findall(text)) / letters if letters else 0.0


def top_char_ratio(text):
    """Share of the most frequent character among the non-space characters ("哈哈哈哈" -> 1.0)."""
    chars = [char for char in text if not char.isspace()]
    return Counter(chars).most_common(1)[0][1] / len(chars) if chars else 0.0


def char_shingles(text, n):
    """The set of character n-grams of ``text`` (the whole text when it is shorter than n)."""
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


# --------------------------------------------------------------------------- command line


def add_io_arguments(parser):
    parser.add_argument("inputs", nargs="+",
                        help="pair files (.jsonl, .jsonl.gz, .parquet or a saved datasets directory), read in order")
    parser.add_argument("--output", required=True, help="kept records as JSONL (.jsonl.gz: gzip)")
    parser.add_argument("--query_column", default="text")
    parser.add_argument("--positive_column", default="text_pos")
    parser.add_argument("--skip_bad", action="store_true",
                        help="count and skip bad records (invalid JSON, missing column, not a string) "
                             "instead of stopping at the first")


# --------------------------------------------------------------------------- reading


def iter_pairs(args, report):
    """Yield (record, query, positive) for each record of ``args.inputs``.

    A bad record raises DataError naming its file and line, or with ``args.skip_bad`` is counted
    as dropped ("bad_record") and skipped.
    """
    from modules.streaming import parse_pair

    columns = (args.query_column, args.positive_column)
    for where, record in _iter_records(args.inputs, args.skip_bad, report):
        try:
            query, positive = parse_pair(record, columns, where)
        except DataError as error:
            if not args.skip_bad:
                raise
            report.drop("bad_record", error)
            continue
        yield record, query, positive


def _iter_records(paths, skip_bad, report):
    from modules.records import iter_raw_records

    on_invalid_json = (lambda error: report.drop("bad_record", error)) if skip_bad else None
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        yield from iter_raw_records(path, on_invalid_json)


# --------------------------------------------------------------------------- writing and reporting


class PairWriter:
    """Writes JSONL to ``<output>.tmp`` and renames it on success, so a failed run leaves no output."""

    def __init__(self, output, inputs):
        self.path = Path(output)
        refuse_output_over_inputs(self.path, inputs)  # replaced by the rename: an input there would be lost
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if self.path.suffix == ".gz" else open
        self.handle = opener(self.tmp_path, "wt", encoding="utf-8")
        return self

    def write(self, record):
        # default=str: parquet inputs may hold dates or decimals, which JSON has no type for.
        self.handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def __exit__(self, exc_type, exc, traceback):
        try:
            self.handle.close()  # flushes: on a full disk this is the write that fails
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        if exc_type is None:
            os.replace(self.tmp_path, self.path)
        else:
            self.tmp_path.unlink(missing_ok=True)


class Report:
    """Counts kept records and dropped ones per reason; prints a summary and writes it as JSON."""

    progress_every = 1_000_000
    max_bad_examples = 10

    def __init__(self, tool):
        self.tool = tool
        self.kept = 0
        self.dropped = Counter()
        self.bad_examples = []

    @property
    def read(self):
        return self.kept + sum(self.dropped.values())

    def keep(self):
        self.kept += 1
        self._progress()

    def drop(self, reason, error=None):
        self.dropped[reason] += 1
        if error is not None and len(self.bad_examples) < self.max_bad_examples:
            self.bad_examples.append(str(error))
        self._progress()

    def _progress(self):
        if self.read % self.progress_every == 0:
            print(f"{self.tool}: {self.read} read, {self.kept} kept", file=sys.stderr, flush=True)

    def as_dict(self, args):
        return {"tool": self.tool, "inputs": [str(p) for p in args.inputs], "output": str(args.output),
                "read": self.read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "bad_examples": self.bad_examples, "arguments": vars(args)}

    def finish(self, args):
        """Print the summary and write ``<output>.report.json``; returns the report as a dict."""
        report = self.as_dict(args)
        report_path = Path(str(args.output) + ".report.json")
        report_path.write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n")
        print(f"{self.tool}: read {self.read}, kept {self.kept}, dropped {self.read - self.kept}")
        for reason, count in report["dropped"].items():
            print(f"  {reason:<20} {count}")
        for example in self.bad_examples:
            print(f"  bad: {example}")
        print(f"kept -> {args.output}\nreport -> {report_path}")
        return report

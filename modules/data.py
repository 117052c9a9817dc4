"""Fine-tuning data: records, meta lists, task-homogeneous batches, tokenization.

Record kinds (one kind per dataset, from a ``type`` column or the meta list):
  retri_contrast  text, text_pos (str or list), text_neg (list; needed when negatives are used)
  cls_contrast    text, text_pos (str or list), text_neg (list)
  cosent          text, text_pair, label (number)

Every record is checked when the data is loaded, so bad input stops the run before step one with
the file and line named, never mid-run; under --skip_bad_records a record that is bad on its own
(``BadRecord``: invalid JSON, a missing or non-text column, a text with no visible character or a lone surrogate;
see ``text_problem``) is skipped and counted instead.
"""

import gzip
import hashlib
import json
import math
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli import DataError
from .flags import META_LINE

TASK_KINDS = ("retri_contrast", "cls_contrast", "cosent", "parallel")
CONTRASTIVE_KINDS = ("retri_contrast", "cls_contrast")


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


# --------------------------------------------------------------------------- meta lists


@dataclass
class MetaEntry:
    path: Path
    repeat: int
    kind: str | None = None
    batch_size: int | None = None
    weight: float | None = None  # share of an epoch's batches, relative to the other lines' weights
    source: str = ""  # "meta.txt:3", for error messages
    name: str | None = None  # name=NAME, else derived by assign_dataset_names


def iter_meta_lines(meta_file, root_dir, expected):
    """Yield (``file:line``, root dir, fields) for each meta-list line; '#' comments and blanks skipped.

    Relative paths resolve against ``root_dir`` (default: the meta list's own directory).
    """
    meta_file = Path(meta_file)
    if not meta_file.exists():
        raise DataError(f"meta list {meta_file} does not exist")
    root = Path(root_dir) if root_dir is not None else meta_file.parent
    found = False
    for line_no, line in enumerate(meta_file.read_bytes().splitlines(), start=1):
        line = decode_line(line, f"{meta_file}:{line_no}").split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 2:
            raise DataError(f"{meta_file}:{line_no}: expected '{expected}', got {line!r}")
        found = True
        yield f"{meta_file}:{line_no}", root, fields
    if not found:
        raise DataError(f"meta list {meta_file} lists no datasets")


def assign_dataset_names(entries):
    """Give every entry without ``name=`` a name: its file stem (or folder name), or ``folder/stem`` where
    stems repeat (two ``train.jsonl`` become ``en-stsb/train`` and ``en-sick/train``); refuse two equal names.

    Names key query prefixes and prompts saved with the model, so they must be unique.
    """
    def stem(path):
        return _strip_suffix(path.name) if path.is_file() else path.name

    unnamed = [e for e in entries if e.name is None]
    stems = [stem(e.path) for e in unnamed]
    for entry, own in zip(unnamed, stems):
        entry.name = f"{entry.path.parent.name}/{own}" if stems.count(own) > 1 else own
    first = {}
    for entry in entries:
        if entry.name in first:
            raise DataError(f"{entry.source}: dataset name {entry.name!r} is also the name of {first[entry.name]}; "
                            "give one of them name=NAME")
        first[entry.name] = entry.source
    return entries


def read_meta_list(meta_file, root_dir=None) -> list[MetaEntry]:
    """Parse ``<path> <repeat> [type=KIND] [batch_size=N] [weight=W] [name=NAME]`` lines (weight on every
    line or none); every entry gets a unique name."""
    entries = []
    for where, root, fields in iter_meta_lines(meta_file, root_dir, META_LINE):
        path = Path(fields[0]) if Path(fields[0]).is_absolute() else root / fields[0]
        if not path.exists():
            raise DataError(f"{where}: dataset path {path} does not exist")
        entry = MetaEntry(path=path, repeat=_positive_int(fields[1], where, "repeat"), source=where)
        for option in fields[2:]:
            key, _, value = option.partition("=")
            if key == "type":
                if value not in TASK_KINDS:
                    raise DataError(f"{where}: unknown type {value!r}; choose one of {TASK_KINDS}")
                entry.kind = value
            elif key == "batch_size":
                entry.batch_size = _positive_int(value, where, "batch_size")
            elif key == "weight":
                entry.weight = positive_number(value, where, "weight")
            elif key == "name" and value:
                entry.name = value
            else:
                raise DataError(f"{where}: unknown option {option!r}; expected type=KIND, batch_size=N, weight=W "
                                "or name=NAME")
        entries.append(entry)
    weighted = [e.weight is not None for e in entries]
    if any(weighted) and not all(weighted):
        unweighted = entries[weighted.index(False)]
        raise DataError(f"{unweighted.source}: no weight=W, but other lines of {meta_file} have one: give every "
                        "dataset a weight (shares of the epoch's batches) or none (shares follow sizes x repeats)")
    check_weight_sum(entries)
    return assign_dataset_names(entries)


def entry_kind(entry):
    """A meta-list entry's kind: its type=KIND, else its first record's type (load_task_dataset checks them all)."""
    return entry.kind or next(iter_raw_records(entry.path))[1].get("type")


def _strip_suffix(file_name):
    for suffix in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        if file_name.endswith(suffix):
            return file_name.removesuffix(suffix)
    return Path(file_name).stem


def positive_number(text, where, name):
    """A meta-list number > 0 and finite (an infinite weight would make every probability NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {name} must be a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise DataError(f"{where}: {name} must be a positive number, got {value}")
    return value


def check_weight_sum(entries):
    """Refuse weights whose sum is infinite (two of 1e308), naming the line where it overflows: every share, a weight
    over the sum, would be 0 or NaN. ``entries``: meta-list entries or pretraining sources (``weight``, ``source``)."""
    total = 0.0
    for entry in entries:
        total += entry.weight or 0.0
        if math.isinf(total):
            raise DataError(f"{entry.source}: weight={entry.weight:g} makes the sum of the weights infinite; weights "
                            "are relative shares: divide them all by the same number")


def _positive_int(text, where, name):
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{where}: {name} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise DataError(f"{where}: {name} must be a positive integer, got {value}")
    return value


# --------------------------------------------------------------------------- records


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


def _text_list(record, column, where):
    value = record.get(column)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(v, str) for v in texts):
        raise BadRecord(where, f"column {column!r} must be a string or a list of strings")
    if not texts:
        raise BadRecord(where, f"column {column!r} is empty")
    for number, text in enumerate(texts, start=1):
        nonempty_text(text, repr(column) if isinstance(value, str) else f"{column!r} (item {number} of {len(texts)})",
                      where)
    return texts


def _number(record, column, where):
    value = record.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRecord(where, f"column {column!r} must be a number, got {value!r}")
    return float(value)


def parse_record(record, kind, where, negatives_needed=0, corpus_root=None, teacher_scores=False):
    """Check one raw record and return it in the normal form of its kind (with at least ``negatives_needed``).

    A mined record's ``corpus`` path is relative to ``corpus_root`` (the folder of the record's file).
    ``teacher_scores``: a retrieval record also needs ``pos_scores`` / ``neg_scores``, one number per positive /
    negative (score distillation from the data).
    """
    needs_negatives = negatives_needed > 0
    if not isinstance(record, dict):
        raise BadRecord(where, f"a record must be a JSON object, got {type(record).__name__}")
    for column in REQUIRED_COLUMNS[kind](needs_negatives):
        if column not in record or record[column] is None:
            raise BadRecord(where, f"missing column {column!r} for type {kind}")
    if kind == "cosent":
        return {"text": _training_text(record, "text", where), "text_pair": _training_text(record, "text_pair", where),
                "label": _number(record, "label", where)}
    parsed = {"text": _training_text(record, "text", where), "text_pos": _text_list(record, "text_pos", where)}
    if kind == "parallel":
        return parsed
    if needs_negatives:
        parsed["text_neg"] = _text_list(record, "text_neg", where)
    if kind == "retri_contrast" and ("candidates" in record or "candidate_ids" in record):
        parsed.update(_mined_candidates(record, where, Path(corpus_root or ".")))
    if needs_negatives and len(parsed["text_neg"]) < negatives_needed:
        raise DataError(f"{where}: {len(parsed['text_neg'])} negatives in 'text_neg', fewer than the {negatives_needed} "
                        "each record needs (--retri_negatives / --cls_negatives; for retrieval under --cbb, times the "
                        "number of processes): repeating negatives would count them twice in the softmax")
    if teacher_scores and kind == "retri_contrast":
        parsed["pos_scores"] = _scores(record, "pos_scores", len(parsed["text_pos"]), where)
        parsed["neg_scores"] = _scores(record, "neg_scores", len(parsed.get("text_neg", [])), where)
    return parsed


def _scores(record, column, count, where):
    """A list of ``count`` finite numbers (a teacher's score of each positive or negative)."""
    values = record.get(column)
    if not (isinstance(values, list) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise BadRecord(where, f"column {column!r} must list {count} finite numbers, one per text of "
                               f"{'text_pos' if column == 'pos_scores' else 'text_neg'} (distillation from the data's "
                               "teacher scores; or give --teacher_model)")
    return [float(v) for v in values]


def _training_text(record, column, where):
    return nonempty_text(text_column(record, column, where), repr(column), where)


def _mined_candidates(record, where, corpus_root):
    """The ranked list tools/mine_hard_negatives.py writes, which dynamic hard-negative mining draws from:
    corpus ids (``candidate_ids``, texts read from the ``corpus`` file) or, in older files, the texts (``candidates``)."""
    if "candidates" in record:
        candidates = _text_list(record, "candidates", where)
    else:
        from .corpus import corpus_candidates  # corpus.py reads its files with this module's readers

        candidates = corpus_candidates(record, where, corpus_root)
    ranks, scores = record.get("neg_ranks"), record.get("neg_scores")
    if not (isinstance(ranks, list) and ranks and all(isinstance(r, int) and 0 <= r < len(candidates) for r in ranks)):
        raise DataError(f"{where}: 'neg_ranks' must list ranks into the candidates (0..{len(candidates) - 1})")
    if not (isinstance(scores, list) and len(scores) == len(ranks)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores)):
        raise DataError(f"{where}: 'neg_scores' must hold one number per entry of 'neg_ranks'")
    return {"candidates": candidates, "neg_ranks": ranks, "neg_scores": scores,
            "text_neg": [candidates[r] for r in ranks]}


REQUIRED_COLUMNS = {
    "retri_contrast": lambda needs_negatives: ("text", "text_pos") + (("text_neg",) if needs_negatives else ()),
    "cls_contrast": lambda needs_negatives: ("text", "text_pos") + (("text_neg",) if needs_negatives else ()),
    "cosent": lambda needs_negatives: ("text", "text_pair", "label"),
    "parallel": lambda needs_negatives: ("text", "text_pos"),
}


@dataclass
class TaskDataset:
    name: str
    kind: str
    records: list
    repeat: int = 1
    batch_size: int | None = None  # per-process batch size; None: the kind's default
    source: str = ""  # "meta.txt:3"
    path: Path | None = None
    weight: float | None = None  # share of an epoch's batches (relative); None: follows size x repeat
    skipped: SkippedRecords = field(default_factory=SkippedRecords)  # under --skip_bad_records

    def __len__(self):
        return len(self.records)


def load_task_dataset(entry: MetaEntry, negatives_per_kind: dict, skip_bad=False, teacher_scores=False) -> TaskDataset:
    """Read and check every record of one meta-list entry; ``skip_bad``: skip and count every BadRecord (a record
    with one empty negative among many is skipped whole: its pool would otherwise differ from what the file says);
    ``teacher_scores``: retrieval records need their teacher scores (see parse_record)."""
    kind = entry.kind
    records, skipped = [], SkippedRecords()
    for where, raw in iter_raw_records(entry.path, skipped.add if skip_bad else None):
        record_kind = raw.get("type") if isinstance(raw, dict) else None
        if record_kind is not None:
            if record_kind not in TASK_KINDS:
                raise DataError(f"{where}: unknown type {record_kind!r}; choose one of {TASK_KINDS}")
            if kind is None:
                kind = record_kind
            elif record_kind != kind:
                raise DataError(f"{where}: type {record_kind!r} but the dataset is {kind!r} ({entry.source})")
        if kind is None:
            raise DataError(f"{where}: no 'type' column and no type=KIND in the meta list ({entry.source})")
        try:
            records.append(parse_record(raw, kind, where, negatives_per_kind.get(kind, 0), entry.path.parent,
                                        teacher_scores))
        except BadRecord as error:
            if not skip_bad:
                raise
            skipped.add(error)
    if not records:
        raise DataError(f"{entry.path}: empty dataset ({entry.source})"
                        + (f"; every record was bad: {skipped.line(entry.path)}" if skipped.count else ""))
    return TaskDataset(entry.name or entry.path.name, kind, records, entry.repeat, entry.batch_size, entry.source,
                       entry.path, entry.weight, skipped)


def load_meta_list(meta_file, root_dir=None, negatives_per_kind=None, skip_bad=False,
                   teacher_scores=False) -> list[TaskDataset]:
    negatives_per_kind = negatives_per_kind or {}
    return [load_task_dataset(entry, negatives_per_kind, skip_bad, teacher_scores)
            for entry in read_meta_list(meta_file, root_dir)]


def skipped_record_lines(datasets):
    """One start-up line for each dataset that had bad records skipped (--skip_bad_records)."""
    return [d.skipped.line(d.name) for d in datasets if d.skipped.count]


# --------------------------------------------------------------------------- batches


def describe_data_order(datasets, batch_sizes, **setup):
    """What fixes a fine-tuning run's batches (JSON): ``setup`` (processes, seed, ...) and every dataset's
    file, size, repeat and batch size."""
    return {**setup, "datasets": [{"path": str(d.path), "records": len(d), "repeat": d.repeat, "batch_size": size,
                                   "weight": d.weight} for d, size in zip(datasets, batch_sizes)]}


def dataset_shares(datasets, sampler, batch_sizes):
    """Every dataset's kind, records, batch size, batches an epoch and share of the steps (of its kind's
    batches under CBB, where every step holds one batch of every kind): the start-up lines and train_summary.json."""
    if isinstance(sampler, BalancedBatchSampler):
        counts, within = {}, {}
        for kind, kind_sampler in sampler.samplers.items():
            for member, count in zip(sampler.members[kind], kind_sampler.batch_counts()):
                counts[member], within[member] = count, f"of the {kind} batches (one every step)"
        total = {i: sum(sampler.samplers[d.kind].batch_counts()) for i, d in enumerate(datasets)}
    else:
        counts = dict(enumerate(sampler.batch_counts()))
        total = {i: sum(counts.values()) for i in counts}
        within = {i: "of the steps" for i in counts}
    return [{"name": d.name, "path": str(d.path), "source": d.source, "kind": d.kind, "records": len(d),
             "batch_size": size, "batches_per_epoch": counts[i], "share": counts[i] / total[i], "share_of": within[i]}
            for i, (d, size) in enumerate(zip(datasets, batch_sizes))]


def describe_batches(datasets, sampler, batch_sizes=None):
    """One line per dataset: kind, records, batches an epoch and share of the steps (printed at start-up)."""
    return [f"{d['name']} ({d['kind']}, {d['source']}): {d['records']} records, {d['batches_per_epoch']} batches an "
            f"epoch, {100 * d['share']:.1f}% {d['share_of']}"
            for d in dataset_shares(datasets, sampler, batch_sizes or [None] * len(datasets))]


def build_sampler(datasets, batch_sizes, seed, num_processes=1, process_index=0, cbb=False):
    """The run's batch sampler: task-homogeneous batches, or one batch of every kind a step under CBB."""
    sources = [f"{d.source}: {d.path}" for d in datasets]
    if cbb:
        return BalancedBatchSampler(datasets, batch_sizes, seed, num_processes, process_index, sources)
    weights = [d.weight for d in datasets] if datasets[0].weight is not None else None
    return TaskBatchSampler([len(d) for d in datasets], [d.repeat for d in datasets], batch_sizes, seed,
                            num_processes, process_index, sources, weights)


@dataclass
class TaskBatchSampler:
    """Task-homogeneous global batches, identical on every process, sliced per process.

    The batches of epoch e are a pure function of (seed, e): each dataset contributes ``repeat``
    fresh permutations of its indices (occurrences 0..repeat-1), each cut into global batches (the
    remainder of a permutation is dropped, so no batch holds a record twice), and the batch order is
    shuffled. Process r takes rows [r*b, (r+1)*b) of each global batch, so every process computes the
    same loss on the same dataset at every step. Resuming needs only (epoch, batch index).

    With ``weights`` an epoch has the same number of batches, shared out in proportion to the
    weights (largest remainder) instead of to size x repeat: dataset i then walks through its own
    stream of permutations (permutation p from (seed, i, p)), continuing from epoch to epoch, so a
    down-weighted dataset is not restarted at every epoch and an up-weighted one cycles.

    A local batch is (dataset index, record indices, draw key); the draw key seeds which positive and
    negatives each record uses, so the draws of a record repeated within or across epochs differ.
    """

    dataset_sizes: list
    repeats: list
    batch_sizes: list  # per-process batch size of each dataset
    seed: int
    num_processes: int = 1
    process_index: int = 0
    sources: list = None  # "meta.txt:3: path" of each dataset, for error messages
    weights: list = None  # sampling weights (all datasets) or None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for i, (size, batch_size) in enumerate(zip(self.dataset_sizes, self.batch_sizes)):
            if size < batch_size * self.num_processes:
                raise DataError(
                    f"{self.sources[i] if self.sources else f'dataset #{i}'} has {size} records, fewer than one "
                    f"global batch ({batch_size} x {self.num_processes} processes)"
                )

    def batches_per_permutation(self, i):
        return self.dataset_sizes[i] // (self.batch_sizes[i] * self.num_processes)

    def batch_counts(self) -> list:
        """Global batches of each dataset in one epoch."""
        if self.weights is None:
            return [repeat * self.batches_per_permutation(i) for i, repeat in enumerate(self.repeats)]
        # the weights over a power of two (exact) near the largest: total x w cannot overflow, and w / sum is unchanged
        scale = -math.frexp(max(self.weights))[1]
        weights = [math.ldexp(w, scale) for w in self.weights]
        total, weight_sum = len(self), sum(weights)
        exact = [total * w / weight_sum for w in weights]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
        return counts

    def global_batches(self, epoch: int) -> list:
        """[(dataset index, [record indices of the global batch], draw key)] for one epoch."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for i, count in enumerate(self.batch_counts()):
                global_size = self.batch_sizes[i] * self.num_processes
                if self.weights is None:  # ``repeat`` fresh permutations of this epoch: occurrences 0..repeat-1
                    permutations = [(rng.permutation(self.dataset_sizes[i]), (epoch, occurrence))
                                    for occurrence in range(self.repeats[i])]
                    cuts = [(order, draw, b) for order, draw in permutations
                            for b in range(self.batches_per_permutation(i))]
                else:
                    cuts = self._weighted_cuts(i, epoch, count)
                batches.extend((i, order[b * global_size : (b + 1) * global_size].tolist(), draw)
                               for order, draw, b in cuts)
            batch_order = rng.permutation(len(batches))
            self._cache = {epoch: [batches[b] for b in batch_order]}
        return self._cache[epoch]

    def _weighted_cuts(self, i, epoch, count):
        """Dataset i's ``count`` batches of the epoch from its own stream of permutations, continued across
        epochs: [(permutation, draw key, batch within it)]."""
        cuts, orders = [], {}
        for position in range(epoch * count, (epoch + 1) * count):
            permutation, b = divmod(position, self.batches_per_permutation(i))
            if permutation not in orders:
                orders[permutation] = np.random.default_rng([self.seed, i, permutation]).permutation(self.dataset_sizes[i])
            cuts.append((orders[permutation], (permutation,), b))
        return cuts

    def local_batch(self, epoch: int, position: int) -> tuple:
        """This process's slice of the epoch's ``position``-th global batch: (dataset, indices, draw key)."""
        dataset_index, indices, draw = self.global_batches(epoch)[position]
        size = len(indices) // self.num_processes
        return dataset_index, indices[self.process_index * size : (self.process_index + 1) * size], draw

    def local_batches(self, epoch: int) -> list:
        """This process's slice of every global batch of the epoch."""
        return [self.local_batch(epoch, position) for position in range(len(self))]

    def __len__(self):
        return sum(repeat * self.batches_per_permutation(i) for i, repeat in enumerate(self.repeats))


class BalancedBatchSampler:
    """Conan's cross-GPU batch balance (CBB): every step holds one batch of every task kind present.

    Each kind samples its own datasets like TaskBatchSampler. Retrieval batches are not sliced:
    every process gets the whole query batch and holds its own part of the hard negatives
    (TaskCollator.negative_part); the other kinds are sliced across processes as usual. An epoch is
    one pass over the retrieval batches; the other kinds cycle through their own epochs, their
    position a function of the step count, so resuming still needs only (epoch, batch index).
    """

    def __init__(self, datasets, batch_sizes, seed, num_processes=1, process_index=0, sources=None):
        kinds = [kind for kind in TASK_KINDS if any(d.kind == kind for d in datasets)]
        if "retri_contrast" not in kinds:
            raise DataError("--cbb needs at least one retri_contrast dataset in the meta list")
        self.kinds = ["retri_contrast"] + [kind for kind in kinds if kind != "retri_contrast"]
        self.members = {kind: [i for i, d in enumerate(datasets) if d.kind == kind] for kind in self.kinds}
        self.samplers = {}
        for offset, kind in enumerate(self.kinds):
            members = self.members[kind]
            sliced = kind != "retri_contrast"
            self.samplers[kind] = TaskBatchSampler(
                [len(datasets[i]) for i in members], [datasets[i].repeat for i in members],
                [batch_sizes[i] for i in members], seed + offset,
                num_processes if sliced else 1, process_index if sliced else 0,
                [sources[i] for i in members] if sources else None,
                [datasets[i].weight for i in members] if datasets[0].weight is not None else None)

    def __len__(self):
        return len(self.samplers["retri_contrast"])

    def local_batches(self, epoch: int) -> list:
        """[[(dataset index, local record indices, draw key) for each kind] for each step of the epoch]."""
        steps = []
        for batch_no, (member, indices, draw) in enumerate(self.samplers["retri_contrast"].local_batches(epoch)):
            parts = [(self.members["retri_contrast"][member], indices, draw)]
            for kind in self.kinds[1:]:
                sampler = self.samplers[kind]
                kind_epoch, position = divmod(epoch * len(self) + batch_no, len(sampler))
                member, kind_indices, kind_draw = sampler.local_batch(kind_epoch, position)
                parts.append((self.members[kind][member], kind_indices, kind_draw))
            steps.append(parts)
        return steps


class EpochBatches(torch.utils.data.Dataset):
    """Item i is the i-th local batch of an epoch, tokenized; starts at ``start`` to resume.

    A batch also names its ``dataset_index`` and record ``indices`` (for hard-negative re-mining);
    under CBB an item is ``{"parts": [one batch per task kind]}``.
    """

    def __init__(self, sampler: TaskBatchSampler, datasets: list, collator, epoch: int, start: int = 0):
        self.batches = sampler.local_batches(epoch)[start:]
        self.datasets = datasets
        self.collator = collator

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(self.batches[i], list):
            return {"parts": [self._collate(*part) for part in self.batches[i]]}
        return self._collate(*self.batches[i])

    def _collate(self, dataset_index, indices, draw):
        batch = self.collator(self.datasets[dataset_index], indices, draw)
        return {**batch, "dataset_index": dataset_index, "indices": list(indices)}


@dataclass
class TaskCollator:
    """Tokenize one task-homogeneous batch.

    Contrastive kinds give ``query`` (short max length) and ``passage`` = [positives | negatives
    of row 0 | negatives of row 1 | ...] (long max length); ``cosent`` gives ``pair`` =
    [texts | text_pairs] and ``labels``. Which positive and which negatives a record uses is drawn
    from (seed, draw key, record index), the draw key being the sampler's (epoch, occurrence), so it
    does not depend on process, worker or resume point, and differs between the draws of a repeated
    record. Under CBB each process takes its own part of the same shuffled retrieval negatives.
    """

    tokenizer: object
    max_length: dict  # {"query": int, "passage": int, "pair": int}
    negatives_per_kind: dict  # {"retri_contrast": n, "cls_contrast": n}
    seed: int = 0
    query_prefix: str | dict = ""  # one prefix, or {dataset name: prefix} (datasets not named: none)
    negative_part: tuple = (0, 1)  # (part, parts): CBB gives process r part r of each retrieval record's negatives
    hash_texts: bool = False  # add "text_ids" (for InfoNCE's duplicate mask) to contrastive batches
    teacher_tokenizer: object = None  # --teacher_model: "teacher" tokens of parallel batches (its own tokenizer)
    teacher_prefix: str = ""  # the teacher's query prompt
    distill: bool = False  # retrieval batches too: "teacher" tokens, or without a teacher model the records'
    # "teacher_scores" [B, 1 + K] of the positive and negatives drawn

    def __call__(self, dataset: TaskDataset, indices, draw):
        """``draw``: the sampler's draw key (epoch, occurrence), or an epoch."""
        records = [dataset.records[i] for i in indices]
        if dataset.kind == "cosent":
            texts = [r["text"] for r in records] + [r["text_pair"] for r in records]
            return {"kind": "cosent", "task": dataset.name, "pair": self._tokenize(texts, "pair"),
                    "labels": torch.tensor([r["label"] for r in records], dtype=torch.float64)}
        key = list(draw) if isinstance(draw, (tuple, list)) else [draw]
        if dataset.kind == "parallel":  # [sources | one translation of each], the teacher embeds the sources
            sources = [r["text"] for r in records]
            translations = [r["text_pos"][np.random.default_rng([self.seed, *key, i]).integers(len(r["text_pos"]))]
                            for i, r in zip(indices, records)]
            return {"kind": "parallel", "task": dataset.name, "pair": self._tokenize(sources + translations, "pair"),
                    "teacher": {"query": tokenize(self.teacher_tokenizer, sources, self.max_length["pair"])}}
        num_negatives = self.negatives_per_kind.get(dataset.kind, 0)
        positives, negatives, scores = [], [], []
        # CBB's processes share the retrieval records and take disjoint parts of their negatives (the pools
        # were checked at load to hold parts x n); other kinds are sliced by record and use part 0
        part = self.negative_part[0] * num_negatives if dataset.kind == "retri_contrast" else 0
        for index, record in zip(indices, records):
            rng = np.random.default_rng([self.seed, *key, index])
            chosen = [int(rng.integers(len(record["text_pos"])))]
            positives.append(record["text_pos"][chosen[0]])
            if num_negatives:
                pool = record["text_neg"]
                if len(pool) < part + num_negatives:  # load_meta_list checks pools against the run's needs
                    raise DataError(f"{dataset.source}: record {index} has {len(pool)} negatives, part "
                                    f"{self.negative_part} of {num_negatives} each needs {part + num_negatives}")
                chosen += [int(i) for i in rng.permutation(len(pool))[part : part + num_negatives]]
                negatives.extend(pool[i] for i in chosen[1:])
            if self.distill and "pos_scores" in record:
                scores.append([record["pos_scores"][chosen[0]], *(record["neg_scores"][i] for i in chosen[1:])])
        batch = {
            "kind": dataset.kind,
            "task": dataset.name,
            "num_negatives": num_negatives,
            "query": self._tokenize([self.prefix_for(dataset.name) + r["text"] for r in records], "query"),
            "passage": self._tokenize(positives + negatives, "passage"),
            **({"text_ids": text_ids(records, positives, negatives, num_negatives)} if self.hash_texts else {}),
        }
        if self.distill and self.teacher_tokenizer is not None and dataset.kind == "retri_contrast":
            batch["teacher"] = {"query": tokenize(self.teacher_tokenizer, [self.teacher_prefix + r["text"] for r in records],
                                                  self.max_length["query"]),
                                "passage": tokenize(self.teacher_tokenizer, positives + negatives,
                                                    self.max_length["passage"])}
        elif scores:
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch

    def prefix_for(self, dataset_name):
        return self.query_prefix if isinstance(self.query_prefix, str) else self.query_prefix.get(dataset_name, "")

    def _tokenize(self, texts, length_key):
        return tokenize(self.tokenizer, texts, self.max_length[length_key])


def text_hashes(texts):
    """A 64-bit hash of each text (the same in every process, unlike ``hash``), as a LongTensor."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
                         for text in texts], dtype=torch.long)


def text_ids(records, positives, negatives, num_negatives):
    """What the duplicate mask of InfoNCE compares (modules.losses.CandidateMask): hashes of the query texts
    (without prefix: documents have none) [B], the positives used [B], the negatives [B, K], and every positive of
    each record [B, P] (padded with the query's own hash, which is masked anyway)."""
    queries = text_hashes([r["text"] for r in records])
    widest = max(len(r["text_pos"]) for r in records)
    positive_sets = torch.stack([torch.cat([text_hashes(r["text_pos"]), query.repeat(widest - len(r["text_pos"]))])
                                 for r, query in zip(records, queries)])
    return {"query": queries, "positive": text_hashes(positives),
            "negative": text_hashes(negatives).view(len(records), num_negatives), "positive_sets": positive_sets}


# A fast tokenizer reads a whole text (and allocates its offsets) before truncating: one 50 MB record cost 7.3 GB and
# 95 s in one step. So each text is first cut to this many characters per token of the max length. The cut can only
# change the ids if a text's first max_length tokens average more than 128 characters each; ordinary text averages
# 1 (CJK) to 6 (English) and vocabulary entries are mostly far shorter, so only a text made mostly of whitespace or
# of 100+-character "words" (one [UNK] each in WordPiece) could lose tokens to it.
MAX_CHARS_PER_TOKEN = 128


def cut_texts(texts, max_length):
    """``texts``, each cut to ``max_length * MAX_CHARS_PER_TOKEN`` characters: what a tokenizer truncating to
    ``max_length`` tokens needs of them (eval/cmteb.py cuts what sentence-transformers tokenizes by this too)."""
    budget = max_length * MAX_CHARS_PER_TOKEN
    return [text[:budget] for text in texts]


def tokenize(tokenizer, texts, max_length):
    """Padded, truncated tensors of ``texts``, each cut to ``max_length * MAX_CHARS_PER_TOKEN`` characters first."""
    return dict(tokenizer(cut_texts(texts, max_length), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def read_query_prefixes(path, dataset_names, flag="--query_prefix_file"):
    """{dataset name: text} from a JSON object; every name must be a dataset of the meta list."""
    try:
        prefixes = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{flag} {path}: {error}") from None
    if not isinstance(prefixes, dict) or not all(isinstance(value, str) for value in prefixes.values()):
        raise DataError(f"{flag} {path}: expected a JSON object {{dataset name: string}}")
    unknown = sorted(set(prefixes) - set(dataset_names))
    if unknown:
        raise DataError(f"{flag} {path}: {unknown} are not datasets of the meta list ({sorted(dataset_names)})")
    return prefixes


def finetune_data(args, accelerator, negatives, negative_parts):
    """train_finetune.py's data: (datasets, per-process batch sizes, batch sampler, data order). Every record is
    checked (skipped ones counted and printed under --skip_bad_records) to hold the ``negatives`` of its kind; under
    --cbb every process holds its own n of each retrieval record's negatives (``negative_parts`` = processes), so a
    record needs n x processes."""
    needed = {**negatives, "retri_contrast": negatives["retri_contrast"] * negative_parts}
    datasets = load_meta_list(args.meta_list, args.root_dir, needed, args.skip_bad_records,
                              teacher_scores=bool(args.distill_weight) and not args.teacher_model)
    if not args.teacher_model and any(d.kind == "parallel" for d in datasets):
        raise DataError(f"{next(d.source for d in datasets if d.kind == 'parallel')}: a parallel corpus is distilled "
                         "from a teacher's embeddings: give --teacher_model")
    for line in skipped_record_lines(datasets):
        accelerator.print(line)
    default_batch = {"retri_contrast": args.retri_batch_size, "cls_contrast": args.cls_batch_size,
                     "cosent": args.cosent_batch_size, "parallel": args.parallel_batch_size}
    batch_sizes = [d.batch_size or default_batch[d.kind] for d in datasets]
    sampler = build_sampler(datasets, batch_sizes, args.seed, accelerator.num_processes, accelerator.process_index,
                            args.cbb)
    data_order = describe_data_order(datasets, batch_sizes, processes=accelerator.num_processes, seed=args.seed,
                                     grad_accum=args.grad_accum, cbb=args.cbb)
    return datasets, batch_sizes, sampler, data_order

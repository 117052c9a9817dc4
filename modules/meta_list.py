"""Meta lists: the line formats of the fine-tuning and pretraining lists, their entries (path, repeat, kind, batch
size, weight), the checks of their numbers, the unique dataset names, and per-dataset query prefixes keyed by them."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .cli import DataError
from .records import decode_line, iter_raw_records
from .task_kinds import TASK_KINDS


META_LINE = "<path> <repeat> [type=KIND] [batch_size=N] [weight=W] [name=NAME]"  # fine-tuning meta lists
PRETRAIN_META_LINE = "<path> <weight> [columns=QUERY,POSITIVE] [name=NAME]"


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

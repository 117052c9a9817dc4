"""Fine-tuning datasets: every record checked and put in the normal form of its kind (``parse_record``), and one
meta-list entry read into a ``TaskDataset``.

Every record is checked when the data is loaded, so bad input stops the run before step one with the file and line
named, never mid-run; under --skip_bad_records a record that is bad on its own (``modules.records.BadRecord``) is
skipped and counted instead.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from .cli import DataError
from .corpus import corpus_candidates
from .meta_list import MetaEntry
from .records import BadRecord, SkippedRecords, iter_raw_records, nonempty_text, text_column
from .task_kinds import REQUIRED_COLUMNS, TASK_KINDS


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
        candidates = corpus_candidates(record, where, corpus_root)
    ranks, scores = record.get("neg_ranks"), record.get("neg_scores")
    if not (isinstance(ranks, list) and ranks and all(isinstance(r, int) and 0 <= r < len(candidates) for r in ranks)):
        raise DataError(f"{where}: 'neg_ranks' must list ranks into the candidates (0..{len(candidates) - 1})")
    if not (isinstance(scores, list) and len(scores) == len(ranks)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores)):
        raise DataError(f"{where}: 'neg_scores' must hold one number per entry of 'neg_ranks'")
    return {"candidates": candidates, "neg_ranks": ranks, "neg_scores": scores,
            "text_neg": [candidates[r] for r in ranks]}


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

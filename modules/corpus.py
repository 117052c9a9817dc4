"""Corpora that mined hard negatives point into: read once per process, texts shared by every record.

tools/mine_hard_negatives.py stores each query's ranked candidates as corpus ids with a reference to the
corpus file; training (and DHNM re-mining) reads the texts from here.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli import DataError
from .records import BadRecord, iter_raw_records, text_column, text_problem


def corpus_candidates(record, where, corpus_root):
    """A mined record's ``candidate_ids`` as texts of its ``corpus`` file (relative to ``corpus_root``)."""
    ids, reference = record.get("candidate_ids"), record.get("corpus")
    if not (isinstance(ids, list) and ids):
        raise DataError(f"{where}: 'candidate_ids' must be a non-empty list of corpus ids")
    if not isinstance(reference, str):
        raise DataError(f"{where}: 'candidate_ids' needs 'corpus', the path of the corpus file they index")
    path = corpus_root / reference
    if not path.exists():
        raise DataError(f"{where}: corpus {path} does not exist")
    corpus = read_corpus(path, record.get("corpus_column", "text"))
    positions = [corpus.positions.get(i) if isinstance(i, (str, int)) else None for i in ids]
    if None in positions:
        raise DataError(f"{where}: candidate id {ids[positions.index(None)]!r} is not in the corpus {path}")
    untrainable = corpus.untrainable()
    for position in positions if untrainable else ():
        if position in untrainable:
            raise BadRecord(where, f"candidate {corpus.ids[position]!r} of corpus {path}: {untrainable[position]}")
    return CorpusCandidates(corpus.texts, np.array(positions, dtype=np.int32))


class CorpusCandidates:
    """A mined record's ranked candidates as positions into a corpus read once: the texts are shared, not copied."""

    def __init__(self, texts, positions):
        self.texts, self.positions = texts, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, rank):
        return self.texts[self.positions[rank]]


@dataclass
class Corpus:
    path: Path
    ids: list
    texts: list
    positions: dict  # id -> index into ids and texts
    _untrainable: dict = field(default=None, repr=False)

    def untrainable(self):
        """{index: problem} of the passages training cannot use (modules.records.text_problem: no visible character, a
        lone surrogate), found once: a mined record naming one is a bad record, like one holding such a text itself.
        (Evaluation reads a corpus as it is.)"""
        if self._untrainable is None:
            problems = (text_problem(text, "text") for text in self.texts)
            self._untrainable = {index: problem for index, problem in enumerate(problems) if problem}
        return self._untrainable


_corpora = {}  # (path, column, modification time, size) -> Corpus


def read_corpus(path, column="text") -> Corpus:
    """The passages of a corpus file, read once per process.

    A BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``) or any record file with a ``column`` of text
    (.jsonl, .jsonl.gz, .parquet); a passage's id is its ``_id`` / ``id`` (as a string), else its
    0-based position in the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus {path} does not exist")
    stat = path.stat()
    key = (path.resolve(), column, stat.st_mtime_ns, stat.st_size)
    if key not in _corpora:
        ids, texts, positions = [], [], {}
        for where, raw in iter_raw_records(path):
            if not isinstance(raw, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
            passage_id = raw.get("_id", raw.get("id"))
            passage_id = len(ids) if passage_id is None else str(passage_id)
            if passage_id in positions:
                raise DataError(f"{where}: id {passage_id!r} occurs twice in the corpus")
            positions[passage_id] = len(ids)
            ids.append(passage_id)
            texts.append(passage_text(raw, column, where))
        if not ids:
            raise DataError(f"corpus {path} is empty")
        _corpora[key] = Corpus(path, ids, texts, positions)
    return _corpora[key]


def passage_text(record, column, where):
    """``title text``, as BEIR and mteb join them, but the text alone when it already starts with its title."""
    text, title = text_column(record, column, where), record.get("title") or ""
    return text if not title or text.startswith(title) else f"{title} {text}"

"""Evaluation tasks of one's own: a folder with a ``task.json`` beside its data.

    {"name": "CranfieldLocal", "type": "Retrieval", "language": ["eng"], "splits": ["test"],
     "main_score": "ndcg_at_10"}                    # main_score optional: the type's default below

Data, per type:
- STS, PairClassification: ``<split>.jsonl`` with ``sentence1``, ``sentence2``, ``score`` (STS) or ``label`` (0/1),
  mteb's columns, or the training format ``text``, ``text_pair``, ``label``.
- Retrieval: the BEIR layout, ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` or, for a single split, ``qrels.tsv`` (query-id, corpus-id, score; a header line).

eval/run_cmteb.py --local-task runs such a folder through mteb's own evaluator of its type, and the training
scripts' --eval_dir score it during training (modules/evaluation.py). Every problem is a DataError naming the
folder, file and line.
"""

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .cli import DataError

TASK_TYPES = ("STS", "PairClassification", "Retrieval")
DEFAULT_MAIN_SCORE = {"STS": "cosine_spearman", "PairClassification": "max_accuracy", "Retrieval": "ndcg_at_10"}
PAIR_COLUMNS = (("sentence1", "sentence2"), ("text", "text_pair"))


@dataclass
class LocalTask:
    name: str
    type: str
    language: list
    main_score: str
    splits: list
    folder: Path
    _cache: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def revision(self):
        """Hash of task.json and the data files: a changed folder is a new revision (read when asked, not at load)."""
        digest = hashlib.sha256()
        for path in [self.folder / "task.json", *self.data_files()]:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()[:12]

    def split_data(self, split):
        """The split's data in the form of its type (see the module docstring); read once."""
        if split not in self.splits:
            raise DataError(f"{self.folder}: task {self.name} has no split {split!r} (splits: {self.splits})")
        if split not in self._cache:
            reader = _read_retrieval if self.type == "Retrieval" else _read_pairs
            self._cache[split] = reader(self, split)
        return self._cache[split]

    def data_files(self):
        if self.type != "Retrieval":
            return [self.folder / f"{split}.jsonl" for split in self.splits]
        return [self.folder / "corpus.jsonl", self.folder / "queries.jsonl", *map(self._qrels_file, self.splits)]

    def _qrels_file(self, split):
        per_split = self.folder / "qrels" / f"{split}.tsv"
        return per_split if per_split.exists() or len(self.splits) > 1 else self.folder / "qrels.tsv"


def read_task_folder(folder):
    """The task a folder declares in its task.json, with every data file it needs checked to exist."""
    folder = Path(folder)
    spec_file = folder / "task.json"
    if not spec_file.is_file():
        raise DataError(f"{folder}: no task.json (a local task folder declares name, type, language and splits)")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{spec_file}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{spec_file}: expected a JSON object")
    unknown = set(spec) - {"name", "type", "language", "main_score", "splits", "description"}
    if unknown:
        raise DataError(f"{spec_file}: unknown keys {sorted(unknown)}")
    name, kind, splits = spec.get("name"), spec.get("type"), spec.get("splits", ["test"])
    if not (isinstance(name, str) and name.strip()):
        raise DataError(f"{spec_file}: 'name' must be a non-empty string")
    if kind not in TASK_TYPES:
        raise DataError(f"{spec_file}: 'type' must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    if not (isinstance(splits, list) and splits and all(isinstance(s, str) and s for s in splits)):
        raise DataError(f"{spec_file}: 'splits' must be a non-empty list of split names")
    language = spec.get("language", ["und"])
    language = [language] if isinstance(language, str) else language
    task = LocalTask(name, kind, language, spec.get("main_score") or DEFAULT_MAIN_SCORE[kind], splits, folder)
    missing = [str(path.relative_to(folder)) for path in task.data_files() if not path.is_file()]
    if missing:
        raise DataError(f"{folder}: task {name} ({kind}) needs {', '.join(missing)}")
    return task


def _read_pairs(task, split):
    from .data import _number, iter_raw_records

    label = "score" if task.type == "STS" else "label"
    data = {"sentence1": [], "sentence2": [], label: []}
    for where, record in iter_raw_records(task.folder / f"{split}.jsonl"):
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        columns = next((pair for pair in PAIR_COLUMNS if all(c in record for c in pair)), None)
        if columns is None:
            raise DataError(f"{where}: expected sentence1 and sentence2 (or text and text_pair)")
        texts = [record[c] for c in columns]
        if not all(isinstance(text, str) and text.strip() for text in texts):
            raise DataError(f"{where}: {' and '.join(columns)} must be non-empty strings")
        # a finite number, as training data's: json reads NaN and Infinity, and one of them makes a correlation NaN
        value = _number(record, label if label in record else "label", where)
        if task.type == "PairClassification" and value not in (0, 1):
            raise DataError(f"{where}: a pair classification label is 0 or 1, got {record['label']!r}")
        data["sentence1"].append(texts[0])
        data["sentence2"].append(texts[1])
        data[label].append(int(value) if task.type == "PairClassification" else value)
    if not data["sentence1"]:
        raise DataError(f"{task.folder / f'{split}.jsonl'}: no records")
    if task.type == "PairClassification" and len(set(data["label"])) < 2:
        raise DataError(f"{task.folder / f'{split}.jsonl'}: pair classification needs labels 0 and 1")
    return data


def _read_retrieval(task, split):
    from .data import iter_raw_records

    corpus, first_seen = {}, {}
    for where, record in iter_raw_records(task.folder / "corpus.jsonl"):
        doc_id = _unique_id(record, where, first_seen)
        title, text = record.get("title") or "", record.get("text") or ""
        if not (isinstance(title, str) and isinstance(text, str) and (title + text).strip()):
            raise DataError(f"{where}: a document needs a non-empty 'text' or 'title' (strings)")
        corpus[doc_id] = {"title": title, "text": text}
    qrels_file = task._qrels_file(split)
    qrels, judged_at = {}, {}
    for line_no, line in enumerate(qrels_file.read_text(encoding="utf-8").splitlines()[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
            raise DataError(f"{qrels_file}:{line_no}: expected query-id, corpus-id and an integer score, tab-separated")
        query_id, doc_id, grade = fields[0], fields[1], int(fields[2])
        if doc_id not in corpus:
            raise DataError(f"{qrels_file}:{line_no}: document {doc_id!r} is not in corpus.jsonl")
        if grade > 0:
            qrels.setdefault(query_id, {})[doc_id] = grade
            judged_at.setdefault(query_id, line_no)
    queries, first_seen = {}, {}
    for where, record in iter_raw_records(task.folder / "queries.jsonl"):
        query_id = _unique_id(record, where, first_seen)
        if query_id in qrels:
            text = record.get("text")
            if not (isinstance(text, str) and text.strip()):
                raise DataError(f"{where}: 'text' must be a non-empty string")
            queries[query_id] = text
    unknown = sorted(set(qrels) - set(queries), key=judged_at.get)
    if unknown:
        raise DataError(f"{qrels_file}:{judged_at[unknown[0]]}: query {unknown[0]!r} is not in queries.jsonl"
                        + (f" ({len(unknown) - 1} more judged queries are not)" if len(unknown) > 1 else ""))
    if not queries:
        raise DataError(f"{qrels_file}: no query has a relevant document")
    return {"queries": queries, "corpus": corpus, "qrels": qrels}


def _unique_id(record, where, first_seen):
    """The record's id, refused when an earlier record of the file (``first_seen``: id -> where) has it."""
    record_id = _record_id(record, where)
    if record_id in first_seen:
        raise DataError(f"{where}: id {record_id!r} occurs twice (first at {first_seen[record_id]})")
    first_seen[record_id] = where
    return record_id


def _record_id(record, where):
    if not isinstance(record, dict) or record.get("_id", record.get("id")) is None:
        raise DataError(f"{where}: a record needs an '_id' (or 'id')")
    return str(record.get("_id", record.get("id")))

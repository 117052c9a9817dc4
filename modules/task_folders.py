"""Evaluation tasks of one's own: a folder with a ``task.json`` beside its data.

    {"name": "CranfieldLocal", "type": "Retrieval", "language": ["eng"], "splits": ["test"],
     "main_score": "ndcg_at_10"}                    # main_score optional: the type's default below

Data, per type:
- STS, PairClassification: ``<split>.jsonl`` with ``sentence1``, ``sentence2``, ``score`` (STS) or ``label`` (0/1),
  mteb's columns, or the training format ``text``, ``text_pair``, ``label``.
- Retrieval: the BEIR layout, ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` or, for a single split, ``qrels.tsv`` (query-id, corpus-id, score; a header line), read by
  modules/beir.py's rules; every judged query needs a relevant document (a grade above 0).

eval/run_cmteb.py --local-task runs such a folder through mteb's own evaluator of its type, and the training
scripts' --eval_dir score it during training (modules/evaluation.py). Every problem is a DataError naming the
folder, file and line.
"""

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .beir import qrels_file, read_retrieval_split, relevant_only
from .cli import DataError
from .json_object import read_json_object

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
    description: str = None
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
        return [self.folder / "corpus.jsonl", self.folder / "queries.jsonl",
                *(qrels_file(self.folder, split, len(self.splits)) for split in self.splits)]


def read_task_folder(folder):
    """The task a folder declares in its task.json, with every data file it needs checked to exist."""
    folder = Path(folder)
    spec_file = folder / "task.json"
    if not spec_file.is_file():
        raise DataError(f"{folder}: no task.json (a local task folder declares name, type, language and splits)")
    spec = read_json_object(spec_file)
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
    task = LocalTask(name, kind, language, spec.get("main_score") or DEFAULT_MAIN_SCORE[kind], splits, folder,
                     spec.get("description"))
    missing = [str(path.relative_to(folder)) for path in task.data_files() if not path.is_file()]
    if missing:
        raise DataError(f"{folder}: task {name} ({kind}) needs {', '.join(missing)}")
    return task


def _read_pairs(task, split):
    from .records import iter_raw_records
    from .task_datasets import _number

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
    data = relevant_only(read_retrieval_split(task.folder, split, len(task.splits)))
    return {"queries": data.queries, "corpus": data.corpus, "qrels": data.qrels}
